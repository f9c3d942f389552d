"""MetaSchedule (XGBoost cost model) for the dense, static-loop stages: tune and apply.

Only stages marked ``tunable`` (TE compute with static loops: topi conv2d, im2col and MEC
lowerings and GEMMs) go to MetaSchedule; sparse kernels have data-dependent loops that it
cannot tune, and are hand-scheduled with knobs instead.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable

import tvm
from tvm.s_tir import meta_schedule as ms

from ..algorithms.base import Stage


def _task_mod(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    # the form tune_tir (and Relax's MetaScheduleApplyDatabase) hash a task by
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


def open_database(database) -> ms.database.Database:
    """A MetaSchedule database, or a work dir holding database_{workload,tuning_record}.json."""
    if isinstance(database, ms.database.Database):
        return database
    path = os.fspath(database)
    files = [os.path.join(path, f) for f in ("database_workload.json", "database_tuning_record.json")]
    if not os.path.isdir(path) or not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"{path} is not a MetaSchedule JSON database (needs {', '.join(map(os.path.basename, files))})")
    try:
        return ms.database.JSONDatabase(path_workload=files[0], path_tuning_record=files[1], allow_missing=False)
    except Exception as e:  # a truncated or foreign file: say which
        raise ValueError(f"cannot read the MetaSchedule database in {path}: {e}") from e


@contextlib.contextmanager
def stdout_to_stderr():
    """MetaSchedule logs to stdout (from C++ too): keep stdout for results such as --json."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def tune_stages(stages: Iterable[Stage], target, work_dir: str, trials: int, seed: int = 0,
                runner="local", names: Iterable[str] | None = None):
    """Tune every tunable stage with ``trials`` trials in all; returns the database (or None).

    The stages are tuned in the form a rewritten Relax module holds them (stage_func), so
    the database serves both a single layer and a whole-model compile.
    """
    from ..passes.rewrite_conv2d import stage_func

    stages = list(stages)
    names = list(names) if names is not None else [f"t{i}_{st.name}" for i, st in enumerate(stages)]
    funcs = {n: stage_func(st) for n, st in zip(names, stages) if st.tunable}
    if not funcs or trials <= 0:
        return None
    os.makedirs(work_dir, exist_ok=True)
    with stdout_to_stderr():
        return ms.tune_tir(
            tvm.IRModule(funcs), target, work_dir, max_trials_global=trials,
            num_trials_per_iter=min(16, trials),
            runner=runner,
            # LocalBuilder's 30 s default kills builds on 2 loaded cores
            builder=ms.builder.LocalBuilder(timeout_sec=300),
            cost_model=ms.cost_model.XGBModel(extractor=ms.feature_extractor.PerStoreFeature(),
                                              adaptive_training=True),
            database="json", num_tuning_cores=int(target.attrs.get("num-cores", 1)), seed=seed)


def schedule_stage(st: Stage, database, target) -> tvm.tirx.PrimFunc:
    """The best recorded schedule of a stage, or its unscheduled function when there is none."""
    from ..passes.rewrite_conv2d import stage_func

    func = stage_func(st)
    sch = ms.tir_integration.compile_tir(open_database(database), _task_mod(func), target)
    return st.func if sch is None else sch.mod["main"]


def apply_database(mod: tvm.IRModule, stages, algorithm, database, target) -> tvm.IRModule:
    """Replace every tunable stage of ``mod`` (named ``<algorithm>_<stage>``) by its tuned schedule."""
    from ..build import stage_symbol

    db = open_database(database)
    funcs = dict(mod.functions_items())
    out = {}
    for gv, f in funcs.items():
        out[gv.name_hint] = f
    for st in stages:
        if st.tunable:
            sym = stage_symbol(algorithm, st)
            out[sym] = schedule_stage(st, db, target).with_attr("global_symbol", sym)
    return tvm.IRModule(out)
