"""Refine a plan inside the model: the dense kernel's thread split, chosen by in-model timings.

A layer timed alone cannot see where its input sits. In a model each core's L2 holds what
that core wrote in the layer before, so whether a thread takes pixels or output channels
decides whether its reads hit there (ResNet-50-half's 128->32 1x1 at 56x56: 0.11 ms after a
producer split by pixels, 0.17 after one split by channels). That depends on the neighbours'
splits, so it is chosen with all of them compiled together:

1. the model compiled once per split in ``dense.DENSE_SPLITS``, every dense-kernel layer on it;
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

from ..algorithms import get_algorithm
from ..algorithms.dense import DENSE_SPLITS
from ..compile import Build, build_isolated
from ..frontend import Model
from ..measure import Progress, time_calls
from ..plan import Plan
from ..target import make_target
from ..worker import CandidateCrash


def layer_ms(b: Build, x: tvm.runtime.Tensor, runs: int = 20) -> dict[str, float]:
    """{layer key: median ms of its kernel calls per inference} inside the model built as ``b``.

    b.kernels names the layers that call each kernel in call order, so a kernel's j-th call in
    an inference is its j-th layer's (stages.LAYERS_ATTR)."""
    calls: dict[str, list[float]] = {}
    for name, t in time_calls(b.vm(), x, runs):
        if name in b.kernels:
            calls.setdefault(name, []).append(t)
    total: dict[str, np.ndarray] = {}
    for name, ts in calls.items():
        layers = b.kernels[name][0]
        if len(ts) != runs * len(layers):
            raise RuntimeError(f"refine: {name} was called {len(ts)} times in {runs} inferences; "
                               f"{len(layers)} layers call it")
        per = np.asarray(ts).reshape(runs, len(layers))
        for j, key in enumerate(layers):
            total[key] = total.get(key, 0) + per[:, j]
    return {key: float(np.median(t)) * 1e3 for key, t in total.items()}


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


def dense_splits(model: Model, plan: Plan, applied: dict[str, str], target) -> dict[str, str]:
    """{key: resolved split} of the layers the plan puts on the dense kernel and a build of it
    rewrote (``applied``: Build.applied)."""
    sites = {s.key: s for s in model.sites}
    dense = get_algorithm("dense")
    return {l.key: dense.knobs(sites[l.key].spec, l.knobs, target)["split"] for l in plan.layers
            if l.algorithm == "dense" and applied.get(l.key) == "dense"}


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
    applied = {l.key: l.algorithm for l in plan.layers}  # what the plan asks for, before any build
    if not dense_splits(model, plan, applied, target):  # nothing to compile for
        return plan, {"builds": [], "chosen": "plan", "splits": {}, "why": "no layer on the dense kernel"}
    xt = tvm.runtime.tensor(np.ascontiguousarray(x, np.float32))
    p = Progress("refine", len(DENSE_SPLITS) + 4 + rounds)
    builds = {"plan": build_isolated(model, plan, target)}  # a crash of the plan itself ends refine
    p.step("compiled: plan")
    original = dense_splits(model, plan, builds["plan"].applied, target)
    if not original:
        return plan, {"builds": [], "chosen": "plan", "splits": {}, "why": "no layer on the dense kernel"}
    splits = {"plan": original, **{f"all {s}": {k: s for k in original} for s in DENSE_SPLITS}}

    def add(name):
        """Compile one build (in the worker); a build that crashes LLVM is left out."""
        try:
            builds[name] = build_isolated(model, with_splits(plan, splits[name]), target)
        except CandidateCrash as e:
            del splits[name]
            p.step(f"left out: {name} ({e})")
            log(f"refine: the build {name!r} crashed and is left out: {e}")
            return
        p.step(f"compiled: {name}")

    for name in list(splits)[1:]:
        add(name)
    # the per-layer times in interleaved rounds too: the machine's drift must not pick a split
    laps = {name: [] for name in splits}
    for _ in range(3):
        for name in splits:
            laps[name].append(layer_ms(builds[name], xt, runs))
    per_layer = {n: {k: float(np.median([lap[k] for lap in laps[n]])) for k in laps[n][0]} for n in splits}
    p.step("conv calls in the model: " + ", ".join(f"{n} {sum(v.values()):.2f} ms" for n, v in per_layer.items()))
    built = [s for s in DENSE_SPLITS if f"all {s}" in per_layer]
    if built:
        splits["mix"] = {k: min(built, key=lambda s: per_layer[f"all {s}"][k]) for k in original}
        add("mix")
    if "mix" in splits:
        per_layer["mix"] = layer_ms(builds["mix"], xt, runs)
        p.step("mix timed")
    names = list(splits)
    times = np.zeros((rounds, len(names)))
    for r in range(rounds):
        for j, name in enumerate(names):
            fe = builds[name].vm().time_evaluator("main", tvm.cpu(), number=1, repeat=10, min_repeat_ms=100)
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
