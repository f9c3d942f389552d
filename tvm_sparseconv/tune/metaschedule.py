"""MetaSchedule (XGBoost cost model) for the dense, static-loop stages: tuning them. Applying
the database is stages.apply_database.

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
from ..stages import stage_func


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
