"""Compile a whole model: rewrite its conv layers per plan, schedule the rest, build, export."""
from __future__ import annotations

import tvm
from tvm import relax

from .frontend import Model, load_model
from .graph import find_conv_sites
from .passes import RewriteConv2D
from .passes.parallelize_rest import ParallelizeRest
from .plan import Plan
from .target import make_target


def resolve_plan(model: Model, plan=None, algorithm: str | None = None, target=None) -> Plan:
    """A Plan object from a Plan, a path, a dict, or a uniform ``algorithm`` (default "direct")."""
    if plan is not None and algorithm is not None:
        raise ValueError("give a plan or an algorithm, not both")
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    if plan is not None:
        return Plan.load(str(plan))
    return Plan.uniform(find_conv_sites(model.mod["main"]), algorithm or "direct", target,
                        {"source": model.source, "input_shape": list(model.input_shape)})


def lower(model: Model, plan: Plan, target, database=None) -> tuple[tvm.IRModule, dict]:
    """The Relax module with chosen convs rewritten and every other op scheduled.

    Returns (module, {layer key: algorithm applied}). Dense ops get the MetaSchedule
    database when one is given; GEMV/reductions (classifier heads) get dlight's CPU rules.
    """
    from tvm.s_tir import dlight as dl

    target = make_target(target)
    rewrite = RewriteConv2D(plan.choices(find_conv_sites(model.mod["main"])), target)
    mod = rewrite(model.mod)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR()]
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
        if database is not None:
            from .tune.metaschedule import open_database

            with open_database(database):
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(mod)
        mod = ParallelizeRest()(mod)
    return mod, dict(rewrite.applied)


def _compile_to(model: Model, plan: dict, target: str, database, path: str) -> dict:
    """Worker job: lower and tvm.compile ``model`` with ``plan``, export the library to ``path``;
    returns {layer key: algorithm applied}."""
    mod, applied = lower(model, Plan.from_dict(plan), target, database)
    tvm.compile(mod, target=make_target(target)).export_library(path)
    return applied


def build_isolated(model: Model, plan: Plan, target, database=None, worker=None):
    """(the compiled library as a runtime module, {layer key: algorithm applied}), compiled in
    a worker process (worker.py): an LLVM error in one build of a long ``bench`` or ``refine``
    becomes a CandidateCrash for that build, not the end of the process. The library is
    exported and loaded back, as a user's would be; run it with relax.VirtualMachine."""
    import os
    import shutil
    import tempfile

    from .worker import Cached, shared_worker

    d = tempfile.mkdtemp(prefix="tvms-build-")
    try:
        path = os.path.join(d, "model.so")
        applied = (worker or shared_worker()).call(_compile_to, Cached(model), plan.to_dict(),
                                                    str(make_target(target)), database, path)
        return tvm.runtime.load_module(path), applied
    finally:
        shutil.rmtree(d, ignore_errors=True)  # the loaded library stays mapped


def compile(model, target=None, plan=None, algorithm: str | None = None, database=None,
            input_shape=None) -> tvm.runtime.Executable:
    """tvm.compile a model (ONNX path, ExportedProgram, Relax IRModule or Model) with a plan.

    ``plan`` is a Plan, a plan file or dict; or ``algorithm`` names one algorithm for every
    layer that supports it ("dense", "cpo", ...; "direct" = TVM's own conv2d everywhere).
    The result runs with ``relax.VirtualMachine(ex, tvm.cpu())`` and exports with
    ``ex.export_library("model.so")``.
    """
    m = model if isinstance(model, Model) else load_model(model, input_shape)
    target = make_target(target)
    mod, _ = lower(m, resolve_plan(m, plan, algorithm, target), target, database)
    return tvm.compile(mod, target=target)
