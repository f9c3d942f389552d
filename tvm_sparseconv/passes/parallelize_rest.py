"""ParallelizeRest: give every op nobody scheduled (pooling, residual adds, transposes, softmax)
a parallel outer loop.

The default CPU pipeline leaves such ops as serial naive loops; on a small ResNet they cost
as much as all its convs. This pass inlines producers that can be (a pool's padded copy is
then never written), fuses the leading spatial loops of each top-level block but the innermost
two (NCHW's H and W, fused into one contiguous loop for LLVM to vectorise in whole vectors:
the residual adds of ResNet-50's 14x14 and 28x28 stages ran 3-5x faster alone than with the
W loop alone inside), or the innermost one when the outer loops would be too few, and runs
them on TVM's thread pool. A pool of channel blocks (NCHW8c) gets its lane loop inside the
window loops, vectorised (_lanes_innermost); an elementwise op of channel blocks runs rows of
lane vectors (over_lanes). Functions marked ``tirx.is_scheduled`` (our kernels, MetaSchedule
or dlight results) are left alone.
"""
from __future__ import annotations

import tvm
from tvm import s_tir

from .. import interrupt

_MIN_EXTENT = 64  # below this a parallel loop costs more than it saves
_MIN_WORK = 1 << 14  # ... unless each of its iterations reduces a window this large (a global pool)
_MAX_LANES = 64  # a channel block's lanes: up to a 64-float block (NCHW64c)


def _extent(sch, loop) -> int:
    """A loop's constant extent (0 when it is not constant)."""
    e = sch.get(loop).extent
    return int(e) if isinstance(e, tvm.tirx.IntImm) else 0


def _product(sch, loops) -> int:
    p = 1
    for lp in loops:
        p *= _extent(sch, lp)
    return p


def reduces_lanes(block) -> bool:
    """Whether ``block`` reduces each element of a channel block over a window (a pool or a mean
    in NCHW16c: axes ..., lane, rh, rw): its last spatial axis, just before the reduction axes,
    is short (at most _MAX_LANES) and the innermost index of every buffer it reads and writes,
    so its lanes are contiguous. NCHW's pools are not (their W reads x at 2w + kw)."""
    ivs = list(block.iter_vars)
    n_reduce = next((i for i, iv in enumerate(reversed(ivs)) if iv.iter_type == 0), len(ivs))
    if n_reduce == 0 or n_reduce == len(ivs):
        return False
    lane = ivs[len(ivs) - n_reduce - 1]
    extent = lane.dom.extent
    return (isinstance(extent, tvm.tirx.IntImm) and 1 < int(extent) <= _MAX_LANES and len(block.writes) == 1
            and all(r.region[-1].min.same_as(lane.var) for r in (*block.writes, *block.reads)))


def over_lanes(block) -> bool:
    """Whether ``block`` is elementwise over channel blocks (N, CB, H, W, lanes): five spatial
    axes, the last short (at most _MAX_LANES) and the innermost index of every tensor it reads
    and writes (a per-channel operand's too), so a vector of lanes is one load or store."""
    ivs = list(block.iter_vars)
    if len(ivs) != 5 or any(iv.iter_type != 0 for iv in ivs):
        return False
    lane, extent = ivs[-1], ivs[-1].dom.extent
    return (isinstance(extent, tvm.tirx.IntImm) and 1 < int(extent) <= _MAX_LANES
            and all(not r.region or r.region[-1].min.same_as(lane.var) for r in (*block.writes, *block.reads)))


def _lanes_innermost(sch, blk, lane, reduce) -> None:
    """A reduction over the window of each element of a channel block (reduces_lanes) reduced
    lane by lane, scalar: move the lane loop inside the reduction loops and vectorise it, so
    that each tap is one vector max/add over the block's channels (a max_pool2d in NCHW8c ran
    2-3x slower than in NCHW before). Any other shape is left as is."""
    if not reduces_lanes(sch.get(blk)):
        return  # not contiguous lanes in every buffer: the vectors would gather
    try:
        sch.reorder(*reduce, lane)
        sch.vectorize(lane)
    except Exception:  # not reorderable (an opaque block, a dependent extent): keep it scalar
        interrupt.check()


def _elements(buffer) -> int:
    n = 1
    for d in buffer.shape:
        n *= _elements_of(d)
    return n


