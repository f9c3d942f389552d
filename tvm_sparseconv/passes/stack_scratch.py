"""StackScratch: a kernel's small scratch buffers on the stack, not in TVM's workspace pool.

A TIR pass for the host functions (the CPU kernels), run by the TIR pipeline ``TIR_PIPELINE``
("tvm_sparseconv": TVM's default one with this pass before LowerTVMBuiltin), which every
build of this package uses (``tvm.compile(..., tir_pipeline=TIR_PIPELINE)``).

Why: TVM 0.27's LowerTVMBuiltin keeps only "global" buffers under 1 KB on the stack; every
other buffer a kernel allocates (the register tiles' accumulators, "local" counters and
cursors, the staging rows) becomes a TVMBackendAllocWorkspace / FreeWorkspace pair where it is
declared, which is inside the parallel loop: one pair per task, or per iteration of a loop in
it. The accumulators of a register tile of 8 pixels x 32 channels are 1 KB exactly. The
``disable_lower_builtin`` annotation that would keep a buffer on the stack cannot be written
in the kernels: StorageRewrite, which runs before, rebuilds every allocation without its
annotations. This pass writes it after, on each buffer of a constant size up to
STACK_BUFFER_BYTES, while a function's buffers so kept sum to at most STACK_FRAME_BYTES. A
kernel with the attribute SCRATCH_IN_WORKSPACE (algorithms/base.py) is left as it is: the dense
window kernel reading NCHW, whose accumulators LLVM spilled on the stack.

The stack: LLVM puts these buffers in the frame of the function that holds them (for a
parallel loop, the function of its body that each thread runs), so each thread has its own.
TVM's pool threads and a process's main thread have the platform's default stack (8 MB on
Linux); the caps keep a kernel's frame small beside that.

What it gains: the allocator's calls, and with the scratch of a register tile on the stack
LLVM keeps the tile in registers. Whole models, each build against the same plan built with
TVM's default TIR pipeline, interleaved in one process on an Intel Xeon (Emerald Rapids):
MobileNet-V2 1.12x, ResNet-50-half 1.10x, EfficientNet-B0 1.07x as fast, outputs identical
(docs/benchmarks-xeon-emeraldrapids.md).
"""
from __future__ import annotations

import tvm
from tvm import tirx

from ..algorithms.base import SCRATCH_IN_WORKSPACE

TIR_PIPELINE = "tvm_sparseconv"
STACK_BUFFER_BYTES = 16 * 1024
STACK_FRAME_BYTES = 64 * 1024
_KEY = "disable_lower_builtin"  # tvm's transform::kDisableLowerTVMBuiltin


def _constant_bytes(buf) -> int | None:
    n = 1
    for d in buf.shape:
        if not isinstance(d, tirx.IntImm):
            return None
        n *= int(d.value)
    return n * buf.dtype.bits * buf.dtype.lanes // 8


class _Budget:
    def __init__(self):
        self.left = STACK_FRAME_BYTES

    def take(self, alloc: tirx.AllocBuffer) -> bool:
        """Whether ``alloc`` goes on the stack (a constant size within both caps, not
        annotated yet); if so, its bytes are charged to the function's frame."""
        n = _constant_bytes(alloc.buffer)
        if n is None or not 0 < n <= min(STACK_BUFFER_BYTES, self.left) or _KEY in alloc.annotations:
            return False
        self.left -= n
        return True


def _walk(s: tirx.Stmt, budget: _Budget) -> tirx.Stmt:
    """``s`` with its AllocBuffers annotated while the budget lasts. Statements that hold
    others are rebuilt around their walked bodies; any other kind is returned as it is (a
    buffer inside one stays in the workspace: slower, not wrong)."""
    if isinstance(s, tirx.SeqStmt):
        return tirx.SeqStmt([_walk(x, budget) for x in s.seq])
    if isinstance(s, tirx.For):
        return tirx.For(s.loop_var, s.min, s.extent, s.kind, _walk(s.body, budget), s.thread_binding, s.annotations,
                        s.step)
    if isinstance(s, tirx.AttrStmt):
        return tirx.AttrStmt(s.node, s.attr_key, s.value, _walk(s.body, budget))
    if isinstance(s, tirx.IfThenElse):
        orelse = _walk(s.else_case, budget) if s.else_case is not None else None
        return tirx.IfThenElse(s.condition, _walk(s.then_case, budget), orelse)
    if isinstance(s, tirx.While):
        return tirx.While(s.condition, _walk(s.body, budget))
    if isinstance(s, tirx.AllocBuffer) and budget.take(s):
        return tirx.AllocBuffer(s.buffer, {**dict(s.annotations), _KEY: tirx.IntImm("int32", 1)})
    return s


@tirx.transform.prim_func_pass(opt_level=0, name="tvm_sparseconv.StackScratch")
def StackScratch(func: tirx.PrimFunc, mod, ctx) -> tirx.PrimFunc:
    if func.attrs is not None and func.attrs.get(SCRATCH_IN_WORKSPACE, False):
        return func
    budget = _Budget()
    body = _walk(func.body, budget)
    return func if budget.left == STACK_FRAME_BYTES else func.with_body(body)


def _pipeline():
    """TVM's default TIR pipeline (main, host finalization, device finalization) with
    StackScratch at the head of the host finalization, before LowerTVMBuiltin."""
    main, host, device = tvm.tirx.get_tir_pipeline("default")
    return main, (lambda: tvm.ir.transform.Sequential([StackScratch, host()])), device


tvm.tirx.compilation_pipeline.register_tir_pipeline(TIR_PIPELINE, _pipeline)
