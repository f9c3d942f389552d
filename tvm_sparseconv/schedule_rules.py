"""The dlight rules that schedule the ops of the graph that are not convs (compile._lowering).

TVM's own CPU rules are used where they are fast; these replace them where they are not:

- ColumnGEMV: a matmul whose weight is stored K x N: a classifier head (the importer stored
  it transposed), an MLP over the pixels of an NHWC map;
- RowGEMV: dlight's GEMV rule, kept off GEMVs with more outputs than inputs;
- RowReduction: reductions over contiguous elements (a global average pool in NCHW; a
  variance's or a softmax's two over the same rows) in vector lanes;
- OneReduction: dlight's Reduction rule, kept off functions with several reductions.
"""
from __future__ import annotations

from math import gcd

import tvm
from tvm import s_tir
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule

from . import interrupt
from .cpu import cpu_of
from .passes.parallelize_rest import reduces_lanes

_SPATIAL, _REDUCE = 0, 2  # tirx.IterVar kinds


def _top_blocks(sch: s_tir.Schedule) -> list:
    """The function's top-level blocks, or [] when it has no root block."""
    try:
        return list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # no root block: nothing for a reduction rule
        interrupt.check()
        return []


def _scheduled_blocks(func) -> tuple | None:
    """(a Schedule of ``func``, its top-level blocks); None for anything but a PrimFunc with
    a root block."""
    if not isinstance(func, tvm.tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    blocks = _top_blocks(sch)
    return (sch, blocks) if blocks else None


def _reduces(block) -> bool:
    """Whether a block has a reduction axis."""
    return any(iv.iter_type != _SPATIAL for iv in block.iter_vars)


class OneReduction(ScheduleRule):
    """dlight's CPU Reduction rule, on functions with at most one reduction block. With two or
    more (a softmax: the max, then the sum of exps) the rule computes them at each element of
    the parallel output loop, so every output repeats the whole reduction: a 1000-class softmax
    took 1.86 ms instead of microseconds. A reduction over channel blocks (a global average pool
    in NCHW16c: parallelize_rest.reduces_lanes) the rule makes one scalar task per lane, reading x
    16 floats apart: MobileNet-V2's at batch 8 took 0.086 ms alone. Both are left to
    ParallelizeRest, which vectorises the lanes."""

    rule = dl.cpu.Reduction()

    def apply(self, func, target, tunable):
        if not isinstance(func, tvm.tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = [sch.get(b) for b in _top_blocks(sch)]
        if sum(map(_reduces, blocks)) > 1 or any(map(reduces_lanes, blocks)):
            return None
        return self.rule.apply(func, target, tunable)


class RowGEMV(ScheduleRule):
    """dlight's CPU GEMV rule (a weight contiguous along k), on GEMVs with no more outputs than
    reduced inputs. With more outputs (an expanding 1x1 conv at 1x1 pixel left to TVM, as in a
    squeeze-and-excitation block: 48 -> 1152) the rule vectorizes 128 outputs around the
    unrolled reduction, and LLVM had not finished compiling a model with one after 20 minutes;
    OneReduction takes those (48 -> 1152 in 22 us alone on an AMD EPYC Zen 4)."""

    rule = dl.cpu.GEMV()

    def apply(self, func, target, tunable):
        found = _scheduled_blocks(func)
        if found is None:
            return None
        sch, blocks = found
        stmt = sch.get(blocks[0])
        extents = {_SPATIAL: 1, _REDUCE: 1}
        for iv in stmt.iter_vars:
            if iv.iter_type in extents and isinstance(iv.dom.extent, tvm.tirx.IntImm):
                extents[iv.iter_type] *= int(iv.dom.extent)
        if extents[_SPATIAL] > extents[_REDUCE]:
            return None
        return self.rule.apply(func, target, tunable)


def _index_vars(region) -> list:
    """The block variable each dimension of a buffer region reads (None where it is not one
    point at a bare variable)."""
    return [r.min if isinstance(r.min, tvm.tirx.Var) and int(r.extent) == 1 else None for r in region.region]


def _same(a: list, b: list) -> bool:
    """Whether two lists of variables (or None) hold the same variables."""
    return len(a) == len(b) and all(x is not None and x.same_as(y) for x, y in zip(a, b))


def matmul_tile(n: int, rows: int, lanes: int, accumulators: int, cores: int = 1) -> tuple[int, int] | None:
    """(outputs, rows) of x @ w that one ColumnGEMV task holds in vector registers, for ``n``
    outputs per row and ``rows`` rows (0: known only at run time). Outputs: a divisor of n up
    to 4 vectors and a multiple of gcd(n, lanes), so that it vectorizes without a tail, held
    in vectors of gcd(tile, lanes) floats; rows: a divisor of ``rows`` such that all of them
    fit ``accumulators`` registers, so that each row of w read feeds them all.

    Among those, the pair with the most multiply-adds per register loaded (v*g / (v + g) for
    v vectors and g rows) that still gives every core a task, else the one with the most
    tasks; the wider tile on a tie. None below one vector (an n with no such divisor: dlight's
    rules take it). A group of rows that does not divide ``rows`` (under a guard) was slower:
    14x14 pixels in groups of 5 took 0.51 ms against 0.29 in groups of 4 (AMD EPYC Zen 4)."""
    g = gcd(n, lanes)
    tiles = [d for d in range(g, 4 * lanes + 1, g) if n % d == 0 and d >= min(lanes, n)]
    if not tiles:
        return None
    pairs = []
    for tile in tiles:
        v = tile // gcd(tile, lanes)
        group = max((d for d in range(1, max(1, accumulators // v) + 1) if rows % d == 0), default=1) if rows else 1
        tasks = n // tile * (rows // group if rows else 1)
        pairs.append(((tasks >= cores, v * group / (v + group), tile), (tile, group)))
    return max(pairs)[1]


def _in_vectors(sch, loop, width: int) -> None:
    """``loop`` as unrolled vectors of ``width`` lanes (its extent a multiple of it)."""
    vectors, lanes = sch.split(loop, [None, width])
    sch.unroll(vectors)
    sch.vectorize(lanes)


class ColumnGEMV(ScheduleRule):
    """A matmul ``y[b..., n] = sum_k x[b..., k] * w[k, n]`` whose weight is laid out K x N, then
    elementwise blocks (bias add, ReLU, a folded BatchNorm's multiply-add): the classifier head
    of a model from ONNX, whose transpose the importer folded into the constant. dlight's GEMV
    rule takes only weights contiguous along k, and its Reduction rule read this one down its
    columns (a stride of N floats per multiply): MobileNet-V2's 1280 -> 1000 head took 0.64 ms,
    0.045 ms here.

    The same shape is every matmul over the pixels of an NHWC map (ConvNeXt's MLPs: 3136 rows
    of 48 -> 192), whose x is as large as w or larger.

    Each parallel task owns a tile of consecutive outputs of a group of rows (matmul_tile),
    held in vector registers (a local cache of the output), and walks k, so every row of w is
    read in one run and feeds the whole group: MobileNet-V2's head at batch 8 took 0.9-2.1 ms
    read once per row, 0.27-0.31 ms so (Zen 3). The tasks run the rows inside the tiles when
    w is the larger operand (a head: each slice of w stays in cache across the rows), the
    tiles inside the rows else (a group of rows stays in cache across w), and are one
    parallel loop, so that 3 tiles or 3 groups still share 2 cores evenly: ConvNeXt's 3136 x
    48 -> 192 took 0.66 ms in parallel tiles only, 0.39 so (onnxruntime 0.50; AMD EPYC Zen 4).
    The tile is written as vectors of gcd(tile, lanes) floats: its outputs in whole registers."""

    def apply(self, func, target, tunable):
        found = _scheduled_blocks(func)
        if found is None:
            return None
        sch, blocks = found
        mm, epilogue = blocks[0], blocks[1:]
        stmt = sch.get(mm)
        kinds = [iv.iter_type for iv in stmt.iter_vars]
        if len(kinds) < 2 or kinds[-1] != _REDUCE or any(k != _SPATIAL for k in kinds[:-1]):
            return None
        j, k = stmt.iter_vars[-2].var, stmt.iter_vars[-1].var
        if len(stmt.writes) != 1 or not _same(_index_vars(stmt.writes[0])[-1:], [j]):
            return None
        if not any(_same(_index_vars(r), [k, j]) for r in stmt.reads):  # w[k, n], n contiguous
            return None
        if any(iv.iter_type != _SPATIAL for b in epilogue for iv in sch.get(b).iter_vars):
            return None
        loops = sch.get_loops(mm)
        if len(loops) != len(kinds):
            return None
        cpu = cpu_of(target)
        n = int(stmt.iter_vars[-2].dom.extent)
        rows = 1
        for iv in stmt.iter_vars[:-2]:
            rows *= int(iv.dom.extent) if isinstance(iv.dom.extent, tvm.tirx.IntImm) else 0  # 0: symbolic
        found = matmul_tile(n, rows, cpu.lanes, cpu.accumulators, cpu.cores)
        if found is None:
            return None
        k = stmt.iter_vars[-1].dom.extent
        parts = split_k(int(k) if isinstance(k, tvm.tirx.IntImm) else 0, n, rows, cpu)
        if parts is not None:
            split = _split_k(func, n, rows, *parts, cpu)
            if split is not None:
                return split
        tile, group = found
        width = gcd(tile, cpu.lanes)
        try:
            *batch, col, red = loops
            n_out, n_in = sch.split(col, [None, tile])
            if batch:
                r = sch.fuse(*batch) if len(batch) > 1 else batch[0]
                r_out, r_in = sch.split(r, [None, group]) if group > 1 else (r, None)
                # the larger operand stays in cache across the inner loop: a slice of w across
                # the rows when w is the larger (a head), a group of rows across w's tiles else
                outer, inner = (n_out, r_out) if n >= rows else (r_out, n_out)
                sch.reorder(outer, inner, red, *([r_in] if r_in is not None else []), n_in)
                if r_in is not None:
                    sch.unroll(r_in)
                task = sch.fuse(outer, inner)
            else:
                sch.reorder(n_out, red, n_in)
                task = n_out
            sch.parallel(task)
            for b in epilogue[:-1]:  # no full-size buffer between the elementwise ops: one loop
                sch.compute_inline(b)
            # placed and vectorized in the task before it is inlined into the store below: left at
            # the root, the fused GELU of a 3136 x 48 -> 192 matmul took 0.52 ms, not 0.43 (Zen 4)
            for b in epilogue[-1:]:
                sch.reverse_compute_at(b, task)
                _in_vectors(sch, sch.get_loops(b)[-1], width)
            write_back = sch.cache_write(mm, 0, "local")  # the accumulators, promoted to registers
            _in_vectors(sch, n_in, width)  # before decompose_reduction: the update block then vectorizes
            init = sch.decompose_reduction(mm, red)
            for b in (init, write_back):
                _in_vectors(sch, sch.get_loops(b)[-1], width)
            if epilogue:  # the epilogue on the accumulators as they are stored: no full-size buffer
                sch.reverse_compute_inline(epilogue[-1])
        except s_tir.ScheduleError:  # a shape this rule did not foresee: dlight's rules take it
            interrupt.check()
            return None
        return sch


def split_k(k: int, n: int, rows: int, cpu) -> tuple[int, int] | None:
    """(parts, step) of ColumnGEMV's split-K schedule for x (``rows`` x ``k``) @ w (``k`` x
    ``n``; 0: known only at run time), or None for its tiled one: ``parts`` (the cores) ranges
    of k, one parallel task each, ``step`` rows of w (8, 4, 2 or 1, dividing every range) per
    step of its register tile.

    Split when w is larger than the cores' L2 caches together (it comes from L3 or memory on
    every run of a model) and x has at most 8 rows (a head at batch 1 to 8). The tiled schedule
    reads such a w down its columns, a tile's few cache lines per row of w, each row in another
    page; split-K reads each task's rows of w in order. Alone, with w flushed from the caches
    (AMD EPYC Zen 4, 2 cores), AlexNet's 9216 -> 4096 at batch 1 took 4.1 ms against 10.6
    tiled (onnxruntime 5.7), at batch 8 9.2 against 15.8; MobileNet-V2's 1280 -> 1000 0.25
    against 0.28."""
    if not rows or not k or rows > 8 or k * n * 4 <= cpu.cores * cpu.l2:
        return None
    parts = cpu.cores
    if parts < 2 or k % parts:
        return None
    return parts, max(d for d in (8, 4, 2, 1) if k % (parts * d) == 0)


def _split_k(func, n: int, rows: int, parts: int, step: int, cpu) -> s_tir.Schedule | None:
    """ColumnGEMV's matmul block (``rows`` x ``n`` outputs) and its elementwise epilogue
    scheduled split-K (split_k): each of ``parts`` parallel tasks sums its range of k into its
    own partial outputs (rows x n, rfactor), ``step`` rows of w at a time into a tile of
    outputs of a group of rows (matmul_tile) that LLVM keeps in registers across the unrolled
    step; then one serial loop adds the parts and applies the epilogue (a parallel one was
    slower on 1000 outputs: the launch costs more than the adds). None where the schedule does
    not apply."""
    sch, (mm, *epilogue) = _scheduled_blocks(func)
    tile, group = matmul_tile(n, rows, cpu.lanes, cpu.accumulators)
    width = gcd(tile, cpu.lanes)
    try:
        ko, _ = sch.split(sch.get_loops(mm)[-1], [parts, None])
        rf = sch.rfactor(ko, 0)  # rf[part, rows..., n]
        *batch, col, part, ki = sch.get_loops(rf)
        kb, k_in = sch.split(ki, [None, step])
        n_out, n_in = sch.split(col, [None, tile])
        v_out, v_in = sch.split(n_in, [None, width])
        r = [sch.fuse(*batch) if len(batch) > 1 else batch[0]] if batch else []
        if r and group > 1:
            r = list(sch.split(r[0], [None, group]))
        sch.reorder(part, kb, n_out, *r[:1], k_in, *r[1:], v_out, v_in)
        sch.parallel(part)
        for loop in (k_in, *r[1:], v_out):
            sch.unroll(loop)
        sch.vectorize(v_in)
        init = sch.decompose_reduction(rf, kb)
        sch.vectorize(sch.split(sch.get_loops(init)[-1], [None, width])[-1])
        for b in epilogue[:-1]:
            sch.compute_inline(b)
        *outer, col, part = sch.get_loops(mm)
        c_out, c_in = sch.split(col, [None, width])
        sch.reorder(*outer, c_out, part, c_in)
        sch.vectorize(c_in)  # before decompose_reduction: the update block then vectorizes
        init = sch.decompose_reduction(mm, part)
        sch.vectorize(sch.get_loops(init)[-1])
        if epilogue:
            sch.reverse_compute_at(epilogue[-1], c_out)
            sch.vectorize(sch.get_loops(epilogue[-1])[-1])
    except s_tir.ScheduleError:  # a shape this schedule did not foresee: the tiled one takes it
        interrupt.check()
        return None
    return sch


def row_factor(r: int, lanes: int) -> int:
    """Partial sums per output kept apart for RowReduction: the largest divisor of ``r`` (the
    reduced elements) up to one vector, so that the lanes split r without a tail. Not more: the
    lanes are summed at the end one after the other (on an AMD EPYC Zen 4, means over 7x7 and
    14x14 took 0.026 and 0.035 ms with up to 4 vectors, 0.017 and 0.014 with one)."""
    return max(d for d in range(1, min(r, lanes) + 1) if r % d == 0)


class RowReduction(ScheduleRule):
    """Reduction blocks over the same rows, whose reduced elements of each output are contiguous
    in every buffer they read (the innermost index of each is the innermost reduced axis; a
    later one may also read an earlier one's output), then elementwise blocks: a global average
    pool or a mean over H and W in NCHW, a variance (the sum, then the sum of squared
    differences from its mean) and an instance norm's normalization, a GEMV with its weight
    contiguous along k that RowGEMV leaves. The elementwise blocks but the last are inlined
    where they are read. dlight's Reduction rule adds the elements in one scalar chain, each
    add waiting for the one before (float addition is not reassociated). On
    an AMD EPYC Zen 4, EfficientNet-B0's 16 means of a squeeze-and-excitation took 0.84 ms,
    and a mean over 1 x 96 x 112 x 112 alone 0.50 ms against onnxruntime's 0.074.

    Here each output keeps ``row_factor`` partial sums in vector lanes (rfactor), adds
    contiguous vectors of x into them, and then sums the lanes: 0.036 ms for that mean. Outputs
    are parallel tasks. The partial sums change the order of the additions, as every vectorized
    sum does (onnxruntime's too). A CycleGAN-like generator's instance norms (a mean, a variance
    and the normalization) took 5.9 ms of its 22 at 128 x 128 serially, 0.8 ms so."""

    def apply(self, func, target, tunable):
        found = _scheduled_blocks(func)
        if found is None:
            return None
        sch, blocks = found
        reducing = [i for i, b in enumerate(blocks) if _reduces(sch.get(b))]
        if not reducing:
            return None
        # elementwise blocks computed where they are read: those between the reductions (a
        # variance's x - mean, squared) and those of the epilogue but its last (an instance
        # norm's subtract, divide, scale and shift), so that none writes a buffer of x's size
        for i, b in enumerate(blocks[:-1]):
            if i not in reducing:
                try:
                    sch.compute_inline(b)
                except s_tir.ScheduleError:  # kept: between the reductions, the rule declines below
                    interrupt.check()
        blocks = _top_blocks(sch)
        stmt = [sch.get(b) for b in blocks]
        k = sum(1 for b in stmt if _reduces(b))
        if [i for i, b in enumerate(stmt) if _reduces(b)] != list(range(k)):
            return None  # the reductions, then elementwise blocks
        made = []  # buffers the reductions before write: read per output, not along the row
        shape = None
        for b in stmt[:k]:
            found_shape = self._row(b, made)
            if found_shape is None or (shape is not None and found_shape != shape):
                return None
            shape = found_shape
            made.append(b.writes[0].source)
        ns, extents = shape
        r = 1
        for e in extents[ns:]:
            r *= e
        factor = row_factor(r, cpu_of(target).lanes)
        if factor < 4 or (k > 1 and r == factor):
            return None  # with one step per lane, a later reduction's loop of steps would not exist
        try:
            sums = []
            for blk in blocks[:k]:  # each: its partial sums (rfactor) at the top level
                loops = sch.get_loops(blk)
                if [int(sch.get(lp).extent) for lp in loops] != extents:
                    return None
                if ns > 1:
                    sch.fuse(*loops[:ns])
                reduce = sch.fuse(*loops[ns:]) if len(loops) - ns > 1 else loops[ns]
                _, part = sch.split(reduce, [None, factor])
                sums.append(sch.rfactor(part, 0))  # sums[part, outputs...] = the partial sums
            task = sch.get_loops(sums[0])[0]
            sch.parallel(task)
            # then in the task of each output: each reduction's partial sums and their lanes'
            # sum, in order (a variance's second reads the first's mean), then the epilogue
            sch.reverse_compute_at(blocks[0], task)
            for sb, blk in zip(sums[1:], blocks[1:k]):
                sch.reverse_compute_at(sb, task)
                moved = sch.get_loops(sb)[1:]  # made in the order of its axes: the lanes first
                if len(moved) != 2:
                    return None
                sch.reorder(moved[1], moved[0])
                sch.reverse_compute_at(blk, task)
            for b in blocks[k:]:
                sch.reverse_compute_at(b, task)
            for sb in sums:
                *_, steps, part = sch.get_loops(sb)
                sch.vectorize(part)
                # the partial sums stay in "global" scope: compacted to one task's lanes (under
                # 1 KB) they become a stack array LLVM keeps in registers, where TVM 0.27 turns a
                # "local" buffer into a TVMBackendAllocWorkspace call per task (per output: a
                # layer norm over 56 x 56 x 48 took 0.175 ms so, 0.046 without; Xeon Emerald Rapids)
                sch.decompose_reduction(sb, steps)  # last: the update block is no reduction after it
        except s_tir.ScheduleError:  # a shape this rule did not foresee: the next rule takes it
            interrupt.check()
            return None
        return sch

    @staticmethod
    def _row(block, made: list) -> tuple | None:
        """(spatial axes, constant extents) of a reduction block this rule takes: spatial axes,
        then reduced ones; one output; every buffer it reads contiguous along its innermost
        reduced axis, but its own and those in ``made``."""
        if len(block.writes) != 1:  # an argmax's (index, value) pair: not a sum of partial sums
            return None
        ivs = list(block.iter_vars)
        kinds = [iv.iter_type for iv in ivs]
        ns = kinds.index(_REDUCE) if _REDUCE in kinds else len(kinds)
        if ns == 0 or any(kd != _REDUCE for kd in kinds[ns:]) or any(kd != _SPATIAL for kd in kinds[:ns]):
            return None
        inner = ivs[-1].var
        own = [block.writes[0].source, *made]
        if not block.reads or not all(r.region and _index_vars(r)[-1] is not None and _index_vars(r)[-1].same_as(inner)
                                      for r in block.reads if not any(r.source.same_as(o) for o in own)):
            return None  # the reduced elements are not contiguous in every input
        extents = [iv.dom.extent for iv in ivs]
        if not all(isinstance(e, tvm.tirx.IntImm) for e in extents):
            return None
        return ns, [int(e) for e in extents]
