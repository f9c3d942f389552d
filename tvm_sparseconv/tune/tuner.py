"""The autotuner: per conv workload, measure candidate algorithms on real activations, tune
their knobs (MetaSchedule for the dense TE stages; for the hand-scheduled kernels, the cost
model's most promising candidates, or with ``search="exhaustive"`` a fixed number of configs of
every algorithm) and pick the fastest, encode included.

The model search (the default) measures, per workload, the ``top_k`` candidates of every
algorithm's pool with the lowest predicted time and ``explore`` others at random; the
prediction is the shipped cost model's (cost_model.py), corrected by a small model refitted to
this run's measurements as they come (RefitModel), so that what is learnt on the first layers
steers the next ones.

Output, in the run folder: ``profile.json`` and ``activations.npz`` (each conv layer's recorded
inputs), ``trials.jsonl`` (every measured candidate, and each layout transform timed),
``database/`` (MetaSchedule JSON database), ``plan.json``, ``layouts.json`` (the layouts
chosen and what they cost, layouts.py), ``refine.json`` and ``report.md`` with plots.

The algorithms and tiles are chosen with every layer in NCHW, the close candidates of each layer
re-timed in interleaved rounds first (recheck); then the layouts (NCHW or
channel blocks) of the layers whose algorithm takes blocks (dense; grouped on depthwise
layers) for the whole model, the transforms between them counted
(layouts.py); then refine.

Each candidate is built, checked and timed in a child process (worker.py): one that crashes
(an LLVM fatal error, a segfault) or hangs is logged as failed and the tune goes on.

Every phase keeps its finished units as they finish, so that a run killed at any point and
resumed (a Tuner on the same run folder) loses at most the unit under way and repeats none
of the others: the profile (both files, written whole once it is done, and reused while the
samples are the same), MetaSchedule's trials (its database; a resumed search gets the budget
the records leave), each measurement (trials.jsonl), and each refine build, lap and round
(refine.json, refine.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, replace

import numpy as np

from .. import interrupt
from ..algorithms import ALGORITHMS, DENSE, METASCHEDULE, dense_fallback, get_algorithm
from ..build import CACHE_MODES
from ..cache import write_atomically
from ..cpu import cpu_of
from ..frontend import Model
from ..layout import NCHW
from ..measure import Progress, tolerance
from ..passes import LayoutGraph
from ..plan import Plan, PlanLayer
from ..profile import channel_stats, profile
from ..target import make_target
from ..worker import Cached, CandidateCrash, shared_worker
from .jobs import measure_candidate, measure_transform, time_in_rounds
from .cost_model import Candidate, CostModelError, Density, RefitModel, load_cost_model
from .layouts import TRANSFORM, assign, assignment_cost, blocked_notes, fastest_per_pair, finite, layout_options
from .log import TuningLog, knob_key
from .predict import model_plan
from .space import (EXPLORE, KNOB_TRIALS, MARGIN, TOP_K, candidates, choose, contenders, dense_alternative, in_nchw,
                    supports)
from .workloads import Workload, extract_workloads

SEARCHES = ("model", "exhaustive")
# The share of --budget-minutes by whose end each phase stops starting measurements: a phase that
# finishes early leaves the rest to the next. The layouts phase keeps its own share because it is
# where a model gains most (EfficientNet-B0 with 8 minutes on a Xeon: the measure phase spent
# them all, 78 of 81 layers stayed in NCHW, 8.34 ms against the predicted plan's 6.73). Refine
# runs after the budget: its builds are few and it is what checks the plan inside the model.
BUDGET_SHARES = {"measure": 0.6, "recheck": 0.7, "layouts": 1.0}


@dataclass
class TuneConfig:
    trials: int = 0                # MetaSchedule trials in all, for the dense TE stages
    knob_trials: int = KNOB_TRIALS  # exhaustive: configs measured per (workload, hand-scheduled kernel),
                                    # of a pool of 4x as many (space.candidates); the model's pool too
    search: str = "model"          # "model": per workload, the top_k candidates by the cost model and
                                   # ``explore`` random others; "exhaustive": knob_trials per algorithm
    top_k: int = TOP_K
    explore: int = EXPLORE
    cost_model: str | None = None  # the prior of the model search (None: the shipped model)
    budget_minutes: float | None = None
    algorithms: tuple = ALGORITHMS
    margin: float = MARGIN         # share by which sparse must beat dense, and knobs their defaults
    repeat: int = 5
    cache: str = "fresh"           # what the caches hold when a candidate runs: CompiledLayer.time
    layouts: bool = True           # then choose the layers' layouts, NCHW or channel blocks (layouts.py)
    refine: bool = True            # then choose the dense layers' thread splits inside the model
    refine_rounds: int = 7         # refine's interleaved end-to-end rounds
    recheck_rounds: int = 5        # the close candidates of each layer, then its fastest per layout pair,
                                   # re-timed in this many interleaved rounds (Tuner.recheck,
                                   # Tuner._recheck_pairs; 0: not re-timed)
    rpc: tuple | None = None       # (host, port, key)
    seed: int = 0
    candidate_timeout: float | None = None  # s per candidate; None: worker.py's default (600)


class Tuner:
    def __init__(self, model: Model, samples, run_dir: str, target=None, config: TuneConfig | None = None,
                 model_name: str | None = None, log=lambda s: None):
        self.model, self.samples, self.run_dir = model, samples, run_dir
        self.target = make_target(target)
        self.cfg = config or TuneConfig()
        self.say = log
        if self.cfg.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cfg.cache!r}")
        if self.cfg.refine_rounds < 1:
            raise ValueError(f"refine_rounds must be >= 1, got {self.cfg.refine_rounds}")
        if self.cfg.recheck_rounds < 0:
            raise ValueError(f"recheck_rounds must be >= 0 (0: no recheck), got {self.cfg.recheck_rounds}")
        if self.cfg.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.cfg.search!r}")
        if self.cfg.top_k < 1 or self.cfg.explore < 0:
            raise ValueError(f"top_k must be >= 1 and explore >= 0, got {self.cfg.top_k} and {self.cfg.explore}")
        if self.cfg.rpc and self.cfg.cache == "fresh":  # the refresh is a callback into this process
            self.cfg = replace(self.cfg, cache="cold")
            log("RPC: candidates are timed cold (inputs cannot be refreshed on a remote server)")
        os.makedirs(run_dir, exist_ok=True)
        for f in os.listdir(run_dir):  # a file a kill cut short while it was written (cache.write_atomically)
            if f.endswith(".tmp"):
                os.remove(os.path.join(run_dir, f))
        self.db_dir = os.path.join(run_dir, "database")
        self.trials = TuningLog(os.path.join(run_dir, "trials.jsonl"),
                                {"model": model_name or os.path.basename(str(model.source)),
                                 "input_shape": list(model.input_shape), "target": str(self.target),
                                 "cache": self.cfg.cache, "cpu": cpu_of(self.target).to_dict()}, warn=log)
        prior = None
        if self.cfg.search == "model":
            try:
                prior = load_cost_model(self.cfg.cost_model)
            except CostModelError as e:
                if self.cfg.cost_model is not None:  # a model asked for by name: its error, not a fallback
                    raise
                log(f"{e}: measuring every algorithm's knobs instead (the exhaustive search)")
                self.cfg = replace(self.cfg, search="exhaustive")
        self.cost = RefitModel(prior, self.cfg.seed)
        self.cpu = cpu_of(self.target)
        self._density: dict[str, Density] = {}
        self.start = time.monotonic()
        if self.cfg.rpc:  # a wrong tracker address fails here, not as every candidate's error
            from tvm import rpc

            rpc.connect_tracker(self.cfg.rpc[0], int(self.cfg.rpc[1])).close()

    def spent(self, phase: str) -> bool:
        """Whether ``phase``'s share of the budget (BUDGET_SHARES) has passed; never without one."""
        b = self.cfg.budget_minutes
        return bool(b) and time.monotonic() > self.start + 60 * b * BUDGET_SHARES[phase]

    # -- phases ------------------------------------------------------------------------------
    def run(self) -> Plan:
        """Every phase, then the report; a Ctrl-C (or SIGINT) is a KeyboardInterrupt, also when TVM
        handed it back as another error (interrupt.py)."""
        with interrupt.watching():
            try:
                return self._run()
            except Exception:
                interrupt.check()
                raise

    def _run(self) -> Plan:
        workloads = self.profile()
        if self.cfg.trials > 0 and any(a in METASCHEDULE for a in self.cfg.algorithms):
            self.metaschedule(workloads)
        self.measure(workloads)
        self.recheck(workloads)
        plan = self.select(workloads)
        if self.cfg.layouts:
            plan = self.layouts(plan)
        if self.cfg.refine:
            plan = self.refine(plan)
        from .report import write_report

        write_report(self.run_dir)
        return plan

    def profile(self) -> list[Workload]:
        """Each conv layer's inputs on the samples, as workloads; kept in profile.json and
        activations.npz (the latter written first: profile.json, naming the samples' digest, marks
        the pair done), and reused from them while the samples are the same."""
        sites = self.model.sites
        path, acts_path = os.path.join(self.run_dir, "profile.json"), os.path.join(self.run_dir, "activations.npz")
        digest = hashlib.sha1(b"".join(np.ascontiguousarray(x, np.float32).tobytes() for x in self.samples)).hexdigest()
        acts = self._saved_profile(path, acts_path, digest, sites)
        if acts is None:
            p = Progress("profile", 1)
            layers, acts, _ = profile(self.model, self.samples, self.target)
            write_atomically(acts_path, lambda f: np.savez(f, **{f"{s.key}/{j}": a for s, per in zip(sites, acts)
                                                                  for j, a in enumerate(per)}), binary=True)
            write_atomically(path, lambda f: json.dump({"samples": len(self.samples), "samples_sha1": digest,
                                                        "layers": [l.to_dict() for l in layers]}, f, indent=1))
            p.step(f"{len(layers)} conv layers")
        else:
            self.say("profile: done in an earlier run, reusing profile.json and activations.npz")
        self.workloads = extract_workloads(sites, acts)
        self.say(f"{len(sites)} conv layers -> {len(self.workloads)} workloads")
        return self.workloads

    def _saved_profile(self, path: str, acts_path: str, digest: str, sites) -> list[list[np.ndarray]] | None:
        """The activations an earlier run of these samples kept, per layer and sample, or None."""
        try:
            with open(path) as f:
                if json.load(f).get("samples_sha1") != digest:
                    return None
            with np.load(acts_path) as z:
                acts = [[z[f"{s.key}/{j}"] for j in range(len(self.samples))] for s in sites]
        except (OSError, ValueError, KeyError, AttributeError):  # none, another model, or unreadable
            return None
        if any(a.shape != tuple(s.spec.x_shape) for s, per in zip(sites, acts) for a in per):
            return None
        return acts

    def metaschedule(self, workloads: list[Workload]) -> None:
        """One MetaSchedule run over the TE stages of every (workload, direct/im2col/mec)."""
        if "metaschedule" in self.trials.done_phases:
            self.say("MetaSchedule: done in an earlier run, reusing database/")
            return
        from .metaschedule import database_trials, tune_stages

        stages, names = [], []
        for w in workloads:
            for a in METASCHEDULE:
                if a not in self.cfg.algorithms or not self._supports(a, w):
                    continue
                for st in get_algorithm(a).stages(w.spec, w.epilogue, {}, self.target):
                    if st.tunable:
                        stages.append(st)
                        names.append(f"{a}_{st.name}_{len(names)}")
        done = database_trials(self.db_dir, self.say)
        left = self.cfg.trials - done
        if left <= 0:
            self.trials.mark_done("metaschedule")
            self.say(f"MetaSchedule: done in an earlier run ({done} trials in database/)")
            return
        p = Progress("metaschedule", 1)
        self.say(f"MetaSchedule: {left} trials over {len(stages)} tasks (XGBoost cost model)"
                 + (f", after {done} in database/ from an earlier run" if done else ""))
        runner = "local"
        if self.cfg.rpc:
            from tvm.s_tir import meta_schedule as ms

            host, port, key = self.cfg.rpc
            runner = ms.runner.RPCRunner(ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                                             tracker_key=key, session_timeout_sec=300))
        # another seed after a resume: the same one would sample the measured schedules again
        tune_stages(stages, self.target, self.db_dir, left, self.cfg.seed + done, runner, names)
        self.trials.mark_done("metaschedule")
        p.step("database written")

    def _supports(self, algorithm: str, w: Workload) -> bool:
        return supports(algorithm, w.spec, w.why_dense)

    def candidates(self, w: Workload) -> list[tuple[str, list[dict]]]:
        return candidates(w.spec, w.why_dense, self.cfg.algorithms, self.target, self.cfg.knob_trials,
                          os.path.isdir(self.db_dir))

    def _candidate(self, w: Workload, a: str, knobs: dict) -> Candidate:
        """What the cost model is asked and told about measuring ``a`` with ``knobs`` on ``w``."""
        d = self._density.get(w.id)
        if d is None:  # the density profile of the workload's layers and samples, once
            d = self._density[w.id] = Density(w.density, float(np.std(w.densities)) if w.densities else 0.0,
                                              channel_stats(w.x)[1])
        return Candidate(a, knobs, w.spec, d, self.cpu, w.epilogue)

    def picks(self, w: Workload, cands: list[tuple[str, list[dict]]]) -> list[tuple[str, dict]]:
        """The model search's candidates of ``w``, in this order: the ``top_k`` with the lowest time
        predicted (the shipped model corrected by this run's measurements so far), the fastest
        predicted dense one (the margin needs a dense time), the defaults of every algorithm the
        model has no data on, then ``explore`` others drawn at random (seeded per workload, so a
        resumed run draws the same)."""
        pool = [(a, k) for a, ks in cands for k in ks]
        known = [i for i, (a, _) in enumerate(pool) if self.cost.knows(a)]
        pred = self.cost.log_ratio([self._candidate(w, *pool[i]) for i in known]) if known else None
        order = [known[j] for j in np.argsort(pred, kind="stable")] if pred is not None else known
        chosen = order[: self.cfg.top_k]
        dense = next((i for i in order if pool[i][0] in DENSE), None)
        unknown = {}
        for i, (a, _) in enumerate(pool):
            if not self.cost.knows(a):
                unknown.setdefault(a, i)  # its first: the defaults
        for i in ([dense] if dense is not None else []) + list(unknown.values()):
            if i not in chosen:
                chosen.append(i)
        rest = [i for i in range(len(pool)) if i not in chosen]
        chosen += random.Random(f"{self.cfg.seed}/{w.id}").sample(rest, min(self.cfg.explore, len(rest)))
        return [pool[i] for i in chosen]

    def measure(self, workloads: list[Workload]) -> None:
        """The model search in two passes over the workloads: each one's first pick and the
        fastest predicted dense one (the margin needs a dense time), then the rest of its picks;
        a budget spent early still leaves every workload its best predicted candidate."""
        if self.cfg.search == "exhaustive":
            return self._measure_exhaustive(workloads)
        pools = [(w, self.candidates(w)) for w in workloads]
        per = self.cfg.top_k + self.cfg.explore + 1  # + the dense one, + unknown algorithms' defaults
        est = [min(sum(len(c) for _, c in cands), per + sum(not self.cost.knows(a) for a, _ in cands))
               for _, cands in pools]
        p = Progress("measure", sum(est))
        refs = {}  # workload id -> its reference output between the passes
        first_pass = set()  # (workload id, algorithm, knob key) stepped in the first pass
        for first in (True, False):
            for (w, cands), n in zip(pools, est):
                picked = self.picks(w, cands)
                if first:
                    dense = next((c for c in picked if c[0] in DENSE), None)
                    picked = picked[:1] + ([dense] if dense is not None and dense is not picked[0] else [])
                keys = [(w.id, a, knob_key(k)) for a, k in picked]
                if not first:  # the estimate against the picks, which the first pass's times may change
                    p.total += len(picked) - n + sum(1 for k in first_pass if k[0] == w.id and k not in keys)
                ref = refs.pop(w.id, None)
                for (a, knobs), key in zip(picked, keys):
                    if key not in first_pass:
                        ref = self._measure_or_reuse(w, a, knobs, ref, p)
                if first:
                    first_pass.update(keys)
                    if ref is not None:
                        refs[w.id] = ref

    def _measure_or_reuse(self, w: Workload, a: str, knobs: dict, ref, p: Progress):
        """Measure one candidate unless the log holds it (or the budget is spent); tell the cost
        model its time. Returns the reference output, computed on first need."""
        rec = self.trials.find(w.id, a, knobs)
        if rec is None:
            if self.spent("measure"):
                p.step(f"{a}: budget spent, skipped")
                return ref
            if ref is None:
                ref = w.reference()
            rec = self._measure_one(w, a, knobs, ref)
            self.trials.append(rec)
        if rec.get("time_ms"):
            self.cost.add(self._candidate(w, a, knobs), rec["time_ms"])
        p.step(f"{w.id} {a} {rec.get('time_ms') or rec.get('error')}")
        return ref

    def _measure_exhaustive(self, workloads: list[Workload]) -> None:
        """Every algorithm, ``knob_trials`` configs each (the defaults and the cost model's pick of
        its pool)."""
        plan = [(w, a, cands) for w in workloads for a, cands in self.candidates(w)]
        total = sum(min(len(c), 1 if a in METASCHEDULE else self.cfg.knob_trials) for _, a, c in plan)
        p = Progress("measure", total)
        for w, a, cands in plan:
            ref = None
            n = 1 if a in METASCHEDULE else self.cfg.knob_trials
            order = self.cost.rank([self._candidate(w, a, k) for k in cands])
            picked = [cands[i] for i in order[:n]]
            if cands[0] not in picked:  # always measure the defaults
                picked = [cands[0]] + picked[:-1]
            for knobs in picked:
                ref = self._measure_or_reuse(w, a, knobs, ref, p)

    def _measure_one(self, w: Workload, a: str, knobs: dict, ref: np.ndarray) -> dict:
        """One candidate's trials record, measured in the worker (measure_candidate); a candidate
        that fails to build or run, crashes its process or hangs is recorded with its error."""
        rec = {"workload": w.id, "algorithm": a, "knobs": knobs, "density": w.density}
        try:
            rec.update(shared_worker().call(
                measure_candidate, a, w.spec, Cached(w.weight), w.bias, w.epilogue, str(self.target), knobs,
                self.db_dir if a in METASCHEDULE else None, Cached(w.x), Cached(ref), tolerance(w.spec, ref),
                self.cfg.repeat, self.cfg.cache, self.cfg.rpc, timeout=self.cfg.candidate_timeout))
        except Exception as e:
            interrupt.check()
            rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
            if isinstance(e, CandidateCrash):
                self.say(f"{w.id} {a} {knobs}: candidate crashed, recorded as failed: {e}")
        return rec

    def recheck(self, workloads: list[Workload]) -> None:
        """Per workload, its close candidates (space.contenders) built side by side in one worker
        job and timed in ``recheck_rounds`` interleaved rounds (jobs.time_in_rounds); the log keeps
        each one's times, and the selection takes their medians (TuningLog.timed).

        The measure phase times each candidate once, one after another, up to minutes apart; on a
        machine whose speed drifts (a VM's neighbours), two candidates a few percent apart rank by
        the minute they ran in. Timed in turn within seconds, they see the same machine."""
        rounds = self.cfg.recheck_rounds
        if rounds < 1:
            return
        todo = [(w, cs) for w in workloads if w.id not in self.trials.rechecks
                for cs in [contenders([r for r in self.trials.records if r["workload"] == w.id], w.spec, self.target)]
                if cs]
        if not todo:
            return
        p = Progress("recheck", sum(len(cs) for _, cs in todo))
        for w, cs in todo:
            if self.spent("recheck"):
                p.step(f"{w.id}: budget spent, not re-timed", n=len(cs))
                continue
            res = self._in_rounds(w, [(r["algorithm"], r["knobs"]) for r in cs])
            before = choose(self.trials.timed(w.id), w.spec, self.cfg.margin, self.target)[0]
            self.trials.append({"recheck": w.id, "rounds": rounds, "candidates": [
                {"algorithm": r["algorithm"], "knobs": r["knobs"], **x} for r, x in zip(cs, res)]})
            after = choose(self.trials.timed(w.id), w.spec, self.cfg.margin, self.target)[0]
            changed = after is not None and before is not None and (after["algorithm"], after["knobs"]) != (
                before["algorithm"], before["knobs"])
            p.step(f"{w.id}: {len(cs)} candidates in {rounds} rounds"
                   + (f", now {after['algorithm']} {after['knobs']} ({after['time_ms']:.3f} ms) in place of "
                      f"{before['algorithm']} {before['knobs']} ({before['time_ms']:.3f} ms alone)" if changed else ""),
                   n=len(cs))

    def _in_rounds(self, w: Workload, cands: list[tuple[str, dict]]) -> list[dict]:
        """jobs.time_in_rounds of the candidates [(algorithm, knobs)] of workload ``w`` in one
        worker job, ``recheck_rounds`` rounds: per candidate {"times_ms"} or {"error"}. A crash
        or hang of the whole job is said and gives every candidate its error: their single
        times stand."""
        worker = shared_worker()
        ref = w.reference()
        jobs = [(a, k, self.db_dir if a in METASCHEDULE else None) for a, k in cands]
        try:
            return worker.call(time_in_rounds, jobs, w.spec, Cached(w.weight), w.bias, w.epilogue, str(self.target),
                               Cached(w.x), Cached(ref), tolerance(w.spec, ref), self.cfg.repeat, self.cfg.cache,
                               self.cfg.recheck_rounds, self.cfg.rpc,
                               timeout=(self.cfg.candidate_timeout or worker.timeout) * len(cands))
        except Exception as e:
            interrupt.check()
            err = f"{type(e).__name__}: {str(e).strip()[-300:]}"
            self.say(f"{w.id}: re-timing failed, the single times stand: {err}")
            return [{"error": err}] * len(cands)

    def select(self, workloads: list[Workload]) -> Plan:
        """Per workload the fastest measured candidate with x and y in NCHW, by the medians of its
        recheck where it had one (TuningLog.timed); sparse must win by ``margin``. A workload the
        budget left unmeasured takes algorithms.dense_fallback's defaults; one whose every
        candidate failed, TVM's conv2d ("direct")."""
        sites = self.model.sites
        by_key = {}
        tried = {r.get("workload") for r in self.trials.records}
        for w in workloads:
            best, best_dense = choose(self.trials.timed(w.id), w.spec, self.cfg.margin, self.target)
            # (algorithm, knobs, the note's measured fields)
            choice = ("direct" if w.id in tried else dense_fallback(w.spec, w.why_dense), {},
                      {"time_ms": None, "dense_ms": None})
            if best is not None:
                measured = {"time_ms": best["time_ms"], "dense_ms": best_dense["time_ms"] if best_dense else None}
                alternative = dense_alternative(best, best_dense)
                if alternative is not None:
                    measured["dense_knobs"] = alternative
                choice = (best["algorithm"], best["knobs"], measured)
            for k in w.keys:
                by_key[k] = (w, choice)
        layers = []
        for s in sites:
            w, (algorithm, knobs, measured) = by_key[s.key]
            layers.append(PlanLayer(s.key, s.spec.to_dict(), algorithm, knobs,
                                    {"workload": w.id, "density": w.density, **measured}))
        plan = Plan(layers, json.loads(str(self.target)) if str(self.target).startswith("{") else None,
                    {"source": self.trials.header["model"], "input_shape": list(self.model.input_shape)},
                    cpu_of(self.target).to_dict())
        plan.save(os.path.join(self.run_dir, "plan.json"))
        return plan

    def layouts(self, plan: Plan) -> Plan:
        """The layouts for the whole model (layouts.py) of the layers whose algorithm can hold
        them in channel blocks (dense; grouped on depthwise layers), and of the sparse layers
        that dense could take in blocks instead: each (layout_in, layout_out) pair of each such
        workload timed alone, each transform an assignment could need timed alone, then the
        assignment with the least sum (fastest_per_pair: a sparse layer stays itself in NCHW).
        Writes plan.json (each such layer's knobs in its pair, its times per pair in the note;
        a sparse layer moved to dense keeps its algorithm as "nchw_algorithm") and
        layouts.json."""
        sites = self.model.sites
        cpu = cpu_of(self.target)
        by_key = {k: w for w in self.workloads for k in w.keys}
        work = {}  # (workload id, algorithm) -> (workload, {pair: [knobs]})
        options = {}  # layer key -> [(workload id, algorithm)]: its own, or dense in blocks for a sparse one
        of_workload = {}  # (workload id, algorithm) -> its options: the layers of a workload share them
        for l in plan.layers:  # an algorithm without layout knobs refuses every pair (pair_candidates)
            w = by_key.get(l.key)
            if w is None:
                continue
            if (w.id, l.algorithm) not in of_workload:
                # a sparse layer timed alone in NCHW against dense in NCHW may still lose to dense
                # in blocks (no transform around it, a flat-pixel gemm on 1x1 layers)
                dense_knobs = self._dense_knobs(w) if get_algorithm(l.algorithm).sparse else {}
                of_workload[(w.id, l.algorithm)] = layout_options(w.spec, w.why_dense, l.algorithm, l.knobs,
                                                                  dense_knobs, cpu)
            for a, cands in of_workload[(w.id, l.algorithm)].items():
                work.setdefault((w.id, a), (w, cands))
                options.setdefault(l.key, []).append((w.id, a))
        blocks = {l.key: l for l in plan.layers if options.get(l.key)}
        if not blocks:
            return plan
        if self.cfg.rpc:
            self.say("layouts: skipped (the transforms would be timed on this machine, the candidates ran over RPC)")
            return plan
        graph = LayoutGraph(self.model.mod["main"], plan.choices(sites), sites)
        p = Progress("layouts", sum(len(c) for _, cands in work.values() for c in cands.values()))
        best = {}  # (workload id, algorithm) -> {pair: (ms, knobs)}
        for wid, (w, cands) in work.items():
            algorithm = wid[1]
            ref = None
            for pair, knobs_list in cands.items():
                for knobs in knobs_list:
                    rec = self.trials.find(w.id, algorithm, knobs)
                    if rec is None:
                        if self.spent("layouts"):
                            p.step(f"{w.id} {pair}: budget spent, skipped")
                            continue
                        if ref is None:
                            ref = w.reference()
                        rec = self._measure_one(w, algorithm, knobs, ref)
                        self.trials.append(rec)
                    p.step(f"{w.id} {pair[0]}->{pair[1]} {rec.get('time_ms') or rec.get('error')}")
                    # the times this phase had before its own recheck, in a resumed run too: with
                    # that recheck's medians, a pair's fastest could be another candidate than the
                    # one re-timed, and the plan another than the one refine's kept builds were for
                    ms = self.trials.median_ms(rec, layouts=False)
                    if finite(ms) and ms < best.get(wid, {}).get(pair, (math.inf,))[0]:
                        best.setdefault(wid, {})[pair] = (ms, knobs)
        nchw_ms = self._recheck_pairs(work, best, {k: (by_key[k].id, l.algorithm, l.knobs) for k, l in blocks.items()})
        pick = {k: fastest_per_pair(l.algorithm, l.knobs, nchw_ms.get(k, l.note.get("time_ms")),
                                    {wid[1]: best.get(wid, {}) for wid in options[k]})
                for k, l in blocks.items()}  # layer key -> {pair: (ms, algorithm, knobs)}
        layer_ms = {k: {pair: v[0] for pair, v in pk.items()} for k, pk in pick.items()}
        transforms = {}  # (shape, src, dst) -> ms

        def transform_ms(shape, src, dst):
            return self._transform_ms(shape, src, dst, transforms)

        chosen, total = assign(graph, layer_ms, transform_ms)
        nchw_total = assignment_cost(graph, layer_ms, transform_ms)
        out = copy.deepcopy(plan)
        for l in out.layers:
            if l.key in chosen:
                ms, algorithm, knobs = pick[l.key][chosen[l.key]]
                l.note = {**l.note, "time_ms": ms,
                          "layout_ms": {f"{i}->{o}": t for (i, o), t in layer_ms[l.key].items()}}
                if chosen[l.key] != (NCHW, NCHW):  # refine builds the plan with them too (refine.in_nchw)
                    l.note["nchw_knobs"] = l.knobs
                    if algorithm != l.algorithm:
                        l.note["nchw_algorithm"] = l.algorithm
                else:  # refine builds it in blocks too (refine.in_blocks, refine.with_dense)
                    l.note.update(blocked_notes(l.algorithm, pick[l.key]))
                l.algorithm, l.knobs = algorithm, knobs
        moves = graph.transforms(chosen)
        to_dense = sum(1 for l in out.layers if "nchw_algorithm" in l.note)
        self.say(f"layouts: {sum(1 for pr in chosen.values() if pr != (NCHW, NCHW))} of {len(chosen)} layers "
                 f"in blocks ({to_dense} sparse ones now dense), {len(moves)} transforms; layers + transforms "
                 f"{total:.3f} ms against {nchw_total:.3f} ms all NCHW (each timed alone)")
        write_atomically(os.path.join(self.run_dir, "layouts.json"), lambda f: json.dump({
            "layouts": {k: list(v) for k, v in chosen.items()}, "ms": total, "nchw_ms": nchw_total,
            "transforms": [{"shape": list(sh), "src": a, "dst": b, "ms": transforms[(tuple(sh), a, b)]}
                           for sh, a, b in moves]}, f, indent=1))
        out.save(os.path.join(self.run_dir, "plan.json"))
        return out

    def _recheck_pairs(self, work: dict, best: dict, own: dict) -> dict[str, float]:
        """The layouts phase's recheck: per workload, the fastest candidate of each of its layout
        pairs (``best``: {(workload id, algorithm): {pair: (ms, knobs)}}) and its layers' own
        candidate in NCHW (``own``: {layer key: (workload id, algorithm, knobs)}) re-timed
        together in interleaved rounds, as Tuner.recheck does. ``best`` takes their medians in
        place, and loses a pair whose candidate failed while others were timed. Returns {layer
        key: the median of its own candidate}.

        The assignment weighs a layer's pairs against each other and against transforms, timed
        minutes apart: on a VM one layer's times were 0.81-2.45x apart from one minute to the
        next. A workload is re-timed once; a resumed run reads its rounds back."""
        rounds = self.cfg.recheck_rounds
        by_workload = {}  # workload id -> (workload, {(algorithm, knob key): (algorithm, knobs)})
        for (wid, a), (w, _) in work.items():
            cands = by_workload.setdefault(wid, (w, {}))[1]
            for _, k in best.get((wid, a), {}).values():
                cands.setdefault((a, knob_key(k)), (a, k))
        for wid, a, k in own.values():
            if wid in by_workload:
                by_workload[wid][1].setdefault((a, knob_key(k)), (a, k))
        todo = [(w, list(c.values())) for wid, (w, c) in by_workload.items()
                if len(c) > 1 and wid not in self.trials.layout_rechecks]
        if rounds >= 1 and todo:
            p = Progress("layouts recheck", sum(len(cs) for _, cs in todo))
            for w, cs in todo:
                if self.spent("layouts"):
                    p.step(f"{w.id}: budget spent, not re-timed", n=len(cs))
                    continue
                res = self._in_rounds(w, cs)
                self.trials.append({"recheck": w.id, "phase": "layouts", "rounds": rounds, "candidates": [
                    {"algorithm": a, "knobs": k, **x} for (a, k), x in zip(cs, res)]})
                p.step(f"{w.id}: {len(cs)} layout candidates in {rounds} rounds", n=len(cs))

        def median(wid, a, k):
            return self.trials.median_ms({"workload": wid, "algorithm": a, "knobs": k})

        for (wid, a), per_pair in best.items():
            rec = self.trials.layout_rechecks.get(wid, {"candidates": []})
            timed = any(c.get("times_ms") for c in rec["candidates"])
            failed = {knob_key(c["knobs"]) for c in rec["candidates"] if c["algorithm"] == a and "error" in c}
            for pair, (ms, k) in list(per_pair.items()):
                if timed and knob_key(k) in failed:
                    del per_pair[pair]
                else:
                    per_pair[pair] = (median(wid, a, k) or ms, k)
        return {key: m for key, (wid, a, k) in own.items() for m in [median(wid, a, k)] if m}

    def _dense_knobs(self, w: Workload) -> dict:
        """dense's fastest knobs measured on ``w`` in NCHW (its defaults if none was)."""
        recs = [r for r in self.trials.timed(w.id) if r["algorithm"] == "dense"
                and finite(r.get("time_ms")) and in_nchw("dense", w.spec, r["knobs"])]
        return min(recs, key=lambda r: r["time_ms"])["knobs"] if recs else {}

    def _transform_ms(self, shape, src: str, dst: str, cache: dict) -> float:
        """The time of a layout transform alone (measure_transform in the worker; trials.jsonl
        keeps it, workload "transform-NxCxHxW", algorithm TRANSFORM), inf if it failed."""
        key = (tuple(int(v) for v in shape), src, dst)
        if key not in cache:
            wid, knobs = "transform-" + "x".join(map(str, key[0])), {"src": src, "dst": dst}
            rec = self.trials.find(wid, TRANSFORM, knobs)
            if rec is None:
                rec = {"workload": wid, "algorithm": TRANSFORM, "knobs": knobs}
                try:
                    rec.update(shared_worker().call(measure_transform, key[0], src, dst, str(self.target),
                                                    self.cfg.repeat, self.cfg.cache,
                                                    timeout=self.cfg.candidate_timeout))
                except Exception as e:
                    interrupt.check()
                    rec["error"] = f"{type(e).__name__}: {str(e).strip()[-300:]}"
                self.trials.append(rec)
            cache[key] = rec["time_ms"] if finite(rec.get("time_ms")) else math.inf
        return cache[key]

    def _predicted(self) -> Plan | None:
        """The plan the cost model predicts for this model and target at the profiled densities
        (predict.model_plan), or None without a usable cost model."""
        try:
            cost = load_cost_model(self.cfg.cost_model)
        except CostModelError:
            return None
        with open(os.path.join(self.run_dir, "profile.json")) as f:
            layers = json.load(f)["layers"]
        densities = [Density(l["density_mean"], l["density_std"], l["zero_channel_share"]) for l in layers]
        return model_plan(self.model, cost, self.target, densities, f"profile of {len(self.samples)} samples")

    def refine(self, plan: Plan) -> Plan:
        """refine.refine_plan on the first sample, keeping its units in refine.json as they
        finish: a resumed run goes on from there, or reuses its report if it was done. Beside
        the plan's variants it builds the plan the cost model predicts ("predicted"): a tune
        whose times alone mislead it (on ResNet-50-half on the Emerald Rapids, its plan ran 1.10x
        the predicted one's time) ends no slower than the prediction, where refine can tell."""
        from .refine import beside_prediction, refine_plan

        if self.cfg.rpc:
            self.say("refine: skipped (it times the model on this machine, the candidates ran over RPC)")
            return plan
        others = beside_prediction(plan, self._predicted())
        refined, _ = refine_plan(self.model, plan, self.samples[0], self.target, rounds=self.cfg.refine_rounds,
                                 log=self.say, save_to=os.path.join(self.run_dir, "refine.json"), others=others)
        refined.save(os.path.join(self.run_dir, "plan.json"))
        return refined
