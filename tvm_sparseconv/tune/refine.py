"""Refine a plan inside the model: the dense kernel's thread split, and sparse or dense per
sparse layer, chosen by in-model timings.

A layer timed alone cannot see where its input sits. In a model each core's L2 holds what
that core wrote in the layer before, so whether a thread takes pixels or output channels
decides whether its reads hit there (ResNet-50-half's 128->32 1x1 at 56x56: 0.11 ms after a
producer split by pixels, 0.17 after one split by channels). That depends on the neighbours'
splits, so it is chosen with all of them compiled together:

1. the model compiled once per split in ``dense.DENSE_SPLITS``, every dense-kernel layer on it,
   and the plan itself; when the plan has sparse layers, also with each of them on the dense
   kernel ("sparse layers dense": in channel blocks where the layouts phase timed dense so, its
   note's "dense_blocks_knobs", else in NCHW on the dense knobs measured fastest alone, its
   "dense_knobs"), since a sparse kernel slows down more inside the model than a dense
   one (ResNet-50-half's pixcsr layers on the Zen 3: a median 1.3-1.8x their time alone, the
   dense layers 1.13-1.22x). These builds compile side by side, one per core
   (compile.build_many);
2. each call timed inside each build (a VM instrument; the median of three interleaved laps of
   ``runs`` inferences): each conv layer's time, and the sum of all calls per inference;
3. the mix, compiled too: each dense layer's fastest split, and each sparse layer dense where
   it was faster so; and when the tuner's layouts phase put layers in channel blocks, the plan
   with them back in NCHW ("all nchw"), and when it left in NCHW layers that could take blocks,
   the plan with them in blocks ("all blocks"), so that the layouts, chosen from times alone,
   are checked end to end as the splits are (inside VGG-16 on the Emerald Rapids each 3x3
   layer ran 6-27 % faster in blocks, where the cost model predicted the late ones slower);
   and with sparse layers, "all blocks" with them dense in blocks too ("all dense in blocks":
   a sparse layer in NCHW needs a transform on each side from blocked neighbours, and faster
   alone it may still be slower in the model: on ResNet-50-half on the Emerald Rapids, refine
   timed that build at 0.81 of a plan whose 24 hybrid layers, each faster alone, were in NCHW);
4. the plan, ``others``, and each build whose calls sum to at most ``ROUND_SLACK`` more than
   the lowest sum of the builds timed in the laps, timed end to end in ``rounds`` interleaved
   rounds (a build further behind is left out: on ResNet-50-half such builds were not chosen,
   and each costs a second a round). The mix, timed in one lap of its own, sets no bar, and
   ``others`` are always timed: on ResNet-50-half on the Emerald Rapids, the mix's one lap
   (10.4 ms) left out a predicted plan whose calls summed to less than the plan's in the laps
   (12.1 against 12.6 ms), and which ran at 0.87 of the chosen mix's time end to end. The build
   with the lowest median ratio to the plan per round replaces the plan if that ratio is below
   1 - ``margin`` and it was faster in at least 2/3 of the rounds (on VGG-16 the per-round
   ratios of equal builds spread over 0.94-1.04).

Given a file (``save_to``; the tuner's refine.json), each unit is kept there as it finishes,
the file replaced whole each time: every build (its library in the folder beside the file,
``refine-builds/`` for ``refine.json``, or the crash that left it out), each build's per-layer
times in each lap, the mix's, and each end-to-end round. A kill loses at most the unit under
way; a later call with the same plan, target and input goes on from the file (with the
rounds it asks for), and a finished file holds the report (the libraries removed), which such
a call returns.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import tvm

from ..algorithms import get_algorithm
from ..algorithms.dense import DENSE_SPLITS
from ..cache import write_atomically
from ..compile import Build, build_many
from ..frontend import Model
from ..measure import Progress, time_calls
from ..plan import Plan
from ..target import make_target
from ..worker import CandidateCrash

LAPS = 3  # interleaved rounds of per-layer times
FORMAT = 3  # of refine.json's units: a file of another format is refined afresh
ROUND_SLACK = 0.05  # how much more than the fastest build's calls a build may sum to and be timed in rounds
NCHW_BUILD = "all nchw"  # the plan with its blocked layers back in NCHW (in_nchw)
BLOCKS_BUILD = "all blocks"  # the plan with its layers that could take blocks in blocks (in_blocks)
DENSE_BUILD = "sparse layers dense"  # the plan with its sparse layers on the dense kernel (with_dense)
DENSE_BLOCKS_BUILD = "all dense in blocks"  # "all blocks" with its sparse layers on the dense kernel too
PREDICTED_BUILD = "predicted"  # the plan the cost model predicts, built beside a tuned or given one


def in_model_ms(b: Build, x: tvm.runtime.Tensor, runs: int = 20) -> dict:
    """Inside the model built as ``b``: {"layers": {layer key: median ms of its kernel calls per
    inference}, "calls": median ms per inference of all its calls (the conv layers, the layout
    transforms and the rest of the graph; the VM's own time between calls left out)}.

    b.kernels names the layers that call each kernel in call order, so a kernel's j-th call in
    an inference is its j-th layer's (stages.LAYERS_ATTR)."""
    calls: dict[str, list[float]] = {}
    every = time_calls(b.vm(), x, runs)
    for name, t in every:
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
    # every inference makes the same calls in the same order
    per_run = np.asarray([t for _, t in every]).reshape(runs, -1).sum(axis=1)
    return {"layers": {key: float(np.median(t)) * 1e3 for key, t in total.items()},
            "calls": float(np.median(per_run)) * 1e3}


def with_splits(plan: Plan, splits: dict[str, str]) -> Plan:
    """A copy of ``plan`` with the knob ``split`` of the layers in ``splits`` set."""
    p = copy.deepcopy(plan)
    for l in p.layers:
        if l.key in splits:
            l.knobs = {**l.knobs, "split": splits[l.key]}
    return p


def with_dense(plan: Plan, keys) -> Plan:
    """A copy of ``plan`` with the sparse layers ``keys`` on the dense kernel: in channel blocks
    on their note's "dense_blocks_knobs" when the layouts phase timed them so (no transform
    around them then), else in NCHW on its "dense_knobs" (their sparse choice kept in the note
    as "sparse")."""
    p = copy.deepcopy(plan)
    for l in p.layers:
        if l.key in keys:
            l.note = {**l.note, "sparse": {"algorithm": l.algorithm, "knobs": l.knobs}}
            l.algorithm, l.knobs = "dense", dict(l.note.get("dense_blocks_knobs") or l.note["dense_knobs"])
    return p


def in_nchw(plan: Plan) -> Plan:
    """A copy of ``plan`` with each dense layer the tuner's layouts phase put in channel blocks
    back on the knobs it had in NCHW (its note's "nchw_knobs"), and a sparse layer it put on
    dense in blocks back on its sparse algorithm (its note's "nchw_algorithm")."""
    p = copy.deepcopy(plan)
    for l in p.layers:
        if "nchw_knobs" in l.note:
            l.knobs = dict(l.note["nchw_knobs"])
            l.algorithm = l.note.get("nchw_algorithm", l.algorithm)
    return p


def in_blocks(plan: Plan) -> Plan:
    """A copy of ``plan`` with each layer the layouts phase left in NCHW though its algorithm
    could take channel blocks on its knobs there (its note's "blocks_knobs"), its NCHW knobs kept
    in the note as "nchw_knobs" (so in_nchw undoes it)."""
    p = copy.deepcopy(plan)
    for l in p.layers:
        if "blocks_knobs" in l.note:
            knobs = dict(l.note["blocks_knobs"])
            l.note = {**{k: v for k, v in l.note.items() if k != "blocks_knobs"}, "nchw_knobs": l.knobs}
            l.knobs = knobs
    return p


# the builds of another layout: their base plan
LAYOUT_BUILDS = {NCHW_BUILD: in_nchw, BLOCKS_BUILD: in_blocks, DENSE_BLOCKS_BUILD: in_blocks}


def beside_prediction(plan: Plan, predicted: Plan | None) -> dict[str, Plan]:
    """refine_plan's ``others`` that put the cost model's prediction beside ``plan``: {} when
    there is none or it is ``plan`` itself (the same algorithm and knobs on every layer)."""
    if predicted is None or [(l.algorithm, l.knobs) for l in predicted.layers] == [
            (l.algorithm, l.knobs) for l in plan.layers]:
        return {}
    return {PREDICTED_BUILD: predicted}


def variant(plan: Plan, v: dict) -> Plan:
    """``plan`` with a build's variant: {"splits": {key: split}, "dense": [sparse keys made dense]}."""
    return with_splits(with_dense(plan, v["dense"]), v["splits"])


def apply_report(plan: Plan, report: dict, others: dict[str, Plan] | None = None) -> Plan:
    """``plan`` with a refine report's chosen splits and sparse layers made dense (in the
    layouts of "all nchw" or "all blocks" if it chose one), each such layer's in-model ms in its
    note; or, if it chose one of ``others`` (refine_plan's), that plan."""
    chosen = {"splits": report["splits"], "dense": report.get("dense", [])}
    if report["chosen"] in (others or {}):
        base = others[report["chosen"]]
    else:
        base = LAYOUT_BUILDS.get(report["chosen"], lambda p: p)(plan)
    out = variant(base, chosen)
    out.model = {**out.model, "refined": report["chosen"]}  # the build refine kept, end to end
    layer = next((b["layer_ms"] for b in report["builds"] if b["name"] == report["chosen"]), {})
    for l in out.layers:
        if (l.key in chosen["splits"] or l.key in chosen["dense"]) and l.key in layer:
            l.note = {**l.note, "in_model_ms": layer[l.key]}
    return out


def dense_splits(model: Model, plan: Plan, applied: dict[str, str], target) -> dict[str, str]:
    """{key: resolved split} of the layers the plan puts on the dense kernel and a build of it
    rewrote (``applied``: Build.applied)."""
    sites = {s.key: s for s in model.sites}
    dense = get_algorithm("dense")
    return {l.key: dense.knobs(sites[l.key].spec, l.knobs, target)["split"] for l in plan.layers
            if l.algorithm == "dense" and applied.get(l.key) == "dense"}


class Saved:
    """refine's finished units in the file ``path`` (the module docstring), or in memory only
    when ``path`` is None. ``key`` names what they were measured for; a file made for another
    key, or unreadable, is started afresh (``log`` says why). ``report`` is a finished file's
    report, else None; ``units`` the unfinished one's: {"builds": {name: record}, "laps": [{name:
    in_model_ms}] * LAPS, "mix_ms": in_model_ms or None, "round_ms": [{name: ms}]}."""

    def __init__(self, path: str | None, key: dict, log):
        self.path, self.key = path, key
        self.dir = os.path.splitext(path)[0] + "-builds" if path else None
        self.report = None
        self.units = {"builds": {}, "laps": [{} for _ in range(LAPS)], "mix_ms": None, "round_ms": []}
        old = None
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    old = json.load(f)
            except ValueError as e:
                log(f"refine: {path} is unreadable ({e}); refining from the start")
            if isinstance(old, dict) and any(old.get(k) != v for k, v in key.items()):
                log(f"refine: {path} was made for another plan, target, input or format; refining from the start")
                old = None
        going_on = isinstance(old, dict) and isinstance(old.get("progress"), dict)
        if going_on:
            self.units.update(old["progress"])
        elif isinstance(old, dict) and {"splits", "builds", "chosen"} <= set(old):
            self.report = {k: v for k, v in old.items() if k not in key}
        if self.dir and os.path.isdir(self.dir):
            if not going_on:  # libraries of another plan, or of a finished refine
                shutil.rmtree(self.dir, ignore_errors=True)
            else:  # builds a kill cut short (compile.build_isolated's temp folders)
                for d in os.listdir(self.dir):
                    if d.startswith(".tvms-build-"):
                        shutil.rmtree(os.path.join(self.dir, d), ignore_errors=True)

    def save(self) -> None:
        if self.path:
            write_atomically(self.path, lambda f: json.dump({**self.key, "progress": self.units}, f, indent=1))

    def library(self, name: str) -> str | None:
        """Where the build ``name``'s library is kept (None in memory)."""
        return os.path.join(self.dir, name.replace(" ", "_") + ".so") if self.dir else None

    def build(self, name: str, v: dict):
        """(True, the Build or None if it crashed) of a build an earlier call finished as this
        variant ``v`` (refine.variant); (False, None) if there is none."""
        rec = self.units["builds"].get(name)
        if rec is None or rec.get("variant") != v:
            return False, None
        if "crash" in rec:
            return True, None
        lib = os.path.join(self.dir, rec["library"])
        if not os.path.isfile(lib):
            return False, None
        kernels = {k: (tuple(v[0]), v[1]) for k, v in rec["kernels"].items()}
        return True, Build(tvm.runtime.load_module(lib), rec["applied"], kernels)

    def add_build(self, name: str, v: dict, b: Build | None, compile_s: float, crash: str | None = None) -> None:
        rec = {"variant": v, "compile_s": round(compile_s, 3), "built_at": time.time()}
        if b is None:
            rec["crash"] = crash
        else:
            rec.update(library=os.path.basename(self.library(name)) if self.dir else None, applied=b.applied,
                       kernels=b.kernels)
        self.units["builds"][name] = rec
        self.save()

    def finish(self, report: dict) -> dict:
        """Keep the report (each build's compile_s and built_at added) in place of the units."""
        for b in report["builds"]:
            rec = self.units["builds"].get(b["name"], {})
            b.update({k: rec[k] for k in ("compile_s", "built_at") if k in rec})
        self.report = report
        if self.path:
            write_atomically(self.path, lambda f: json.dump({**self.key, **report}, f, indent=1))
            shutil.rmtree(self.dir, ignore_errors=True)
        return report


def refine_plan(model: Model, plan: Plan, x: np.ndarray, target, rounds: int = 7, runs: int = 20,
                margin: float = 0.02, log=lambda s: None, save_to: str | None = None,
                others: dict[str, Plan] | None = None) -> tuple[Plan, dict]:
    """(the fastest of the plan and its variants end to end, a report).

    ``others``: {name: plan} built and timed beside them as they are (the tuner's: the plan the
    cost model predicts, so that a tune never ends slower than its prediction where refine can
    tell).

    ``x``: one real input (the model's input shape). Report: ``builds``, per build its name,
    median ms end to end (None if it was left out of the rounds), the median ms of all its calls
    per inference, {layer key: in-model ms}, and its compile_s and built_at (time.time()
    when its compile ended); ``chosen``, the winner's name; ``splits``, its {layer key: split}
    of the dense layers, and ``dense``, its sparse layers made dense; ``mix`` and ``mix_dense``,
    the same of the per-layer fastest; ``round_ms``, every round's end-to-end
    ms per build. ``save_to``: a file that keeps each unit as it finishes (module docstring)."""
    if rounds < 1 or runs < 1:
        raise ValueError(f"rounds and runs must be >= 1, got {rounds} and {runs}")
    target = make_target(target)
    x = np.ascontiguousarray(x, np.float32)
    saved = Saved(save_to, {"base": [[l.key, l.algorithm, l.knobs] for l in plan.layers], "target": str(target),
                            "input": hashlib.sha1(x.tobytes()).hexdigest(), "runs": runs, "format": FORMAT,
                            "others": {n: [[l.key, l.algorithm, l.knobs] for l in o.layers]
                                       for n, o in (others or {}).items()}}, log)
    if saved.report is not None:
        log(f"refine: done in an earlier run ({saved.report['chosen']}), reusing {os.path.basename(save_to)}")
        return apply_report(plan, saved.report, others), saved.report
    nothing = {"builds": [], "chosen": "plan", "splits": {}, "dense": [],
               "why": "no layer on the dense kernel, and no sparse layer with dense knobs"}
    applied = {l.key: l.algorithm for l in plan.layers}  # what the plan asks for, before any build
    requested = dense_splits(model, plan, applied, target)
    sparse = [l.key for l in plan.layers if get_algorithm(l.algorithm).sparse
              and ("dense_knobs" in l.note or "dense_blocks_knobs" in l.note)]
    if not requested and not sparse and not others:  # nothing to compile for
        return plan, saved.finish(nothing)
    xt = tvm.runtime.tensor(x)
    variants = {"plan": {"splits": requested, "dense": []}}
    bases = {"plan": plan}
    if requested:
        for s in DENSE_SPLITS:
            variants[f"all {s}"] = {"splits": {k: s for k in requested}, "dense": []}
    if sparse:
        variants[DENSE_BUILD] = {"splits": requested, "dense": sparse}
    for name, note in ((NCHW_BUILD, "nchw_knobs"), (BLOCKS_BUILD, "blocks_knobs")):  # the layouts, in the model
        if any(note in l.note for l in plan.layers):
            bases[name] = LAYOUT_BUILDS[name](plan)
            variants[name] = {"splits": dense_splits(model, bases[name], applied, target), "dense": []}
    if sparse and BLOCKS_BUILD in variants:
        bases[DENSE_BLOCKS_BUILD] = bases[BLOCKS_BUILD]
        variants[DENSE_BLOCKS_BUILD] = {"splits": variants[BLOCKS_BUILD]["splits"], "dense": sparse}
    for name, other in (others or {}).items():
        bases[name], variants[name] = other, {"splits": {}, "dense": []}
    p = Progress("refine", len(variants) + 3 + rounds)  # + the per-layer laps, the mix and its times
    builds = {}

    def add(named: dict[str, tuple[dict, Plan]]) -> None:
        """Compile each of ``named`` ({name: (variant, base plan)}) as its variant, or take an
        earlier call's; compile.build_many runs them side by side, one per core, and each is kept
        as it finishes. One that crashes LLVM is left out, except the plan itself, whose crash
        ends refine."""
        todo = {}
        for name, (v, base) in named.items():
            done, b = saved.build(name, v)
            if not done:
                todo[name] = variant(base, v)
                continue
            p.step(f"reused: {name}" if b is not None else f"left out in an earlier run: {name}")
            if b is not None:
                builds[name] = b
        for name, b, seconds in build_many(model, todo, target, paths={n: saved.library(n) for n in todo}):
            v = named[name][0]
            if isinstance(b, CandidateCrash):
                if name == "plan":
                    raise b
                saved.add_build(name, v, None, seconds, crash=str(b))
                p.step(f"left out: {name} ({b})")
                log(f"refine: the build {name!r} crashed and is left out: {b}")
                continue
            saved.add_build(name, v, b, seconds)
            builds[name] = b
            p.step(f"compiled: {name}")

    add({name: (v, bases.get(name, plan)) for name, v in variants.items()})
    original = dense_splits(model, plan, builds["plan"].applied, target)  # the layers the rewrite took
    variants = {name: v for name, v in variants.items() if name in builds}
    # the per-layer times in interleaved laps too: the machine's drift must not pick a split
    laps = saved.units["laps"]
    for lap in laps:
        for name in variants:
            if name not in lap:
                lap[name] = in_model_ms(builds[name], xt, runs)
                saved.save()
    per_layer = {n: {k: float(np.median([lap[n]["layers"][k] for lap in laps])) for k in laps[0][n]["layers"]}
                 for n in variants}
    calls = {n: float(np.median([lap[n]["calls"] for lap in laps])) for n in variants}
    p.step("in the model, conv calls (all calls): " + ", ".join(f"{n} {sum(v.values()):.2f} ({calls[n]:.2f}) ms"
                                                               for n, v in per_layer.items()))
    built = [s for s in DENSE_SPLITS if f"all {s}" in per_layer]
    mix = {"splits": {k: min(built, key=lambda s: per_layer[f"all {s}"][k]) for k in original} if built
           else dict(requested),
           "dense": [k for k in sparse if per_layer.get(DENSE_BUILD, {}).get(k, math.inf)
                     < per_layer["plan"].get(k, math.inf)]}
    if built or mix["dense"]:
        add({"mix": (mix, plan)})
        if "mix" in builds:
            variants["mix"] = mix
    if "mix" in variants:
        if saved.units["mix_ms"] is None:
            saved.units["mix_ms"] = in_model_ms(builds["mix"], xt, runs)
            saved.save()
        per_layer["mix"], calls["mix"] = saved.units["mix_ms"]["layers"], saved.units["mix_ms"]["calls"]
        p.step("mix timed")
    fastest = min(t for n, t in calls.items() if n != "mix")  # the builds timed alike, in the laps
    behind = {n: t / fastest - 1 for n, t in calls.items()
              if n != "plan" and n not in (others or {}) and t > fastest * (1 + ROUND_SLACK)}
    if behind:
        log("refine: left out of the rounds, all calls slower than the fastest build's by "
            + ", ".join(f"{n} {100 * d:.0f} %" for n, d in behind.items()))
    names = [n for n in variants if n not in behind]
    done_rounds = saved.units["round_ms"]
    times = np.zeros((rounds, len(names)))
    for r in range(rounds):
        if r >= len(done_rounds):
            row = {}
            for name in names:
                fe = builds[name].vm().time_evaluator("main", tvm.cpu(), number=1, repeat=10, min_repeat_ms=100)
                row[name] = float(np.median(fe(xt).results)) * 1e3
            done_rounds.append(row)
            saved.save()
        times[r] = [done_rounds[r][n] for n in names]
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
    e2e = dict(zip(names, med.tolist()))
    report = {"builds": [{"name": n, "ms": e2e.get(n), "calls_ms": calls[n], "layer_ms": per_layer[n]}
                         for n in variants],
              "chosen": chosen, "splits": variants[chosen]["splits"], "dense": variants[chosen]["dense"],
              "mix": variants.get("mix", {}).get("splits", {}), "mix_dense": variants.get("mix", {}).get("dense", []),
              "round_ms": {n: times[:, j].tolist() for j, n in enumerate(names)}}
    return apply_report(plan, report, others), saved.finish(report)
