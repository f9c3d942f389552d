"""Output-stationary register tiles shared by the sparse kernels (im2csr, halo).

Specified in docs/algorithms.md section 11.

A tile is ``block`` consecutive output pixels of one output row x ``m_tile`` output channels;
its block x m_tile accumulators stay in registers while the entries that feed it are walked,
and each weight vector loaded serves the block's pixels. Also the two-pass encoder skeleton
(count, prefix sum, fill) the formats share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tvm.script import tirx as T

from ..conv import Conv2DSpec
from ..cpu import CPU
from .base import KnobError, any_nonzero, blocked_value, store_output

# How the (m-tile, group) work is split across threads:
#   tile_outer  for each m-tile (serial): all groups in parallel (the m-tile's weights stay in L2)
#   fused       one parallel loop over (m-tile, group)
#   tile_inner  groups in parallel, every m-tile of a group in turn (the group's entries stay in L1)
TILE_SPLITS = ("tile_outer", "fused", "tile_inner")
M_TILES = (64, 32, 16)


@dataclass(frozen=True)
class Tiling:
    """Groups of ``block`` consecutive output pixels of one output row x tiles of ``m_tile`` channels.

    Group g = (n, r, t) with t < per_row = ceil(Ow / block) covers pixels t*block .. t*block+block-1
    of output row r of image n; tile mo covers output channels mo*m_tile .. mo*m_tile+m_tile-1
    (channels >= M are computed on zero weights and never stored).
    """

    block: int
    m_tile: int
    split: str
    n_tiles: int
    per_row: int
    n_groups: int


def default_m_tile(m: int, tiles=M_TILES) -> int:
    """The tile of ``tiles`` that wastes least on padding M, the larger on a tie."""
    return min(tiles, key=lambda t: (-(-m // t) * t, -t))


def tile_pixels(cpu: CPU, m_tile: int, most: int) -> int:
    """Pixels of a register tile of m_tile channels: as many as cpu.accumulators vector
    registers hold, at most ``most``, at least 1."""
    return max(1, min(most, cpu.accumulators * cpu.lanes // m_tile))


def tiling_defaults(spec: Conv2DSpec, cpu: CPU, tiles=M_TILES) -> dict:
    """m_tile by default_m_tile among ``tiles`` of at most 4 vectors; block by tile_pixels (at
    most 8), then the smallest block with as many groups per output row (Ow = 14: 7, not 8 with
    2 pixels wasted); split "fused": with an even number of m-tiles, each of 2 threads gets
    every group of half the tiles (equal work, half the weights each)."""
    m_tile = default_m_tile(spec.out_channels, [t for t in tiles if t <= 4 * cpu.lanes] or [min(tiles)])
    block = min(tile_pixels(cpu, m_tile, 8), spec.out_w)
    block = -(-spec.out_w // -(-spec.out_w // block))
    return {"block": block, "m_tile": m_tile, "split": "fused"}


def make_tiling(algorithm: str, spec: Conv2DSpec, knobs) -> Tiling:
    block, m_tile, split = knobs["block"], knobs["m_tile"], knobs["split"]
    for name, v in (("block", block), ("m_tile", m_tile)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise KnobError(f"{algorithm}: knob {name} must be a positive int, got {v!r}")
    if split not in TILE_SPLITS:
        raise KnobError(f"{algorithm}: knob split must be one of {TILE_SPLITS}, got {split!r}")
    per_row = -(-spec.out_w // block)
    return Tiling(int(block), int(m_tile), split, -(-spec.out_channels // m_tile), per_row,
                  spec.batch * spec.out_h * per_row)


def tile_weights(w: np.ndarray, m_tile: int) -> np.ndarray:
    """[..., M] -> [ceil(M / m_tile), ..., m_tile], M zero-padded to whole tiles.

    Tile-major, so that the weights one m-tile's groups read are one contiguous block
    (streamed once per tile, kept in L2) and rows read together are adjacent.
    """
    n_tiles = -(-w.shape[-1] // m_tile)
    w = np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, n_tiles * m_tile - w.shape[-1])])
    w = w.reshape(w.shape[:-1] + (n_tiles, m_tile))
    return np.ascontiguousarray(np.moveaxis(w, -2, 0), dtype=np.float32)


def group_coords(spec: Conv2DSpec, tl: Tiling, g):
    """(n, r, first output pixel) of group g."""
    return g // (spec.out_h * tl.per_row), g // tl.per_row % spec.out_h, g % tl.per_row * tl.block


@T.macro
def for_each_tile(tl, tile):
    """Call tile(mo, g) for every (m-tile, group), split across threads by tl.split."""
    if tl.split == "tile_outer":
        for mo in range(tl.n_tiles):
            for g in T.parallel(tl.n_groups):
                tile(mo, g)
    elif tl.split == "fused":
        for f in T.parallel(tl.n_tiles * tl.n_groups):
            tile(f // tl.n_groups, f % tl.n_groups)
    else:
        for g in T.parallel(tl.n_groups):
            for mo in range(tl.n_tiles):
                tile(mo, g)


@T.macro
def zero_tile(acc, tl):
    for b in T.unroll(tl.block):
        for j in T.vectorized(tl.m_tile):
            acc[b, j] = T.float32(0)


@T.macro
def store_tile(y, acc, bias, res, spec, tl, ep, n, r, s0, m0):
    """y[n, m0 + j, r, s0 + b] = epilogue(acc[b, j]) for the pixels < Ow and channels < M
    (res: y-shaped residual input, read when ep.residual).

    Fully unrolled so that acc stays in registers (a dynamic index would force it to memory).
    """
    for j in T.unroll(tl.m_tile):
        if spec.out_channels % tl.m_tile == 0 or m0 + j < spec.out_channels:
            for b in T.unroll(tl.block):
                if spec.out_w % tl.block == 0 or s0 + b < spec.out_w:
                    store_output(y, (n, m0 + j, r, s0 + b), acc[b, j], bias, res, ep)


@T.macro
def prefix_sum(ptr, rows):
    """ptr[0] = 0; ptr[g + 1] (the count of row g) becomes the end of row g."""
    ptr[0] = 0
    for g in range(rows):
        ptr[g + 1] = ptr[g + 1] + ptr[g]


def row_store_bias(spec: Conv2DSpec, mt: int, cbo: int = 0) -> int:
    """The bias length row_store reads: M, or M padded to whole tiles when y is blocked (the
    channels past M read bias 0)."""
    return -(-spec.out_channels // mt) * mt if cbo else spec.out_channels


def row_store(spec: Conv2DSpec, mt: int, cbo: int = 0):
    """The macro store(y, part, bias, res, ep, n, r0, rows, m0): y[n, m0 + j, r0 + rr, s] =
    epilogue(part[rr, s, j]) for the rows < Oh (part: rows x >= Ow x mt, partial sums of output
    rows r0 .. r0+rows-1; res: the residual input in y's layout, read when ep.residual).

    y in NCHW (``cbo`` 0): the channels < M, each a strided row of part. y in blocks of cbo
    channels (N x ceil(M/cbo) x Oh x Ow x cbo): per pixel, vectors of gcd(mt, cbo) channels,
    contiguous in part and in y (cbo a power of two: a vector never straddles two blocks); the
    channels past M of the last block 0 (the layout's promise; bias is padded to the M tiles),
    blocks past the last not stored."""
    M, Oh, Ow = spec.out_channels, spec.out_h, spec.out_w
    if cbo == 0:
        @T.macro
        def store(y, part, bias, res, ep, n, r0, rows, m0):
            for j in range(mt):
                if M % mt == 0 or m0 + j < M:
                    for rr, s in T.grid(rows, Ow):
                        if Oh % rows == 0 or r0 + rr < Oh:
                            store_output(y, (n, m0 + j, r0 + rr, s), part[rr, s, j], bias, res, ep)

        return store
    vw = math.gcd(mt, cbo)
    covered = -(-M // cbo) * cbo

    @T.macro
    def store_blocked(y, part, bias, res, ep, n, r0, rows, m0):
        for jb in range(mt // vw):
            if m0 + jb * vw < covered:
                for rr, s in T.grid(rows, Ow):
                    if Oh % rows == 0 or r0 + rr < Oh:
                        for j in T.vectorized(vw):
                            y[n, (m0 + jb * vw) // cbo, r0 + rr, s, (m0 + jb * vw) % cbo + j] = blocked_value(
                                part[rr, s, jb * vw + j], m0 + jb * vw + j, bias, ep, res,
                                (n, (m0 + jb * vw) // cbo, r0 + rr, s, (m0 + jb * vw) % cbo + j), M, M < covered)

    return store_blocked


@T.macro
def two_pass_encode(units, rows, ptr, unit_pass, rows2=0, ptr2=None):
    """Count (unit_pass(u, False) writes ptr[g + 1] for its rows g, and ptr2's when there is a
    second pointer array), prefix sums over the rows, fill (unit_pass(u, True)); a parallel
    unit handles several consecutive pointer rows."""
    for u in T.parallel(units):
        unit_pass(u, False)
    prefix_sum(ptr, rows)
    if rows2 > 0:
        prefix_sum(ptr2, rows2)
    for u in T.parallel(units):
        unit_pass(u, True)


@T.macro
def emit_entry(end, idx, val, pos, p, index, v, width, fill):
    """One candidate entry (index, v[0:width]) of a row whose next slot is pos[p] (val is
    (cap, width), or (cap,) when width is 1); pos[p] += 1 when any value is non-zero.

    The fill writes every candidate at pos[p] while it is < ``end``, without a data-dependent
    branch: a candidate that is not stored is overwritten by the next stored one. With ``end``
    the row's own end, ptr[g + 1], nothing is written outside the row. A caller that fills its
    rows in increasing order may pass the end of its last row: a row's trailing candidates then
    land on the next rows' first slots, which those rows (or a later one) overwrite.
    """
    if fill:
        if pos[p] < end:
            idx[pos[p]] = index
            if len(val.shape) == 1:  # one value per entry
                val[pos[p]] = v[0]
            else:
                for k in T.unroll(width):
                    val[pos[p], k] = v[k]
    pos[p] = pos[p] + T.Cast("int32", any_nonzero(v, width))


@T.macro
def start_rows(ptr, pos, g0, count, fill, unroll=False):
    """pos[t] = next slot of row g0 + t: its start when filling, a zero count when counting
    (``unroll``: a few rows whose pos stays in registers)."""
    for t in (T.unroll if unroll else T.serial)(count):
        if fill:
            pos[t] = ptr[g0 + t]
        else:
            pos[t] = 0


@T.macro
def finish_rows(ptr, pos, g0, count, fill, unroll=False):
    """After counting: ptr[g0 + t + 1] = the count of row g0 + t."""
    if not fill:
        for t in (T.unroll if unroll else T.serial)(count):
            ptr[g0 + t + 1] = pos[t]


# --- im2csr --------------------------------------------------------------------------------