def broadcast_operand(buffer, out) -> bool:
    """Whether ``buffer`` (a producer's) is read broadcast over ``out`` (the function's output):
    fewer elements, and a lower rank or, aligned from the right as NumPy broadcasts, an axis of
    1 where ``out`` has more (an SE block's N x C x 1 x 1 scales). An operand of a concat, or a
    reshape of one, is smaller without being broadcast: each of its elements is read once."""
    shape, out_shape = [_elements_of(d) for d in buffer.shape], [_elements_of(d) for d in out.shape]
    if _elements(buffer) >= _elements(out):
        return False
    return len(shape) < len(out_shape) or any(
        d == 1 and o > 1 for d, o in zip(reversed(shape), reversed(out_shape)))


def _elements_of(d) -> int:
    return int(d) if isinstance(d, tvm.tirx.IntImm) else 1 << 30  # symbolic: large


def _parallelize(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    try:
        root = sch.get_sblock("root")
    except Exception:
        interrupt.check()
        return func
    blocks = sch.get_child_blocks(root)
    out = sch.get(blocks[-1]).writes[0].source if sch.get(blocks[-1]).writes else None
    for blk in blocks[:-1]:  # producers such as a pad: computed where they are read, no buffer
        writes = sch.get(blk).writes
        if writes and out is not None and broadcast_operand(writes[0].source, out):
            # a broadcast operand (an SE block's sigmoid of N x C x 1 x 1): inlined, it would be
            # recomputed for every pixel, and in channel blocks no loop is invariant to it
            continue
        try:
            sch.compute_inline(blk)
        except Exception:  # not inlinable (a reduction, several consumers): keep it
            interrupt.check()
    for blk in sch.get_child_blocks(root):
        loops = sch.get_loops(blk)
        block = sch.get(blk)
        if not loops or len(loops) != len(block.iter_vars):
            continue  # loops not 1:1 with the block's axes: leave it
        lead = []
        for lp, iv in zip(loops, block.iter_vars):
            if iv.iter_type != 0:  # stop at the first reduction axis
                break
            lead.append(lp)
        if not lead:
            continue
        extent = _product(sch, lead)
        # a pool or mean of channel blocks: its lanes stay inside (vectorised below), and it runs
        # in parallel over the other axes even when they are few, as long as each reduces much
        pooled = len(lead) > 1 and len(lead) < len(loops) and reduces_lanes(block)
        if extent < _MIN_EXTENT and not (pooled and _product(sch, loops) >= _MIN_WORK):
            continue
        if over_lanes(block) and extent // _product(sch, lead[-2:]) >= _MIN_EXTENT:
            # N x CB x H in parallel, each task a row of W vectors: fused with W, the lanes' index
            # (w * lanes + l) % lanes made LLVM gather a per-channel operand, and it vectorised a
            # concat's select wrongly (LLVM 22); as TVM's vectors they are plain loads
            try:
                sch.parallel(sch.fuse(*lead[:-2]))
                sch.vectorize(lead[-1])
            except Exception:  # not vectorisable after all: keep what was done
                interrupt.check()
            continue
        # the innermost spatial loops stay inside, contiguous (vectorisable): the last two (NCHW's
        # H and W) fused into one when they are the block's last loops and enough outer work is
        # left, so LLVM vectorises H*W elements rather than W (7-56) with a remainder per row
        inner = 1 if pooled else next((k for k in (2, 1) if len(lead) > k and extent // _product(
            sch, lead[-k:]) >= _MIN_EXTENT and (k == 1 or len(lead) == len(loops))), 0)
        try:
            if inner == 2:
                sch.fuse(*lead[-2:])
            outer = lead[:len(lead) - inner]
            fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            sch.parallel(fused)
        except Exception:  # a loop the schedule may not fuse or parallelise: keep it serial
            interrupt.check()
            continue
        if inner == 1 and len(lead) < len(loops) and 1 < _extent(sch, lead[-1]) <= _MAX_LANES:
            _lanes_innermost(sch, blk, lead[-1], loops[len(lead):])
    return sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="tvm_sparseconv.ParallelizeRest")
class ParallelizeRest:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        out = {}
        for gv, func in mod.functions_items():
            scheduled = func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))
            if isinstance(func, tvm.tirx.PrimFunc) and not scheduled:
                out[gv] = _parallelize(func)
        for gv, f in out.items():
            mod[gv] = f
        return mod
