"""CPU schedule rules of the hand-scheduled kernels, registered with MetaSchedule.

Every sparse (and the register-tiled dense) stage is written already scheduled: parallel,
vectorised over an output-channel tile, register-tiled, its tile sizes chosen by knobs that
the tuner searches. Its body carries the block annotation ``schedule_rule =
"tvm_sparseconv"``, and MetaSchedule's ApplyCustomRule calls the global function
``s_tir.meta_schedule.cpu.tvm_sparseconv`` registered here for it, which keeps the kernel
as written. So tuning a whole Relax module that holds these kernels (``tune_relax``,
``static_shape_tuning_pipeline``) neither rewrites them into something else nor leaves
naive loops: MetaSchedule's own rules never see their data-dependent loops.
"""
from __future__ import annotations

import tvm

RULE = "tvm_sparseconv"


@tvm.register_global_func(f"s_tir.meta_schedule.cpu.{RULE}", override=True)
def keep_as_written(sch, block):
    """The design space of a hand-scheduled kernel: the kernel itself (its knobs are tuned outside)."""
    return [sch]
