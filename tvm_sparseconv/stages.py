"""Stages as TVM holds them: their names, their layer attributes, the schedule rule of the
hand-scheduled ones, and MetaSchedule's database for the tunable ones.

One home for what the compile path (passes, build, compile), the tuner and the measurements
all need to agree on, below every one of them:

- a stage's PrimFunc in the form a rewritten Relax module holds it (``stage_func``), which is
  the form MetaSchedule tunes and finds again by structural hash;
- the attributes that say which algorithm a generated PrimFunc is a stage of and which layers
  call it (``ALGORITHM_ATTR``, ``LAYERS_ATTR``), read back with ``kernel_table`` instead of
  parsing function names, and which layout transform one is (``LAYOUT_ATTR``);
- the block annotation ``schedule_rule = RULE`` of hand-scheduled kernels, and the rule
  registered for it, which keeps such a kernel as written when MetaSchedule tunes a whole
  Relax module (``tune_relax``, ``static_shape_tuning_pipeline``): its own rules never see the
  data-dependent loops;
- opening a MetaSchedule JSON database and applying it to the tunable stages.

Stages are duck-typed here (``.func``, ``.tunable``, ``.name``): this module imports nothing
of the package.
"""
from __future__ import annotations

import os

import tvm
from tvm.s_tir import meta_schedule as ms

RULE = "tvm_sparseconv"
ALGORITHM_ATTR = "tvm_sparseconv.algorithm"
# the keys of the layers that call the function, in the order the model calls them: layers with
# the same shapes, epilogue and knobs share one function (Relax's BlockBuilder dedups them), and
# the model's VM runs its bindings in order, so its j-th call in an inference is layers[j]
LAYERS_ATTR = "tvm_sparseconv.layers"
# on a layout transform the model rewrite inserted (algorithms/layout.py): "nchw->nchw16c"
LAYOUT_ATTR = "tvm_sparseconv.layout_transform"
# relax's kOpaque: FuseOps must not merge a function with this op_pattern into its neighbours
OPAQUE = 8


@tvm.register_global_func(f"s_tir.meta_schedule.cpu.{RULE}", override=True)
def keep_as_written(sch, block):
    """The design space of a hand-scheduled kernel: the kernel itself (its knobs are tuned outside)."""
    return [sch]


def stage_symbol(algorithm: str, stage: str) -> str:
    """The function name of ``algorithm``'s stage ``stage`` (for people and profiles; code that
    needs the layer or algorithm of a function reads its attributes)."""
    return f"{algorithm}_{stage}"


def stage_func(st) -> tvm.tirx.PrimFunc:
    """A stage's PrimFunc exactly as MetaSchedule tunes it and finds it again.

    A rewritten Relax module holds this form plus the attributes of ``algorithm_func``, which
    ``apply_database`` takes off before it looks a function up.
    """
    # te.create_prim_func names every function "main": the module names it instead
    func = st.func.without_attr("global_symbol").with_attr("op_pattern", OPAQUE)
    if not st.tunable:  # hand-scheduled: keep it out of dlight / MetaSchedule
        func = func.with_attr("tirx.is_scheduled", True)
    return func


def algorithm_func(st, algorithm: str) -> tvm.tirx.PrimFunc:
    """``stage_func`` of stage ``st`` of ``algorithm``, marked as such (RewriteConv2D adds the
    layers that call it, LAYERS_ATTR, once the whole model is rewritten)."""
    return stage_func(st).with_attr(ALGORITHM_ATTR, algorithm)


def transform_func(st, src: str, dst: str) -> tvm.tirx.PrimFunc:
    """``stage_func`` of the layout transform stage ``st``, marked as the transform src -> dst."""
    return stage_func(st).with_attr(LAYOUT_ATTR, f"{src}->{dst}")


def _bare(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    return func.without_attr(LAYERS_ATTR).without_attr(ALGORITHM_ATTR)


def kernel_table(mod: tvm.IRModule) -> dict[str, tuple[tuple[str, ...], str]]:
    """{function name: (keys of the layers that call it in call order, algorithm)} of every
    generated stage in ``mod``."""
    out = {}
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and ALGORITHM_ATTR in f.attrs:
            layers = tuple(str(k) for k in f.attrs[LAYERS_ATTR]) if LAYERS_ATTR in f.attrs else ()
            out[gv.name_hint] = (layers, str(f.attrs[ALGORITHM_ATTR]))
    return out


# -- MetaSchedule's database --------------------------------------------------------------------
# the two JSON-lines files of a MetaSchedule JSON database (its work dir): workloads, then records
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


def open_database(database) -> ms.database.Database:
    """A MetaSchedule database, or a work dir holding database_{workload,tuning_record}.json."""
    if isinstance(database, ms.database.Database):
        return database
    path = os.fspath(database)
    files = [os.path.join(path, f) for f in DATABASE_FILES]
    if not os.path.isdir(path) or not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"{path} is not a MetaSchedule JSON database (needs "
                                f"{', '.join(map(os.path.basename, files))})")
    try:
        return ms.database.JSONDatabase(path_workload=files[0], path_tuning_record=files[1], allow_missing=False)
    except Exception as e:  # a truncated or foreign file: say which
        raise ValueError(f"cannot read the MetaSchedule database in {path}: {e}") from e


def _scheduled(func: tvm.tirx.PrimFunc, db, target) -> tvm.tirx.PrimFunc | None:
    """The best recorded schedule of ``func`` (stage_func form), or None."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod  # the form tasks are hashed in

    sch = ms.tir_integration.compile_tir(db, _normalize_mod(func), target)
    # the task's module names its function "main": the caller's module names it
    return None if sch is None else sch.mod["main"].without_attr("global_symbol")


def apply_database(mod: tvm.IRModule, database, target) -> tvm.IRModule:
    """``mod`` with every tunable stage (a function in stage_func form, with or without the
    attributes of algorithm_func) replaced by its tuned schedule when the database has one; the
    rest unchanged."""
    db = open_database(database)
    out = {}
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "op_pattern" in f.attrs \
                and "tirx.is_scheduled" not in f.attrs:
            bare = _bare(f)
            sch = _scheduled(bare.without_attr("global_symbol"), db, target)
            if sch is not None:
                keep = {k: f.attrs[k] for k in (LAYERS_ATTR, ALGORITHM_ATTR, "global_symbol") if k in f.attrs}
                f = sch.with_attrs(keep) if keep else sch
        out[gv] = f
    return tvm.IRModule(out, attrs=mod.attrs)
