"""Refine a plan inside the model: the dense kernel's thread split, chosen by in-model timings.

A layer timed alone cannot see where its input sits. In a model each core's L2 holds what
that core wrote in the layer before, so whether a thread takes pixels or output channels
decides whether its reads hit there (ResNet-50-half's 128->32 1x1 at 56x56: 0.11 ms after a
producer split by pixels, 0.17 after one split by channels). That depends on the neighbours'
splits, so it is chosen with all of them compiled together:

1. the model compiled once per split in ``dense.SPLITS``, every dense-kernel layer on it;
2. each conv call timed inside each build (a VM instrument; the median of three interleaved
   rounds of ``runs`` inferences);
3. the mix of each layer's fastest split, compiled too;
4. every build (the original plan included) timed end to end in ``rounds`` interleaved
   rounds. The build with the lowest median ratio to the plan per round replaces the plan if
   that ratio is below 1 - ``margin`` and it was faster in at least 2/3 of the rounds (on
   VGG-16 the per-round ratios of equal builds spread over 0.94-1.04).
"""
from __future__ import annotations

import copy

import numpy as np
import tvm
from tvm import relax

from ..algorithms import get_algorithm
from ..algorithms.dense import SPLITS
from ..bench import kernel_algorithm, time_calls
from ..compile import build_isolated
from ..conv import Epilogue
from ..frontend import Model
from ..graph import find_conv_sites
from ..passes.rewrite_conv2d import RewriteConv2D
from ..plan import Plan
from ..target import make_target
from ..worker import CandidateCrash
from .progress import Progress


def call_layout(model: Model, plan: Plan, target) -> list[tuple[str, int]]:
    """(layer key, its kernel calls per inference) for the rewritten layers, in the order the
    VM runs them: the order of the bindings each rewritten chain replaces (RewriteConv2D emits
    a layer's stages there)."""
    func = model.mod["main"]
    rewrite = RewriteConv2D(plan.choices(find_conv_sites(func)), target)
    todo = rewrite.select(func)
    out = []
    for block in func.body.blocks:
        for b in block.bindings:
            if b.var in todo:
                site, choice, _ = todo[b.var]
                algo = get_algorithm(choice.algorithm)
                knobs = algo.knobs(site.spec, choice.knobs, rewrite.cpu)
                out.append((site.key, len(algo.stages(site.spec, Epilogue(site.bias is not None, site.relu), knobs,
                                                      rewrite.cpu))))
    return out


def layer_ms(vm: relax.VirtualMachine, x: tvm.runtime.Tensor, layout: list[tuple[str, int]],
             runs: int = 20) -> dict[str, float]:
    """{layer key: median ms of its kernel calls per inference} inside the model."""
    calls = [t for name, t in time_calls(vm, x, runs) if kernel_algorithm(name)]
    per = sum(n for _, n in layout)
    if len(calls) != per * runs:
        raise RuntimeError(f"refine: {len(calls) // runs} kernel calls per inference, the plan implies {per}")
    t = np.asarray(calls).reshape(runs, per)
    out, i = {}, 0
    for key, n in layout:
        out[key] = float(np.median(t[:, i:i + n].sum(axis=1))) * 1e3
        i += n
    return out


def with_splits(plan: Plan, splits: dict[str, str]) -> Plan:
    """A copy of ``plan`` with the knob ``split`` of the layers in ``splits`` set."""
    p = copy.deepcopy(plan)
    for l in p.layers:
        if l.key in splits:
            l.knobs = {**l.knobs, "split": splits[l.key]}
    return p


def apply_report(plan: Plan, report: dict) -> Plan:
    """``plan`` with a refine report's chosen splits, each such layer's in-model ms in its note."""
    out = with_splits(plan, report["splits"])
    layer = next((b["layer_ms"] for b in report["builds"] if b["name"] == report["chosen"]), {})
    for l in out.layers:
        if l.key in report["splits"] and l.key in layer:
            l.note = {**l.note, "in_model_ms": layer[l.key]}
    return out


def dense_splits(model: Model, plan: Plan, layout: list[tuple[str, int]], target) -> dict[str, str]:
    """{key: resolved split} of the layers the plan rewrites onto the dense kernel (``layout``:
    call_layout's, which names the rewritten ones)."""
    sites = {s.key: s for s in find_conv_sites(model.mod["main"])}
    rewritten = {k for k, _ in layout}
    dense = get_algorithm("dense")
    return {l.key: dense.knobs(sites[l.key].spec, l.knobs, target)["split"] for l in plan.layers
            if l.algorithm == "dense" and l.key in rewritten}


