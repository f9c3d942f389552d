"""One vector of channels at a time: the vector pieces of the channels-last encoders (pixcsr, hybrid).

Specified in docs/algorithms.md section 11.3 and 14.

An encoder copies one channel block of an input row channels-last (``channels_last_block``:
lanes x lanes register transposes), then takes ``lanes`` channels of a pixel per vector load,
tests them (``nonzero``), counts them (``count``) and stores the selected ones packed
(``compress_store``): no data-dependent branch, no scalar loop over channels where the ISA
can avoid one. ``Lanes(cpu)`` holds the vector width and picks the compaction the CPU has:

- AVX-512: compress in a register (vcompressps) and a masked store of the first count lanes;
- AVX2 (8 lanes): the selected lanes' indices packed by BMI2's pext from the lane mask, one
  vpermps, and a masked store (vmaskmovps): LLVM expands a compress into a scalar sequence
  there (6 ms for hybrid's encoder on 256x56x56), and for some layers it fails to select
  instructions and aborts;
- NEON (4 lanes, no masked or compress store): the 4-bit lane mask picks the packed order
  from a 16-entry table held in two 64-bit constants, one ``tbl`` byte permutation packs the
  selected lanes first, and lanes are stored from the last to the first at index + min(lane,
  count - 1): each lane past the count lands on the last selected lane's slot before that
  lane's own store overwrites it, so nothing is written past the count with one branch
  (count > 0) per vector instead of one per lane;
- otherwise (SSE, ...): one conditional scalar store per lane.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from ..cpu import CPU


def _pure(dtype: str, name: str, *args):
    return tvm.tirx.call_llvm_pure_intrin(dtype, name, *args)


def _neon_orders() -> tuple[int, int]:
    """For each 4-bit lane mask m: its set lanes in order (then lane 0 for the rest), 2 bits an
    output lane, 8 bits a mask; masks 0-7 in the first int64, 8-15 in the second (as signed)."""
    words = [0, 0]
    for m in range(16):
        order = [lane for lane in range(4) if m >> lane & 1] + [0] * 4
        words[m // 8] |= sum(lane << 2 * k for k, lane in enumerate(order[:4])) << 8 * (m % 8)
    return tuple(w - (1 << 64) if w >= 1 << 63 else w for w in words)


NEON_ORDERS = _neon_orders()


class Lanes:
    """The encoders' vector operations on ``cpu.lanes`` float32 / int32 lanes."""

    def __init__(self, cpu: CPU):
        self.n = cpu.lanes
        self.cpu = cpu

    def ramp(self, base):
        """TIR int32 x n: base, base + 1, ..."""
        return tvm.tirx.Ramp(base, 1, self.n)

    def bcast(self, value, dtype: str = "int32"):
        """TIR dtype x n: value in every lane (a Python number or a scalar expression)."""
        v = tvm.tirx.const(value, dtype) if isinstance(value, (bool, int, float)) else value
        return tvm.tirx.Broadcast(v, self.n)

    def nonzero(self, v):
        """TIR: per lane, float32 x n v is a non-zero (on the bits, as base.nonzero)."""
        bits = tvm.tirx.reinterpret(f"int32x{self.n}", v)
        return bits & self.bcast(0x7FFFFFFF) != self.bcast(0)

    def count(self, mask):
        """TIR int32: the lanes of a bool x n mask that are set."""
        return _pure("int32", f"llvm.vector.reduce.add.v{self.n}i32", tvm.tirx.Cast(f"int32x{self.n}", mask))

    def compress_store(self, buf, index, value, mask) -> None:
        """Emit: store the lanes of value (float32 or int32 x n) that mask selects at buf[index],
        buf[index + 1], ... (called while a macro is parsed). Writes nothing past the count."""
        n, dtype = self.n, str(value.ty.dtype)
        if self._neon_tbl():
            return self._tbl_store(buf, index, value, mask)
        if not self.cpu.masked_store or not (self.cpu.compress or self._pext_permute()):
            return self._scalar_store(buf, index, value, mask)
        kind = "f32" if "float" in dtype else "i32"
        if self.cpu.compress:
            # the passthru is value itself: lanes past the count are never stored
            packed = _pure(dtype, f"llvm.experimental.vector.compress.v{n}{kind}", value, mask, value)
        else:
            packed = self._permute(value, self._packed_indices(mask))
        first = self.ramp(0) < self.bcast(self.count(mask))
        T.evaluate(tvm.tirx.call_llvm_intrin("void", f"llvm.masked.store.v{n}{kind}.p0", packed,
                                             tvm.tirx.address_of(buf[index]), first))

    def _neon_tbl(self) -> bool:
        return self.cpu.isa == "neon" and self.n == 4

    def _tbl_indices(self, mask):
        """int8 x 16: tbl's byte indices that move mask's set lanes (of 4 x 32 bits) to the
        front, first to last (the lanes after them: copies of lane 0). The 16 orders, 2 bits
        a lane and 8 bits a mask, are two int64 constants (NEON_ORDERS); no table in memory."""
        i64 = lambda v: tvm.tirx.const(v, "int64")  # noqa: E731
        bits = _pure("int32", "llvm.vector.reduce.or.v4i32", tvm.tirx.Cast("int32x4", mask) << self.ramp(0))
        lo, hi = NEON_ORDERS
        table = tvm.tirx.Select(bits < 8, i64(lo), i64(hi))
        order = tvm.tirx.Cast("int32", (table >> tvm.tirx.Cast("int64", (bits & 7) * 8)) & i64(0xFF))
        lane = (self.bcast(order) >> tvm.tirx.Ramp(0, 2, 4)) & self.bcast(3)
        return tvm.tirx.reinterpret("int8x16", lane * self.bcast(0x04040404) + self.bcast(0x03020100))

    def _tbl_store(self, buf, index, value, mask) -> None:
        """NEON: value's selected lanes packed by one tbl, stored last lane first at
        index + min(lane, count - 1) (see the module docstring), when count > 0."""
        dtype = str(value.ty.dtype)
        packed = tvm.tirx.reinterpret(dtype, _pure("int8x16", "llvm.aarch64.neon.tbl1.v16i8",
                                                   tvm.tirx.reinterpret("int8x16", value), self._tbl_indices(mask)))
        at = list(index) if isinstance(index, tuple) else [index]
        count = self.count(mask)
        with T.If(count > 0):
            with T.Then():
                for i in reversed(range(self.n)):
                    T.buffer_store(buf, tvm.tirx.Shuffle([packed], [i]), at[:-1] + [at[-1] + T.min(i, count - 1)])

    def _pext_permute(self) -> bool:
        return self.cpu.isa == "avx2" and self.n == 8

    def _packed_indices(self, mask):
        """int32 x 8: the indices of mask's set lanes, first to last, then zeros. Each lane's
        bit is spread to a byte of 0xFF (pdep), and pext keeps those bytes of 0x0706..00."""
        u64 = lambda v: tvm.tirx.const(v, "uint64")  # noqa: E731
        bits = _pure("int32", "llvm.vector.reduce.or.v8i32", tvm.tirx.Cast("int32x8", mask) << self.ramp(0))
        spread = _pure("uint64", "llvm.x86.bmi.pdep.64", tvm.tirx.Cast("uint64", bits), u64(0x0101010101010101))
        idx = _pure("uint64", "llvm.x86.bmi.pext.64", u64(0x0706050403020100), spread * u64(0xFF))
        return tvm.tirx.Cast("int32x8", tvm.tirx.reinterpret("uint8x8", idx))

    @staticmethod
    def _permute(value, idx):
        """value (float32 or int32 x 8) with lane i = value[idx[i]] (one vpermps)."""
        dtype = str(value.ty.dtype)
        f = value if "float" in dtype else tvm.tirx.reinterpret("float32x8", value)
        out = _pure("float32x8", "llvm.x86.avx2.permps", f, idx)
        return out if "float" in dtype else tvm.tirx.reinterpret(dtype, out)

    def _scalar_store(self, buf, index, value, mask) -> None:
        """One store per selected lane, at index + the number of selected lanes before it
        (index: a flat index, or a tuple whose last element moves)."""
        at = list(index) if isinstance(index, tuple) else [index]
        before = tvm.tirx.const(0, "int32")
        for i in range(self.n):
            lane = tvm.tirx.Shuffle([mask], [i])
            with T.If(lane):
                with T.Then():
                    T.buffer_store(buf, tvm.tirx.Shuffle([value], [i]), at[:-1] + [at[-1] + before])
            before = before + tvm.tirx.Cast("int32", lane)

    def transpose(self, rows):
        """n vectors (rows of an n x n tile) -> its columns, by log2(n) rounds of two-source
        shuffles (vpermt2ps on AVX-512); round s swaps bit s of the row index with bit s of the lane.

        Each round's results pass through llvm.arithmetic.fence (a no-op on the values): without it
        LLVM merges the rounds and builds each column from n sources by inserts and stack spills,
        ~200 cycles a 16 x 16 tile instead of ~70 (all 56x56 rows of 256 channels: 0.10 -> 0.038 ms)."""
        n, s = self.n, 1
        while s < n:
            out = list(rows)
            for i in range(n):
                if not i & s:
                    a, b = rows[i], rows[i | s]
                    out[i] = tvm.tirx.Shuffle([a, b], [n + (k ^ s) if k & s else k for k in range(n)])
                    out[i | s] = tvm.tirx.Shuffle([a, b], [n + k if k & s else k ^ s for k in range(n)])
            rows = [_pure(f"float32x{n}", "llvm.arithmetic.fence", r) for r in out]
            s *= 2
        return rows

    def transpose_tile(self, xt, cw, x, n, c0, h, j0, dc) -> None:
        """xt[j*cw + dc + i] = x[n, c0 + i, h, j] for i < lanes, j0 <= j < j0+lanes (NCHW rows to
        pixels of channels)."""
        self._transpose_store([x[n, c0 + i, h, self.ramp(j0)] for i in range(self.n)], xt, lambda j: (j0 + j) * cw + dc)

    def untranspose_tile(self, xt, stride, x, n, b, h, j0, base) -> None:
        """xt[base + i*stride + j - j0] = x[n, b, h, j, i] for i < lanes, j0 <= j < j0+lanes (a
        blocked x, N x C/lanes x H x W x lanes: pixels of channels to rows of one channel)."""
        self._transpose_store([x[n, b, h, j0 + j, self.ramp(0)] for j in range(self.n)], xt,
                              lambda i: base + i * stride)

    def _transpose_store(self, rows, xt, at) -> None:
        """Column k of the tile whose rows are ``rows`` stored at xt[at(k) ...]. Emits its stores
        through the IR builder (called from a macro), so that the columns of the shuffled tile
        are Python values, not a TIR loop."""
        cols = self.transpose(rows)
        for k in range(self.n):
            T.buffer_store(xt, cols[k], [self.ramp(at(k))])

    def block_width(self, cb: int) -> int:
        """Channels per pixel of a channels-last block of cb channels read n at a time."""
        return -(-cb // self.n) * self.n

    def block_lanes(self, C: int, cb: int, kb, g):
        """TIR bool x n: the lanes of group g (channels g*n + lane of channel block kb, blocks
        of cb channels) that are channels of the block and of the input (< cb and < C)."""
        if cb % self.n == 0 and C % cb == 0:
            return self.bcast(True, "bool")
        cc = self.ramp(g * self.n)
        return tvm.tirx.And(cc < self.bcast(cb), cc + self.bcast(kb * cb) < self.bcast(C))


@T.macro
def channels_last_block(vec: Lanes, xt, x, n, h, kb, cb: int, C: int, W: int, cbi: int = 0):
    """xt[j*cw + c] = channel kb*cb + c of pixel (n, h, j) of x for c < cw = vec.block_width(cb)
    where kb*cb + c < C, else 0 (xt: W*cw floats, 7 KB for 32 channels of 56 pixels: it stays
    in L1). x is N x C x H x W (``cbi`` 0), or in blocks of cbi channels (layout.py: N x
    ceil(C/cbi) x H x W x cbi, zeros past C).

    Lanes past the block (c >= cb) hold the next block's channels: a reader masks them off
    (block_lanes). From NCHW: lanes x lanes register transposes when C and cb are multiples of
    the lanes and W >= lanes (the last column tile overlaps the one before it), else element by
    element. From blocks that tile the block (cb a multiple of cbi): one contiguous copy of cbi
    channels per pixel and x block, no transpose."""
    cw = vec.block_width(cb)
    L = vec.n
    if cbi > 0:
        nb = -(-C // cbi)
        if cb % cbi == 0 and cw % cbi == 0:
            for cv in range(cw // cbi):
                for j in range(W):
                    for c in T.vectorized(cbi):
                        xt[j * cw + cv * cbi + c] = T.if_then_else(
                            kb * (cb // cbi) + cv < nb, x[n, T.min(kb * (cb // cbi) + cv, nb - 1), h, j, c], T.float32(0))
        else:
            for j, c in T.grid(W, cw):
                xt[j * cw + c] = T.if_then_else(kb * cb + c < C, x[n, T.min(kb * cb + c, C - 1) // cbi, h, j,
                                                                   T.min(kb * cb + c, C - 1) % cbi], T.float32(0))
    elif C % L == 0 and cb % L == 0 and W >= L:
        for cv in range(cw // L):
            if kb * cb + cv * L < C:
                for jt in range(-(-W // L)):
                    vec.transpose_tile(xt, cw, x, n, kb * cb + cv * L, h, T.min(jt * L, W - L), cv * L)
            else:  # past C in the last block
                for j, c in T.grid(W, L):
                    xt[j * cw + cv * L + c] = T.float32(0)
    else:
        for j, c in T.grid(W, cw):
            xt[j * cw + c] = T.if_then_else(kb * cb + c < C, x[n, T.min(kb * cb + c, C - 1), h, j], T.float32(0))
