"""Measure each conv layer's input sparsity on sample inputs, running the model in TVM.

The probed model is compiled in a worker process (compile.build_isolated): a compiler crash
is a CandidateCrash naming what it was building, not the end of the caller."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import tvm

from .compile import build_isolated, resolve_plan
from .frontend import Model
from .measure import joined_outputs
from .passes.probe_conv_inputs import ProbeConvInputs
from .target import make_target, runs_here


@dataclass
class LayerProfile:
    """One conv layer's input statistics over the samples (density = share of non-zeros)."""

    key: str
    spec: dict
    macs: int
    density_mean: float
    density_std: float
    density_min: float
    density_max: float
    zero_channel_share: float  # channels all zero in an image, averaged over images
    bias: bool
    relu: bool
    why_dense: str | None
    clip: float | None = None  # the activation's upper bound (ReLU6: 6.0), conv.Epilogue's
    gate: str | None = None  # conv.Epilogue's gate: "hard_sigmoid" (hard-swish) or "sigmoid" (SiLU)
    slope: float | None = None  # a LeakyReLU's slope below 0 (with relu), conv.Epilogue's

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def channel_stats(a: np.ndarray) -> tuple[float, float]:
    """(density, share of all-zero channels) of an N x C x H x W activation."""
    nz = a != 0
    return float(nz.mean()), float((~nz.any(axis=(2, 3))).mean())


def run_with_probes(model: Model, samples, target=None, algorithm: str = "dense"):
    """Run the model on each sample; returns (outputs (measure.joined_outputs), per-layer lists
    of NCHW conv inputs).

    A target of another architecture (an AArch64 board's, tuned over RPC) is profiled with this
    machine's CPU instead: the activations are the model's, whatever CPU computes them."""
    target = make_target(target if runs_here(target) else None)
    probed = dataclasses.replace(model, mod=ProbeConvInputs()(model.mod))
    vm = build_isolated(probed, resolve_plan(model, None, algorithm, target), target, timeout=math.inf).vm()
    sites = model.sites
    outputs, acts = [], [[] for _ in sites]
    for x in samples:
        res = vm["main"](tvm.runtime.tensor(x))
        outputs.append(joined_outputs(res[0]))
        for i, s in enumerate(sites):
            a = res[i + 1].numpy()
            acts[i].append(a.transpose(0, 3, 1, 2) if s.data_layout == "NHWC" else a)
    return outputs, acts, sites


def profile(model: Model, samples, target=None, algorithm: str = "dense"):
    """Per-layer sparsity profile; returns (list of LayerProfile, per-layer activations, outputs)."""
    outputs, acts, sites = run_with_probes(model, samples, target, algorithm)
    layers = []
    for s, a in zip(sites, acts):
        st = np.array([channel_stats(x) for x in a])
        d = st[:, 0]
        layers.append(LayerProfile(s.key, s.spec.to_dict(), s.spec.macs, float(d.mean()), float(d.std()),
                                   float(d.min()), float(d.max()), float(st[:, 1].mean()), s.bias is not None,
                                   s.relu, s.why_dense, s.clip, s.gate, s.slope))
    return layers, acts, outputs