def refine_plan(model: Model, plan: Plan, x: np.ndarray, target, rounds: int = 7, runs: int = 20,
                margin: float = 0.02, log=lambda s: None) -> tuple[Plan, dict]:
    """(the fastest of the plan and its split variants end to end, a report).

    ``x``: one real input (the model's input shape). Report: ``builds``, per build its name,
    median ms end to end and {layer key: in-model ms}; ``chosen``, the winner's name;
    ``splits``, its {layer key: split} of the dense layers; ``mix``, the per-layer fastest;
    ``round_ms``, every round's end-to-end ms per build."""
    if rounds < 1 or runs < 1:
        raise ValueError(f"rounds and runs must be >= 1, got {rounds} and {runs}")
    target = make_target(target)
    layout = call_layout(model, plan, target)  # builds every layer's stages: once
    original = dense_splits(model, plan, layout, target)
    if not original:
        return plan, {"builds": [], "chosen": "plan", "splits": {}, "why": "no layer on the dense kernel"}
    xt = tvm.runtime.tensor(np.ascontiguousarray(x, np.float32))
    splits = {"plan": original, **{f"all {s}": {k: s for k in original} for s in SPLITS}}
    p = Progress("refine", len(splits) + 3 + rounds)
    vms = {}

    def add(name):
        """Compile one build (in the worker); a build that crashes LLVM is left out, unless it
        is the plan itself."""
        try:
            lib, _ = build_isolated(model, with_splits(plan, splits[name]), target)
        except CandidateCrash as e:
            if name == "plan":
                raise
            del splits[name]
            p.step(f"left out: {name} ({e})")
            log(f"refine: the build {name!r} crashed and is left out: {e}")
            return
        vms[name] = relax.VirtualMachine(lib, tvm.cpu())
        p.step(f"compiled: {name}")

    for name in list(splits):
        add(name)
    # the per-layer times in interleaved rounds too: the machine's drift must not pick a split
    laps = {name: [] for name in splits}
    for _ in range(3):
        for name in splits:
            laps[name].append(layer_ms(vms[name], xt, layout, runs))
    per_layer = {n: {k: float(np.median([lap[k] for lap in laps[n]])) for k in laps[n][0]} for n in splits}
    p.step("conv calls in the model: " + ", ".join(f"{n} {sum(v.values()):.2f} ms" for n, v in per_layer.items()))
    built = [s for s in SPLITS if f"all {s}" in per_layer]
    if built:
        splits["mix"] = {k: min(built, key=lambda s: per_layer[f"all {s}"][k]) for k in original}
        add("mix")
    if "mix" in splits:
        per_layer["mix"] = layer_ms(vms["mix"], xt, layout, runs)
        p.step("mix timed")
    names = list(splits)
    times = np.zeros((rounds, len(names)))
    for r in range(rounds):
        for j, name in enumerate(names):
            fe = vms[name].time_evaluator("main", tvm.cpu(), number=1, repeat=10, min_repeat_ms=100)
            times[r, j] = float(np.median(fe(xt).results)) * 1e3
        p.step(f"round {r + 1}: " + ", ".join(f"{n} {t:.2f}" for n, t in zip(names, times[r])))
    med = np.median(times, axis=0)
    ratio = times / times[:, :1]  # per round against the plan: the machine's drift cancels
    best = int(np.argmin(np.median(ratio, axis=0)))
    wins = np.mean(ratio[:, best] < 1.0)
    if np.median(ratio[:, best]) > 1 - margin or wins < 2 / 3:
        best = 0
    chosen = names[best]
    log(f"refine: {chosen}, {med[best]:.3f} ms against the plan's {med[0]:.3f} ms "
        f"(median ratio per round {np.median(ratio[:, best]):.3f}, faster in {wins:.0%} of the rounds)")
    report = {"builds": [{"name": n, "ms": float(m), "layer_ms": per_layer[n]} for n, m in zip(names, med)],
              "chosen": chosen, "splits": splits[chosen], "mix": splits.get("mix", {}),
              "round_ms": {n: times[:, j].tolist() for j, n in enumerate(names)}}
    return apply_report(plan, report), report
