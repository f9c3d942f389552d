"""Compile a whole model: rewrite its conv layers per plan, schedule the rest, build, export.

This is the one compile path; ``compile`` (api.py), ``bench``, ``profile``, ``refine``, the
tuner and the CLI all go through it:

    lower:  RewriteConv2D (the plan's layers become their algorithms' stages)
            -> LegalizeOps (sigmoid, SiLU and erf in registers: passes/fast_math.py; bilinear
            resize in two passes over index tables: passes/separable_resize.py), FuseOps,
            FuseTIR (the rest of the graph)
            -> the MetaSchedule database, if given -> dlight's CPU rules and ours
            (schedule_rules.py) -> ParallelizeRest -> ResidualInPlace (a layer with a
            residual writes over it when nothing reads it after)
    build:  lower -> tvm.compile (TVM's default Relax pipeline; the TIR pipeline
            "tvm_sparseconv": TVM's default with passes/stack_scratch.py) -> an Executable

``rewrite`` is lower's part for a Relax module of one's own: the Relax pipeline
``"tvm_sparseconv"`` (api.pipeline) runs it before TVM's default.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from .cpu import cpu_of
from .frontend import Model
from .graph import find_conv_sites
from .passes import RewriteConv2D, applied_layers, fast_math, layout_transforms, separable_resize
from .passes.parallelize_rest import ParallelizeRest
from .passes.residual_in_place import ResidualInPlace
from .passes.stack_scratch import TIR_PIPELINE
from .plan import Plan
from .schedule_rules import ColumnGEMV, OneReduction, RowGEMV, RowReduction
from .stages import apply_database, kernel_table, open_database
from .target import cross_compiler, export_library, make_target, runs_here, target_triple
from .worker import Cached, CandidateCrash, Worker, isolated, shared_worker


def resolve_plan(model: Model, plan=None, algorithm: str | None = None, target=None) -> Plan:
    """A Plan object from a Plan, a path, a dict, or a uniform ``algorithm`` (default "direct")."""
    return _resolve(model.sites, plan, algorithm, target,
                    {"source": model.source, "input_shape": list(model.input_shape)})


def _resolve(sites, plan, algorithm, target, model_info=None) -> Plan:
    if plan is not None and algorithm is not None:
        raise ValueError("give a plan or an algorithm, not both")
    if plan is None:
        return Plan.uniform(sites, algorithm or "direct", target, model_info)
    if isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    elif not isinstance(plan, Plan):
        plan = Plan.load(str(plan))
    why = plan.other_cpu(cpu_of(target))
    if why:
        warnings.warn(why)
    return plan


def _lowering(plan: Plan, sites, target, database) -> tvm.transform.Pass:
    """tvm-sparseconv's passes over a module whose ``main`` has the conv layers ``sites``; run
    them with ``target`` entered (dlight reads it from there). The plan is checked against the
    sites here, so that a PlanError reaches the caller as itself (raised inside a pass, it would
    come out as a RuntimeError)."""
    choices = plan.choices(sites)

    @tvm.transform.module_pass(opt_level=0, name="tvm_sparseconv.Lower")
    def lower_pass(mod: tvm.IRModule, ctx) -> tvm.IRModule:
        mod = RewriteConv2D(choices, target, sites=sites)(mod)
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps({**fast_math.legalize_map(), **separable_resize.legalize_map()}),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
        if database is not None:
            db = open_database(database)
            mod = apply_database(mod, db, target)  # our tunable stages (they carry layer attributes)
            with db:  # TVM's own ops, by structural hash
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        mod = dl.ApplyDefaultSchedule(ColumnGEMV(), RowGEMV(), RowReduction(), OneReduction())(mod)
        return ResidualInPlace()(ParallelizeRest()(mod))

    return lower_pass


def lower(model: Model, plan: Plan, target, database=None) -> tuple[tvm.IRModule, dict]:
    """The Relax module with the plan's convs rewritten and every other op scheduled, ready for
    tvm.compile; and {layer key: algorithm applied} ("direct" where TVM's conv2d stays).

    Dense ops get the MetaSchedule ``database`` when one is given; GEMV/reductions (classifier
    heads) get dlight's CPU rules."""
    target = make_target(target)
    with target:
        mod = _lowering(plan, model.sites, target, database)(model.mod)
    return mod, applied_layers(mod, model.sites)


@dataclass
class Build:
    """A compiled model: ``module`` (an Executable, or a loaded library from build_isolated) runs
    with ``relax.VirtualMachine(module, tvm.cpu())``; None when build_isolated built it for
    another architecture (the library is the file it exported: load it over RPC on a machine
    of that architecture); ``applied`` is {layer key: algorithm};
    ``kernels`` is stages.kernel_table of the module, {function name: (keys of the layers that
    call it in call order, algorithm)}, to map the calls of a VM instrument (measure.time_calls)
    to layers; ``transforms`` passes.layout_transforms of it, the layout transforms ``main``
    calls (empty when every layer is NCHW)."""

    module: object
    applied: dict
    kernels: dict
    transforms: list = field(default_factory=list)

    def vm(self) -> relax.VirtualMachine:
        """A VirtualMachine of the module on this machine's CPU (one, made on first use)."""
        if self.module is None:
            raise RuntimeError("this build is for another architecture than this machine's: load its exported "
                               "library on such a machine or over RPC (docs/arm.md)")
        if "_vm" not in self.__dict__:
            self._vm = relax.VirtualMachine(self.module, tvm.cpu())
        return self._vm

    def counts(self) -> str:
        """"dense 13, direct 1": how many layers each algorithm computes."""
        counts = {}
        for a in self.applied.values():
            counts[a] = counts.get(a, 0) + 1
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def build(model: Model, plan: Plan, target, database=None) -> Build:
    """lower, then tvm.compile: the Build of ``model`` with ``plan`` in this process."""
    target = make_target(target)
    mod, applied = lower(model, plan, target, database)
    return Build(tvm.compile(mod, target=target, tir_pipeline=TIR_PIPELINE), applied, kernel_table(mod),
                 layout_transforms(mod))


def _compile_to(model: Model, plan: dict, target: str, database, path: str,
                cc: str | None = None) -> tuple[dict, dict, list]:
    """Worker job: build ``model`` with ``plan``, export the library to ``path`` (linked by
    target.cross_compiler(target, cc) for another architecture); returns (applied, kernels,
    transforms). The kernel table goes to ``path + ".kernels.json"`` before tvm.compile runs,
    so that a compiler crash can be traced to the layers of the function it names."""
    target = make_target(target)
    mod, applied = lower(model, Plan.from_dict(plan), target, database)
    kernels = kernel_table(mod)
    with open(path + ".kernels.json", "w") as f:
        json.dump(kernels, f)
    export_library(tvm.compile(mod, target=target, tir_pipeline=TIR_PIPELINE), path, target, cc)
    return applied, kernels, layout_transforms(mod)


def _crashed_in(tail: str, kernels: dict, plan: Plan) -> str:
    """What a build that crashed the compiler was building, as far as its stderr ``tail`` and
    the ``kernels`` table tell: "layer conv001 (dense)" when LLVM names one of our functions
    ("In function: NAME", NAME or a name LLVM derived from it such as NAME_compute_), else
    "the model (its algorithms)", and the function LLVM named if it is not ours."""
    named = re.findall(r"In function: (\S+)", tail)
    if named:
        fn = named[-1]
        ours = [k for k in kernels if fn == k or fn.startswith(k + "_")]
        if ours:
            layers, algorithm = kernels[max(ours, key=len)]
            if layers:
                return f"layer{'s' if len(layers) > 1 else ''} {', '.join(layers)} ({algorithm})"
            return f"function {fn} ({algorithm})"
    algorithms = sorted({l.algorithm for l in plan.layers})
    where = f"the model ({', '.join(algorithms)})" if algorithms else "the model"
    return where + (f", in function {named[-1]}" if named else "")


def compiler_crash(e: CandidateCrash, kernels_path: str, plan: Plan) -> CandidateCrash:
    """The CandidateCrash ``e`` of a whole-model build, its message prefixed with what it was
    building (_crashed_in; the kernel table _compile_to left at ``kernels_path``, if any)."""
    try:
        with open(kernels_path) as f:
            kernels = json.load(f)
    except (OSError, ValueError):  # the build died before lowering was done
        kernels = {}
    return CandidateCrash(f"building {_crashed_in(e.tail, kernels, plan)}: {e}", tail=e.tail)


def build_isolated(model: Model, plan: Plan, target, database=None, worker=None, path: str | None = None,
                   timeout: float | None = None, cc: str | None = None) -> Build:
    """``build``, run in a worker process (worker.py): an LLVM error in one build of a long
    ``bench`` or ``refine``, or in the ``compile`` command, becomes a CandidateCrash naming what
    it was building (compiler_crash), not the end of the process. The library is exported and
    loaded back, as a user's would be.

    ``path``: where the library is kept (written whole or not at all: exported beside it, then
    renamed); None: a temp file, removed once loaded. ``timeout``: seconds (None: the worker's
    default, 600; math.inf: none).

    For a target of another architecture (an AArch64 ``mtriple`` on x86-64) the library is
    cross-linked (``cc``: the compiler, default target.cross_compiler's) and not loaded back:
    ``module`` is None and ``path`` is required."""
    target = make_target(target)
    local = runs_here(target)
    if path is None and not local:
        raise ValueError(f"a build for {target_triple(target)} does not run on this machine: "
                         "give the path to export its library to")
    cross_compiler(target, cc)  # no cross compiler: the error now, not after the model has compiled
    if path is not None:
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
    d = tempfile.mkdtemp(prefix=".tvms-build-", dir=os.path.dirname(path) if path else None)
    try:
        out = os.path.join(d, os.path.basename(path) if path else "model.so")
        try:
            applied, kernels, transforms = (worker or shared_worker()).call(
                _compile_to, Cached(model), plan.to_dict(), str(target), database, out, cc, timeout=timeout)
        except CandidateCrash as e:
            raise compiler_crash(e, out + ".kernels.json", plan) from None
        if path is not None:
            os.replace(out, path)
            out = path
        return Build(tvm.runtime.load_module(out) if local else None, applied, kernels, transforms)
    finally:
        shutil.rmtree(d, ignore_errors=True)  # the loaded library stays mapped


def build_jobs(n: int) -> int:
    """How many of ``n`` builds build_many runs at once: one per core of this machine (where
    the compiler runs, whatever the target), at most 4 (each holds a model's IR and LLVM's
    memory), and 1 when jobs run in this process (TVMS_IN_PROCESS=1: one TVM, one compile)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n, cores, 4)) if isolated() else 1


def build_many(model: Model, plans: dict[str, Plan], target, database=None, paths: dict | None = None,
               timeout: float | None = None):
    """build_isolated of each of ``plans`` ({name: Plan}), build_jobs of them at a time, each in
    its own worker: a model's compile is single-threaded (TVM's passes and LLVM's code
    generation), so on 2 cores two builds take about the time of one. Nothing should be timed
    on the machine while it runs.

    Yields (name, Build or the CandidateCrash that stopped it, compile seconds) in the order the
    builds finish, in the calling thread, so that the caller can keep each as it comes.
    ``paths``: {name: library path} (build_isolated's ``path``; None or absent: a temp file).
    A Ctrl-C or any error in the caller stops the workers under way and leaves nothing."""
    jobs = build_jobs(len(plans))
    if jobs == 1:
        for name, p in plans.items():
            t0 = time.monotonic()
            try:
                b = build_isolated(model, p, target, database, path=(paths or {}).get(name), timeout=timeout)
            except CandidateCrash as e:
                b = e
            yield name, b, time.monotonic() - t0
        return
    free = queue.SimpleQueue()
    spare = [Worker() for _ in range(jobs - 1)]
    for w in [shared_worker(), *spare]:
        free.put(w)

    def one(name: str, p: Plan):
        w = free.get()
        t0 = time.monotonic()
        try:
            return build_isolated(model, p, target, database, w, (paths or {}).get(name), timeout), t0
        except CandidateCrash as e:
            return e, t0
        finally:
            free.put(w)

    pool = ThreadPoolExecutor(jobs, thread_name_prefix="tvms-build")
    done = False
    try:
        futures = {pool.submit(one, name, p): name for name, p in plans.items()}
        for f in as_completed(futures):
            b, t0 = f.result()
            yield futures[f], b, time.monotonic() - t0
        done = True
    finally:
        pool.shutdown(wait=done, cancel_futures=True)
        if not done:  # the builds under way are killed: their threads end when the pipes close
            shared_worker().close()
        for w in spare:
            w.close()


def rewrite(mod: tvm.IRModule, plan=None, algorithm: str | None = None, target=None,
            database=None) -> tvm.IRModule:
    """``mod``'s ``main`` with its conv layers rewritten per ``plan`` (a Plan, plan file or dict
    made for this module), or with ``algorithm`` on every layer that supports it (neither:
    "direct", TVM's conv2d), and the rest of the graph scheduled: ``lower`` for a module of
    one's own, the Relax pipeline's part before TVM's default (api.pipeline). Run it with
    ``target`` entered."""
    sites = find_conv_sites(mod["main"])
    chosen = _resolve(sites, plan, algorithm, target)
    return _lowering(chosen, sites, target, database)(mod)  # a PlanError surfaces as a RuntimeError
