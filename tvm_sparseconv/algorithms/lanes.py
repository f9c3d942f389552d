"""LANES channels at a time: the vector pieces of the channels-last encoders (pixcsr, hybrid).

An encoder copies one channel block of an input row channels-last (``channels_last_block``:
16x16 register transposes), then takes LANES channels of a pixel per vector load, tests the
lanes (``nonzero_lanes``), counts them (``count_lanes``: a kmov + popcnt) and stores the
selected ones packed (``compress_store``): no data-dependent branch, no scalar loop over
channels.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

LANES = 16  # channels the encoder handles at once: one zmm of float32


def ramp(base):
    """TIR int32xLANES: base, base + 1, ..."""
    return tvm.tirx.Ramp(base, 1, LANES)


def bcast(value, dtype: str = "int32"):
    """TIR dtype x LANES: value in every lane (a Python number or a scalar expression)."""
    return tvm.tirx.Broadcast(tvm.tirx.const(value, dtype) if isinstance(value, (bool, int, float)) else value, LANES)


def nonzero_lanes(v):
    """TIR: per lane, float32xLANES v is a non-zero (on the bits, as base.nonzero)."""
    bits = tvm.tirx.reinterpret(f"int32x{LANES}", v)
    return bits & bcast(0x7FFFFFFF) != bcast(0)


def count_lanes(mask):
    """TIR int32: the lanes of a boolxLANES mask that are set."""
    return tvm.tirx.call_llvm_pure_intrin("int32", f"llvm.vector.reduce.add.v{LANES}i32", tvm.tirx.Cast(f"int32x{LANES}", mask))


def compress_store(buf, index, value, mask):
    """TIR: store the lanes of value that mask selects at buf[index], buf[index + 1], ...

    Compressed in a register, then a masked store of the first count lanes: a vcompress
    straight to memory costs ~20 cycles on this CPU, these two ~2."""
    dtype = str(value.ty.dtype)
    kind = "f32" if "float" in dtype else "i32"
    # the passthru is value itself: lanes past the count are never stored, and a constant
    # passthru makes LLVM 22's expansion for targets without AVX-512 fail instruction selection
    packed = tvm.tirx.call_llvm_pure_intrin(dtype, f"llvm.experimental.vector.compress.v{LANES}{kind}", value, mask,
                                            value)
    first = ramp(0) < bcast(count_lanes(mask))
    return tvm.tirx.call_llvm_intrin("void", f"llvm.masked.store.v{LANES}{kind}.p0", packed,
                                     tvm.tirx.address_of(buf[index]), first)


def _transpose16(rows):
    """LANES vectors (rows of a LANES x LANES tile) -> its columns, by 4 rounds of two-source
    shuffles (vpermt2ps); round s swaps bit s of the row index with bit s of the lane.

    Each round's results pass through llvm.arithmetic.fence (a no-op on the values): without it
    LLVM merges the rounds and builds each column from 16 sources by inserts and stack spills,
    ~200 cycles a tile instead of ~70 (all 56x56 rows of 256 channels: 0.10 -> 0.038 ms)."""
    for s in (1, 2, 4, 8):
        out = list(rows)
        for i in range(LANES):
            if not i & s:
                a, b = rows[i], rows[i | s]
                out[i] = tvm.tirx.Shuffle([a, b], [LANES + (k ^ s) if k & s else k for k in range(LANES)])
                out[i | s] = tvm.tirx.Shuffle([a, b], [LANES + k if k & s else k ^ s for k in range(LANES)])
        rows = [tvm.tirx.call_llvm_pure_intrin(f"float32x{LANES}", "llvm.arithmetic.fence", r) for r in out]
    return rows


def _transpose_tile(xt, cw, x, n, c0, h, j0, dc):
    """xt[j*cw + dc + i] = x[n, c0 + i, h, j] for i < LANES, j0 <= j < j0+LANES.

    Emits its LANES stores through the IR builder (called from a macro), so that the columns
    of the shuffled tile are Python values, not a TIR loop."""
    cols = _transpose16([x[n, c0 + i, h, ramp(j0)] for i in range(LANES)])
    for j in range(LANES):
        T.buffer_store(xt, cols[j], [ramp((j0 + j) * cw + dc)])


def block_width(cb: int) -> int:
    """Channels per pixel of a channels-last block of cb channels read LANES at a time."""
    return -(-cb // LANES) * LANES


@T.macro
def channels_last_block(xt, x, n, h, kb, cb: int, C: int, W: int):
    """xt[j*cw + c] = x[n, kb*cb + c, h, j] for c < cw = block_width(cb) where kb*cb + c < C, else
    0 (x: N x C x H x W; xt: W*cw floats, 7 KB for 32 channels of 56 pixels: it stays in L1).

    Lanes past the block (c >= cb) hold the next block's channels: a reader masks them off
    (block_lanes). 16x16 register transposes when C and cb are multiples of LANES and W >= LANES
    (the last column tile overlaps the one before it), else element by element."""
    cw = block_width(cb)
    if C % LANES == 0 and cb % LANES == 0 and W >= LANES:
        for c16 in range(cw // LANES):
            if kb * cb + c16 * LANES < C:
                for jt in range(-(-W // LANES)):
                    _transpose_tile(xt, cw, x, n, kb * cb + c16 * LANES, h, T.min(jt * LANES, W - LANES), c16 * LANES)
            else:  # past C in the last block
                for j, c in T.grid(W, LANES):
                    xt[j * cw + c16 * LANES + c] = T.float32(0)
    else:
        for j, c in T.grid(W, cw):
            xt[j * cw + c] = T.if_then_else(kb * cb + c < C, x[n, T.min(kb * cb + c, C - 1), h, j], T.float32(0))


def block_lanes(C: int, cb: int, kb, g):
    """TIR boolxLANES: the lanes of group g (channels g*LANES + lane of channel block kb, blocks
    of cb channels) that are channels of the block and of the input (< cb and < C)."""
    if cb % LANES == 0 and C % cb == 0:
        return bcast(True, "bool")
    cc = ramp(g * LANES)
    return tvm.tirx.And(cc < bcast(cb), cc + bcast(kb * cb) < bcast(C))
