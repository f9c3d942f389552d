"""The memory of a compiled model: what each conv layer allocates, what Relax's storage plan
makes of it, and the peak resident memory of the exported library against onnxruntime's.

Every buffer a stage writes is sized for the worst case (every element non-zero; base.py), so
a layer's workspace does not depend on its input. Per conv layer of a plan, ``layer_memory``
gives the bytes of each buffer its stages write besides ``y`` (encoded formats, lowered
matrices, padded copies), its constants (the re-laid-out weights) and the input activation's
bytes, the yardstick of the worst-case sizing. ``storage_plan`` reads what Relax's
StaticPlanBlockMemory (in tvm.compile's default pipeline) makes of all the model's
intermediate tensors: storage blocks shared by tensors whose lifetimes do not overlap, across
layers too. ``peak_rss`` measures a fresh process that loads the exported library and runs it
(rss_child.py), or runs the ONNX file in onnxruntime. ``format_storage`` counts what each
algorithm's format stores on real activations, against im2col's and MEC's lowered matrices.
``measure_model`` puts them together for ``tvm-sparseconv memory``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from .algorithms import ALGORITHMS, Buffer, get_algorithm
from .compile import build_isolated, lower
from .conv import Conv2DSpec, Epilogue, UnsupportedConvError
from .cpu import cpu_of
from .frontend import Model, at_batch
from .images import batch_input
from .passes import RewriteConv2D
from .plan import Plan
from .reference.storage import Storage, compression_ratios
from .target import make_target

MB = 1e6
RUNTIME_ONLY = "plan, TVM runtime only"  # measure_model's row of the plan's library in runtime-only mode


def buffer_bytes(b: Buffer) -> int:
    """Bytes of a Buffer of static shape."""
    return math.prod(b.shape) * np.dtype(b.dtype).itemsize


def workspace_buffers(algorithm: str, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu) -> list[Buffer]:
    """The buffers ``algorithm``'s stages for the layer write besides ``y``, in stage order, with
    the static worst-case shapes the compiled pipeline allocates."""
    stages = get_algorithm(algorithm).stages(spec, epilogue, knobs, cpu)
    return [b for st in stages for b in st.outputs if b.name != "y"]


@dataclass
class LayerMemory:
    """One conv layer's memory under a plan, in bytes. ``buffers``: {name, shape, dtype, bytes}
    of each workspace buffer (workspace_buffers, and an NHWC layer's NCHW copies of its input
    and output around the kernels); ``activation_bytes``: the layer's input, N x C x H x W
    float32; ``constant_bytes``: what the layer keeps as constants (the algorithm's re-laid-out
    weights and bias; TVM's conv2d keeps the model's own)."""

    key: str
    algorithm: str
    spec: dict
    activation_bytes: int
    buffers: list
    workspace_bytes: int
    constant_bytes: int
    note: str | None = None

    @property
    def total_bytes(self) -> int:
        return self.workspace_bytes + self.constant_bytes

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


# TVM's conv2d (a layer left to it) pads its input inside the fused kernel, as a TIR allocation
# rather than a Relax tensor: it is in no stage output and in no storage of the plan
DIRECT_NOTE = "TVM's conv2d: its padded copy of the input is allocated inside the kernel"


def layer_memory(model: Model, plan: Plan, target=None) -> list[LayerMemory]:
    """Per conv layer of ``model`` (in graph order): its memory under ``plan`` (a Plan made for
    this model) as the compile path builds it for ``target``'s CPU: the layers RewriteConv2D
    rewrites with the epilogue it gives them (a fused residual add included); the others are
    TVM's conv2d ("direct")."""
    cpu = cpu_of(make_target(target))
    sites = model.sites
    todo = RewriteConv2D(plan.choices(sites), cpu, sites=sites).select(model.mod["main"])
    chosen = {site.key: (choice, fused) for site, choice, fused in todo.values()}
    out = []
    for s in sites:
        act = math.prod(s.spec.x_shape) * 4
        if s.key not in chosen:
            consts = sum(a.nbytes for a in (s.weight, s.bias) if a is not None)
            out.append(LayerMemory(s.key, "direct", s.spec.to_dict(), act, [], 0, consts, DIRECT_NOTE))
            continue
        choice, fused = chosen[s.key]
        algo = get_algorithm(choice.algorithm)
        knobs = algo.knobs(s.spec, choice.knobs, cpu)
        bufs = workspace_buffers(algo.name, s.spec, s.epilogue(fused is not None), knobs, cpu)
        if s.data_layout == "NHWC":  # RewriteConv2D transposes around the kernels
            bufs = [Buffer("x_nchw", s.spec.x_shape)] + bufs + [Buffer("y_nchw", s.spec.y_shape)]
        consts = sum(int(v.nbytes) for v in algo.constants(s.spec, s.weight, s.bias, knobs).values())
        out.append(LayerMemory(s.key, algo.name, s.spec.to_dict(), act,
                               [{"name": b.name, "shape": list(b.shape), "dtype": b.dtype, "bytes": buffer_bytes(b)}
                                for b in bufs], sum(map(buffer_bytes, bufs)), consts))
    return out


