"""MetaSchedule (XGBoost cost model) for the dense, static-loop stages: tuning them. Applying
the database is stages.apply_database.

Only stages marked ``tunable`` (TE compute with static loops: topi conv2d, im2col and MEC
lowerings and GEMMs) go to MetaSchedule; sparse kernels have data-dependent loops that it
cannot tune, and are hand-scheduled with knobs instead.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import tempfile
from typing import Iterable

import tvm
from tvm.s_tir import meta_schedule as ms

from ..algorithms.base import Stage
from ..stages import DATABASE_FILES, stage_func
from ..target import export_library, runs_here
from .log import drop_torn_tail


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


def import_tensor_intrinsics() -> None:
    """Import tvm.s_tir.tensor_intrin, which MetaSchedule's TuneContext imports once per process,
    in 4-7 s rather than 25-34. Each of its ~500 TVMScript functions calls inspect.stack(), and
    inspect.getmodule scans all of sys.modules for every frame of a frozen module (importlib's,
    whose file names no path) as it finds none: their names go into inspect's file cache first,
    where the scan would find nothing."""
    cache = getattr(inspect, "modulesbyfile", None)  # CPython's, not a documented name: used if there
    if isinstance(cache, dict):
        for name, module in list(sys.modules.items()):
            if getattr(getattr(module, "__spec__", None), "origin", None) == "frozen":
                cache.setdefault(inspect.getabsfile(module, f"<frozen {name}>"), name)
    import tvm.s_tir.tensor_intrin  # noqa: F401


def tune_stages(stages: Iterable[Stage], target, work_dir: str, trials: int, seed: int = 0,
                runner="local", names: Iterable[str] | None = None):
    """Tune every tunable stage with ``trials`` trials in all; returns the database (or None).

    The stages are tuned in the form a rewritten Relax module holds them (stage_func), so
    the database serves both a single layer and a whole-model compile. For a target of another
    architecture (measured by an RPC ``runner``) each candidate is linked here by the cross
    compiler (_export_linked): MetaSchedule's default export is a tar of object files that the
    RPC server links, and a board need not have a compiler.
    """
    stages = list(stages)
    names = list(names) if names is not None else [f"t{i}_{st.name}" for i, st in enumerate(stages)]
    funcs = {n: stage_func(st) for n, st in zip(names, stages) if st.tunable}
    if not funcs or trials <= 0:
        return None
    os.makedirs(work_dir, exist_ok=True)
    import_tensor_intrinsics()
    export = None if runs_here(target) else functools.partial(_export_linked, str(target))
    with stdout_to_stderr():
        return ms.tune_tir(
            tvm.IRModule(funcs), target, work_dir, max_trials_global=trials,
            num_trials_per_iter=min(16, trials),
            runner=runner,
            # a margin over LocalBuilder's 30 s default for a big stage's build on loaded cores
            builder=ms.builder.LocalBuilder(timeout_sec=300, f_build=build_candidate, f_export=export),
            cost_model=ms.cost_model.XGBModel(extractor=ms.feature_extractor.PerStoreFeature(),
                                              adaptive_training=True),
            database="json", num_tuning_cores=int(target.attrs.get("num-cores", 1)), seed=seed)


def build_candidate(mod: tvm.IRModule, target, _params=None):
    """LocalBuilder's build of one scheduled candidate: MetaSchedule's default_build without
    its ``import tvm.s_tir.tensor_intrin``. That import registers every GPU, ARM and Hexagon
    tensor intrinsic (about half a minute) and LocalBuilder pays it in every batch, since it starts
    a new process pool per batch; a candidate arrives scheduled, its tensorizations (if any)
    already inlined, so building it needs none of them."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm.driver.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _export_linked(target: str, mod) -> str:
    """LocalBuilder's export of one candidate for ``target``: a shared library, linked by
    target.export_library (the cross compiler); its path."""
    return export_library(mod, os.path.join(tempfile.mkdtemp(prefix="tvms-ms-"), "candidate.so"), target)


def database_trials(work_dir: str, warn=lambda s: None) -> int:
    """How many trials the JSON database in ``work_dir`` holds (one tuning record each; 0 if
    there is none), once a last line a kill cut short is dropped from either file (``warn``
    says so): MetaSchedule appends a line per workload and per measured trial, and would not
    read a torn one back."""
    for name in DATABASE_FILES:
        drop_torn_tail(os.path.join(work_dir, name), warn)
    path = os.path.join(work_dir, DATABASE_FILES[1])
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())