def layer_totals(layers: list[LayerMemory]) -> dict:
    """The model's sums over ``layers``: workspaces (each layer's on its own, no reuse), the
    largest workspace, constants, inputs; and the worst-case sizing's cost as a ratio of the
    activations (the sum of workspaces over the sum of the layers' inputs)."""
    ws = sum(l.workspace_bytes for l in layers)
    act = sum(l.activation_bytes for l in layers)
    big = max(layers, key=lambda l: l.workspace_bytes, default=None)
    return {"workspace_bytes": ws, "constant_bytes": sum(l.constant_bytes for l in layers),
            "activation_bytes": act, "largest_workspace_bytes": big.workspace_bytes if big else 0,
            "largest_workspace_layer": big.key if big and big.workspace_bytes else None,
            "workspace_over_activation": ws / act if act else None}


# -- Relax's storage plan -------------------------------------------------------------------------

_ALLOC_STORAGE = tvm.ir.Op.get("relax.memory.alloc_storage")
_ALLOC_TENSOR = tvm.ir.Op.get("relax.memory.alloc_tensor")
_BUILTIN_ALLOC = tvm.ir.Op.get("relax.builtin.alloc_tensor")
PLAN_PASS = "StaticPlanBlockMemory"


@tvm.instrument.pass_instrument
class _After:
    """Keeps the module as it is right after the pass named ``name``."""

    def __init__(self, name: str):
        self.wanted, self.mod = name, None  # (``name`` is the instrument's own)

    def run_after_pass(self, mod, info):
        if info.name == self.wanted:
            self.mod = mod


def _tensor_bytes(shape, dtype) -> int:
    return math.prod(int(v) for v in shape.values) * tvm.runtime.DataType(str(dtype.value)).bits // 8


def storage_plan(model: Model, plan: Plan, target=None, database=None) -> dict:
    """What StaticPlanBlockMemory makes of ``model``'s intermediate tensors under ``plan``: the
    lowered module (compile.lower) through tvm.compile's Relax pipeline (no TIR build), ``main``
    read right after that pass. Returns, in bytes:

    ``tensor_bytes`` / ``tensors``: every planned tensor (conv workspaces, activations) on its
    own, summed, and how many; ``planned_bytes`` / ``storages``: the storage blocks the VM
    allocates for them (a block serves every tensor of its dtype whose lifetime does not overlap
    another's, so the sum is what the plan keeps resident), and the largest block; and
    ``unplanned_bytes``: tensors left to the VM's own allocation (the output).
    """
    target = make_target(target)
    mod, _ = lower(model, plan, target, database)
    after = _After(PLAN_PASS)
    with target, tvm.transform.PassContext(instruments=[after]):
        relax.get_pipeline("default")(mod)
    if after.mod is None:
        raise RuntimeError(f"tvm.compile's default Relax pipeline ran no {PLAN_PASS}: nothing to read")
    storages, tensors, unplanned = [], [], []
    for block in after.mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if not isinstance(v, relax.Call):
                continue
            if v.op == _ALLOC_STORAGE:  # size in bytes, dtype
                storages.append(int(v.args[0].values[0]))
            elif v.op == _ALLOC_TENSOR:  # storage, offset, shape, dtype
                tensors.append(_tensor_bytes(v.args[2], v.args[3]))
            elif v.op == _BUILTIN_ALLOC:  # shape, dtype
                unplanned.append(_tensor_bytes(v.args[0], v.args[1]))
    return {"tensors": len(tensors), "tensor_bytes": sum(tensors), "storages": len(storages),
            "planned_bytes": sum(storages), "largest_storage_bytes": max(storages, default=0),
            "unplanned_bytes": sum(unplanned)}


# -- peak resident memory -----------------------------------------------------------------------

CHILD = Path(__file__).with_name("rss_child.py")
RUNNERS = ("tvm", "tvm-runtime", "onnxruntime")


def peak_rss(runner: str, model_file: str, x: np.ndarray, threads: int = 0, runs: int = 2) -> dict:
    """Run ``model_file`` ``runs`` times on ``x`` in a fresh process that imports numpy and only
    ``runner`` ("tvm": an exported library; "tvm-runtime": the same in TVM's runtime-only mode,
    TVM_USE_RUNTIME_LIB=1; "onnxruntime": an .onnx file), PyTorch hidden, and measure its memory
    (rss_child.py). Returns, in MB: ``import_mb`` (VmRSS after the imports),
    ``load_mb`` (VmRSS once the model is loaded), ``load_peak_mb`` (the peak while loading:
    VmHWM then), ``run_peak_mb`` (the peak while running: VmHWM, reset after loading), ``peak_mb``
    (the larger: the process's peak), ``peak_over_import_mb``, ``ru_maxrss_mb`` (getrusage's
    reading of the same peak); ``modules`` (tvm, onnxruntime, torch and tvm_sparseconv as far
    as the child imported them), ``libraries`` (libtvm_runtime, libtvm_compiler as far as it
    mapped them) and ``output`` (the last output). ``threads``: TVM's pool /
    onnxruntime's intra-op threads (0: the runtime's default).

    The child is started through /bin/sh: Linux carries a process's ru_maxrss over an exec, so a
    child exec'ed straight from this (large) process would report this one's. Linux only (the
    numbers come from /proc). A child that fails raises RuntimeError with its last stderr line."""
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}; choose from {', '.join(RUNNERS)}")
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"{runner}: model file not found: {model_file}")
    if not os.path.isfile("/proc/self/status"):
        raise RuntimeError("peak RSS is read from /proc/self/status: Linux only")
    env = dict(os.environ)
    if threads:
        env["TVM_NUM_THREADS"] = str(threads)
    if runner == "tvm-runtime":
        env["TVM_USE_RUNTIME_LIB"] = "1"
    else:
        env.pop("TVM_USE_RUNTIME_LIB", None)
    with tempfile.TemporaryDirectory(prefix="tvms-rss-") as d:
        np.save(os.path.join(d, "x.npy"), np.ascontiguousarray(x, np.float32))
        out = os.path.join(d, "out")
        cmd = [sys.executable, "-c", CHILD.read_text(), runner, os.path.abspath(model_file), os.path.join(d, "x.npy"),
               out, str(int(threads)), str(int(runs))]
        proc = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd], cwd=d, env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            lines = [l for l in proc.stderr.splitlines() if l.strip()] or [f"exit code {proc.returncode}"]
            raise RuntimeError(f"the {runner} memory child failed: {lines[-1]}")
        with open(out + ".json") as f:
            kb = json.load(f)
        y = np.load(out + ".npy")
    mb = {k: v * 1024 / MB for k, v in kb.items() if isinstance(v, int)}  # kB as Linux counts them
    peak = max(mb["load_hwm"], mb["run_hwm"])
    return {"import_mb": mb["import_rss"], "load_mb": mb["load_rss"], "load_peak_mb": mb["load_hwm"],
            "run_peak_mb": mb["run_hwm"], "peak_mb": peak, "peak_over_import_mb": peak - mb["import_rss"],
            "ru_maxrss_mb": max(mb["load_maxrss"], mb["run_maxrss"]), "modules": kb["modules"],
            "libraries": kb["libraries"], "output": y}


# -- the model at another batch -------------------------------------------------------------------

def median_rss(runner: str, model_file: str, x: np.ndarray, threads: int = 0, repeat: int = 3) -> dict:
    """peak_rss ``repeat`` times: the run with the median peak, and ``peaks_mb``, every run's peak
    (allocators and thread timing move a peak by tens of MB from one process to the next)."""
    runs = sorted((peak_rss(runner, model_file, x, threads) for _ in range(max(1, repeat))), key=lambda r: r["peak_mb"])
    return {**runs[len(runs) // 2], "peaks_mb": [r["peak_mb"] for r in runs]}


def measure_model(model: Model, plan: Plan, samples: list[np.ndarray], batches=(1, 8), target=None,
                  threads: int = 0, baseline: str = "dense", database=None, peers: bool = True, repeat: int = 3,
                  log=lambda s: None, baseline_plan: Plan | None = None) -> dict:
    """The memory of ``model`` under ``plan`` (made for ``model``'s batch; other batches take
    Plan.with_batch), per batch in ``batches``:

    ``layers`` (layer_memory) and ``totals`` (layer_totals); ``builds``: for the plan and the
    ``baseline`` algorithm on every layer, the storage_plan and the median_rss of the exported
    library (built in the worker, exported to a temp folder, run in fresh processes), the plan's
    library again in TVM's runtime-only mode (RUNTIME_ONLY, second), and onnxruntime's median_rss on the same input when ``peers`` (an ONNX model, onnxruntime
    installed); each row's ``runner`` (peak_rss) and ``max_abs_error`` against onnxruntime's output
    (or the baseline's).
    ``samples``: model inputs (images), cycled to fill a batch. ``baseline_plan``: the
    baseline's plan when made already (the CLI predicts its knobs, as bench's), else
    Plan.uniform's defaults."""
    import importlib.util
    import shutil

    target = make_target(target)
    ort = peers and model.onnx_path and importlib.util.find_spec("onnxruntime") is not None
    res = {"input_shape": list(model.input_shape), "layout": model.layout, "threads": threads,
           "cpu": cpu_of(target).to_dict(), "baseline": baseline, "repeat": repeat, "batches": []}
    all_baseline = baseline_plan or Plan.uniform(model.sites, baseline, target)
    for batch in batches:
        m = at_batch(model, batch)
        p, base = ((plan, all_baseline) if batch == model.input_shape[0] else
                   (plan.with_batch(batch), all_baseline.with_batch(batch)))
        x = batch_input(samples, batch)
        layers = layer_memory(m, p, target)
        entry = {"batch": batch, "layers": [l.to_dict() for l in layers], "totals": layer_totals(layers),
                 "builds": []}
        outputs = {}
        d = tempfile.mkdtemp(prefix="tvms-memory-")
        try:
            for name, bp in (("plan", p), (f"all {baseline}", base)):
                log(f"batch {batch}: {name}: storage plan, export, peak RSS")
                sp = storage_plan(m, bp, target, database)
                lib = os.path.join(d, name.replace(" ", "-") + ".so")
                applied = build_isolated(m, bp, target, database, path=lib).applied
                rss = median_rss("tvm", lib, x, threads, repeat)
                outputs[name] = rss.pop("output")
                counts = {}
                for a in applied.values():
                    counts[a] = counts.get(a, 0) + 1
                row = {"name": name, "layers": ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                       "storage_plan": sp}
                entry["builds"].append({**row, "runner": "tvm", **rss})
                if name == "plan":  # the same library on TVM's runtime alone, as a deployment runs it
                    rss = median_rss("tvm-runtime", lib, x, threads, repeat)
                    outputs[RUNTIME_ONLY] = rss.pop("output")
                    entry["builds"].append({**row, "name": RUNTIME_ONLY, "runner": "tvm-runtime", **rss})
            if ort:
                log(f"batch {batch}: onnxruntime peak RSS")
                rss = median_rss("onnxruntime", m.onnx_path, x, threads, repeat)
                outputs["onnxruntime"] = rss.pop("output")
                entry["builds"].append({"name": "onnxruntime", "layers": "", "storage_plan": None,
                                        "runner": "onnxruntime", **rss})
        finally:
            shutil.rmtree(d, ignore_errors=True)
        ref = outputs.get("onnxruntime", outputs[f"all {baseline}"])
        for b in entry["builds"]:
            b["max_abs_error"] = float(np.max(np.abs(outputs[b["name"]] - ref)))
        res["batches"].append(entry)
    return res


# -- what each format stores on real activations --------------------------------------------------

def measure_formats(model: Model, samples: list[np.ndarray], target=None, algorithms=ALGORITHMS) -> dict:
    """format_storage on ``model``'s conv inputs when it runs on ``samples`` (the dense build,
    profile.run_with_probes): {"samples": how many, "layers": format_storage's rows}."""
    from .profile import run_with_probes

    _, acts, _ = run_with_probes(model, samples, target)
    return {"samples": len(samples), "layers": format_storage(model, acts, target, algorithms)}


def format_storage(model: Model, activations: list[list[np.ndarray]], target=None,
                   algorithms=ALGORITHMS) -> list[dict]:
    """Per conv layer of ``model`` (``activations[i]``: layer i's NCHW inputs on the samples,
    profile.run_with_probes): each algorithm's stored elements and bytes on them (its NumPy
    reference encoder, Algorithm.reference_storage, with its default knobs for ``target``'s CPU;
    the mean over the samples), the bytes of the buffers its stages allocate (worst case:
    every element non-zero), and the compression ratios against im2col's and MEC's lowered
    matrices (reference.storage; None when the format stores nothing). An algorithm that cannot
    compute the layer has ``error``. Each row also gives the layer's density (mean over the
    samples) and input elements."""
    cpu = cpu_of(make_target(target))
    rows = []
    for s, acts in zip(model.sites, activations):
        acts = [np.asarray(a, np.float32) for a in acts]
        row = {"key": s.key, "spec": s.spec.to_dict(), "activation_elements": math.prod(s.spec.x_shape),
               "density": float(np.mean([np.count_nonzero(a) / a.size for a in acts])), "algorithms": {}}
        for name in algorithms:
            algo = get_algorithm(name)
            try:
                if s.why_dense is not None:
                    raise UnsupportedConvError(s.why_dense)
                algo.check(s.spec)
            except UnsupportedConvError as e:
                row["algorithms"][name] = {"error": str(e)}
                continue
            knobs = algo.knobs(s.spec, None, cpu)
            stored = [algo.reference_storage(s.spec, knobs, a) for a in acts]
            st = Storage(round(np.mean([t.elements for t in stored])), round(np.mean([t.bytes for t in stored])))
            worst = sum(map(buffer_bytes, workspace_buffers(name, s.spec, s.epilogue(), knobs, cpu)))
            cr = compression_ratios(s.spec, st) if st.elements else dict.fromkeys(
                ("cr_vs_im2col", "cr_vs_mec", "cr_bytes_vs_im2col", "cr_bytes_vs_mec"))
            row["algorithms"][name] = {"elements": st.elements, "bytes": st.bytes, "worst_case_bytes": worst,
                                       "knobs": knobs, **cr}
        rows.append(row)
    return rows
