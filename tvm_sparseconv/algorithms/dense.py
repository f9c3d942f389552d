"""dense: register-tiled direct convolution in TIR.

Specified in docs/algorithms.md section 10 (the activation layouts: section 16).

Two kernels (knob ``kernel``), both output-stationary with the accumulators in registers:

window (any layer): x N x C x H x W (NCHW), read in place with the padded taps skipped, or,
    with knob pad="copy", xp, a zero-padded copy made by a "pad" stage (kind "encode");
    w n_mt x Kh x C x Kw x m_tile, the OIHW weights cut into tiles of m_tile output channels,
    channels past M zero (laid out once, at build time); y N x M x Oh x Ow (NCHW). A register
    tile is ``block`` consecutive output pixels of one row x m_tile channels (vectors of
    channels).
gemm (pointwise layers: 1x1, no padding; stride 1 from NCHW, any stride from channel blocks):
    y[n] (M x P) = w (M x C) . x[n] (C x P), P = Oh*Ow read flat (output pixel p reads input
    pixel (p // Ow * sh, p % Ow * sw)); w n_mt x C x m_tile. From NCHW, a register tile is
    m_tile channels x ``block`` consecutive pixels (vectors of pixels); from channel blocks,
    ``block`` pixels x m_tile channels (vectors of channels, as window).

Knobs ``layout_in`` and ``layout_out`` (layout.py: "nchw" or "nchw{cb}c") say how x and y
(and the residual, which arrives in y's layout) are held; a blocked y has zeros in the
channels past M of its last block. The loop structure, the thread splits and the knob
defaults (default_tiling, derived from the CPU description, cpu.py) with the measurements
behind them: docs/algorithms.md section 10.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np
import tvm
from tvm.script import tirx as T

from ..conv import Conv2DSpec, Epilogue
from ..cpu import CPU, cpu_of
from ..layout import NCHW, channel_block, lanes_layout, layout_of_block, layout_shape
from ..reference import dense_conv2d
from ..reference.storage import Storage
from .base import (SCRATCH_IN_WORKSPACE, Algorithm, Buffer, KnobError, Stage, balanced, bias_constant,
                   blocked_value, drop_unused, epilogue_inputs, grid, knob_blocks, prim, register, registers_ok,
                   store_output)

KERNELS = ("window", "gemm")
# the kernel "window" was called "direct" (the name of another algorithm); plans written then
# still load
_OLD_KERNEL_NAMES = {"direct": "window"}
# parallel task order: (n, M tile, row), (n, row, M tile), or (n, band, M tile, row in band):
# TVM hands each thread a contiguous run of tasks, so m_outer splits the threads by output
# channels, row_outer and row_band by pixels (row_band: BANDS halves of the rows, each walked M
# tile by M tile, so its output rows are written in long runs). Which is fastest depends on
# which core wrote the input (tune/refine.py chooses inside the model). row_band has one band
# per core of the target.
DENSE_SPLITS = ("m_outer", "row_outer", "row_band")
PADS = ("inplace", "copy")  # padding: skip the padded taps, or copy x into a zero-padded xp first
# m_tile of the kernels whose vectors are output channels (window; gemm from channel blocks):
# powers of two, and 3 x powers of two (3 vectors of 4, 8, 16 or 32 lanes) for M a multiple of
# 3 vectors but not of 2 (M = 24 on AVX2: a 16-channel tile computed 8 channels of zeros, and a
# 24-channel tile ran 1.3-1.4x faster on MobileNet-V2's 144 -> 24 layer at batch 8 on the Zen 3).
# Every tile is written as whole vectors of vector_width lanes (the CPU's): one 48-wide TIR
# vector compiled ~5x slower than 32 or 64 and a 24-wide one ran 8x slower; a 16-wide one on
# AVX2 took its second half apart lane by lane in the store (the 32 -> 128 1x1 with its residual
# at 56 x 56 ran 1.2-1.35x faster in 8-wide vectors)
CHANNEL_VECTOR_TILES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass(frozen=True)
class DenseTiling:
    kernel: str   # one of KERNELS
    block: int    # output pixels per register tile (window: 1..32 of one row; gemm: 4..64 whole vectors
                  # from NCHW, 1..32 from channel blocks)
    m_tile: int   # output channels per register tile (CHANNEL_VECTOR_TILES; gemm from NCHW: 1..16)
    c_block: int  # window: input channels per cache block (0: all channels in one block)
    split: str    # one of DENSE_SPLITS ("row" = a pixel tile for gemm)
    pad: str      # window: one of PADS
    n_mt: int     # M tiles: ceil(M / m_tile), M rounded up to whole channel blocks of a blocked y
    cb_in: int    # channel block of x (layout.channel_block: 0 for NCHW)
    cb_out: int   # channel block of y and the residual (0 for NCHW)

    @property
    def pixel_vectors(self) -> bool:
        """The register tile's vectors are pixels (gemm from NCHW), not output channels."""
        return self.kernel == "gemm" and self.cb_in == 0


def vector_width(m_tile: int, cpu: CPU) -> int:
    """Lanes per TIR vector of a channel-vector tile: the CPU's vectors that divide it (8 on
    AVX2 for 16, 24 or 32 channels; 4 for a tile of 4 or 12)."""
    return gcd(m_tile, cpu.lanes)


def _cdiv(a, b: int):
    """ceil(a / b) of a positive int b and an int or a TIR expression (// is floordiv on both)."""
    return -(-a // b)


def is_pointwise(spec: Conv2DSpec) -> bool:
    """1x1, stride 1, no padding: a GEMM over the flat pixels (the gemm kernel applies in either
    layout)."""
    return (spec.kernel_h, spec.kernel_w, spec.stride) == (1, 1, (1, 1)) and not any(spec.padding)


def gemm_applies(spec: Conv2DSpec, cb_in: int) -> bool:
    """Whether the gemm kernel computes the layer with x held in channel blocks of ``cb_in``
    (0: NCHW): pointwise, or 1x1 without padding at any stride from channel blocks (each output
    pixel's input is one pixel's block: a strided pixel is no vector of NCHW)."""
    if cb_in == 0:
        return is_pointwise(spec)
    return (spec.kernel_h, spec.kernel_w) == (1, 1) and not any(spec.padding)


def default_tiling(spec: Conv2DSpec, cpu: CPU, kernel: str | None = None, layout_in: str = NCHW) -> dict:
    """Knob defaults by layer shape and CPU, for ``kernel`` (None: gemm for pointwise layers,
    else window) reading x in ``layout_in``; both layouts default to NCHW. The policy, each
    rule with the measurement that chose it: docs/algorithms.md section 10.4.

    - gemm from NCHW: 3/4 of cpu.registers as accumulators, 3 vectors of pixels when they
      divide H*W (else 2); split row_outer when the layer reduces channels and a pixel tile's
      input fits in cpu.l1d, else m_outer;
    - gemm from channel blocks: 2 vectors of output channels (fewer when M is smaller; 3 when M
      is a multiple of 3 vectors but not of 2) x as many pixels as fill 3/4 of cpu.registers;
      the split as from NCHW;
    - window: block x m_tile = half the accumulators in pixels x 2 vectors (one vector when M
      is a multiple of one but not of two; a third of the accumulators x 3 vectors when M is a
      multiple of 3 vectors but not of 2), the pixels balanced over the row; the accumulators
      are cpu.accumulators, or registers - 6 at stride 1 on 16-register ISAs; at stride 2
      with C >= 64, a quarter of cpu.accumulators x 4 vectors in blocks of 64 channels; split
      row_outer when all the weights fit in half of cpu.l2, else m_outer.
    """
    ow, m, c, v = spec.out_w, spec.out_channels, spec.in_channels, cpu.lanes
    layouts = {"layout_in": layout_in, "layout_out": NCHW}
    if kernel == "gemm" or (kernel is None and is_pointwise(spec)):
        if layout_in == NCHW:
            vectors = 3 if spec.height * spec.width % (3 * v) == 0 else 2
            block, m_tile = vectors * v, min(16, cpu.registers * 3 // 4 // vectors, m)
        else:
            m_tile = 3 * v if _three_vectors(m, v) else min(2 * v, max(4, 1 << (m - 1).bit_length()))
            block = max(1, min(32, cpu.registers * 3 // 4 * v // m_tile))
        split = "row_outer" if c > m and 4 * c * block <= cpu.l1d else "m_outer"
        return {"kernel": "gemm", "block": block, "m_tile": m_tile, "c_block": 0, "split": split,
                "pad": "inplace", **layouts}
    split = "row_outer" if 4 * m * c * spec.kernel_h * spec.kernel_w <= cpu.l2 // 2 else "m_outer"
    acc = cpu.accumulators
    if cpu.registers <= 16 and spec.stride[1] == 1:
        # 10 of 16: the tile, the tap's weight vectors and a broadcast fit with 3 to spare (12
        # spilled); 5 x 2 vectors ran at 177-205 GFLOP/s against 4 x 2's 154-191 on VGG's and
        # ResNet's 3x3 layers on the Zen 3, 4 x 2 ahead at stride 2 (docs/algorithms.md 10.4)
        acc = cpu.registers - 6
    block, m_tile, c_block = acc // 2, 2 * v, 0
    if _three_vectors(m, v):
        block, m_tile = acc // 3, 3 * v
    elif m <= v or (m % (2 * v) and m % v == 0):
        m_tile = v
    if spec.stride[1] > 1 and c >= 64 and m % (4 * v) == 0:
        block, m_tile, c_block = cpu.accumulators // 4, 4 * v, 64
    return {"kernel": "window", "block": balanced(min(block, ow), ow), "m_tile": m_tile, "c_block": c_block,
            "split": split, "pad": "inplace", **layouts}


def _three_vectors(m: int, v: int) -> bool:
    """Whether M output channels take tiles of 3 vectors of v lanes by default: a multiple of
    3v but not of 2v (M = 24 on AVX2), where 2-vector tiles would compute zeros."""
    return m % (3 * v) == 0 and m % (2 * v) != 0


def make_tiling(spec: Conv2DSpec, knobs) -> DenseTiling:
    kernel, block, m_tile, c_block, split, pad = (
        knobs[k] for k in ("kernel", "block", "m_tile", "c_block", "split", "pad"))
    cb_in, cb_out = knob_blocks("dense", knobs)
    if kernel not in KERNELS:
        raise KnobError(f"dense: kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "gemm" and not gemm_applies(spec, cb_in):
        raise KnobError("dense: kernel='gemm' needs a 1x1 layer without padding, at stride 1 from NCHW")
    if kernel == "gemm" and cb_in == 0:
        # whole 4-lane vectors at least (a tail vector is masked); the default is 2-3 vectors of the CPU
        if not (isinstance(block, int) and 4 <= block <= 64 and block % 4 == 0):
            raise KnobError(f"dense: gemm block must be a multiple of 4 pixels in 4..64, got {block!r}")
        if not (isinstance(m_tile, int) and 1 <= m_tile <= 16):
            raise KnobError(f"dense: gemm m_tile must be an int in 1..16, got {m_tile!r}")
    else:
        if not (isinstance(block, int) and 1 <= block <= 32):
            raise KnobError(f"dense: block must be an int in 1..32, got {block!r}")
        if m_tile not in CHANNEL_VECTOR_TILES:
            raise KnobError(f"dense: m_tile must be one of {CHANNEL_VECTOR_TILES}, got {m_tile!r}")
        if kernel == "window":
            block = min(block, spec.out_w)
    if not (isinstance(c_block, int) and c_block >= 0):
        raise KnobError(f"dense: c_block must be an int >= 0 (0: all channels), got {c_block!r}")
    if split not in DENSE_SPLITS:
        raise KnobError(f"dense: split must be one of {DENSE_SPLITS}, got {split!r}")
    if pad not in PADS:
        raise KnobError(f"dense: pad must be one of {PADS}, got {pad!r}")
    c, m = spec.in_channels, spec.out_channels
    if cb_out:  # every channel of a blocked y's last block is written (zeros past M)
        m = _cdiv(m, cb_out) * cb_out
    c_block = min(c_block or c, c)
    if cb_in and c_block < c:  # cache blocks of whole channel blocks of x (the channel loop walks those)
        c_block = min(_cdiv(c_block, cb_in) * cb_in, c)
    return DenseTiling(kernel, block, m_tile, c_block, split, pad, _cdiv(m, m_tile), cb_in, cb_out)


def tile_weights(spec: Conv2DSpec, w: np.ndarray, tl: DenseTiling) -> np.ndarray:
    """OIHW (M x C x Kh x Kw) -> window: n_mt x Kh x C x Kw x m_tile; gemm: n_mt x C x m_tile.
    Output channels past M are zero."""
    wp = np.zeros((tl.n_mt * tl.m_tile,) + w.shape[1:], np.float32)
    wp[:spec.out_channels] = w
    wp = wp.reshape(tl.n_mt, tl.m_tile, *w.shape[1:])  # n_mt, m_tile, C, Kh, Kw
    if tl.kernel == "gemm":
        return np.ascontiguousarray(wp[:, :, :, 0, 0].transpose(0, 2, 1))
    return np.ascontiguousarray(wp.transpose(0, 3, 2, 4, 1))


def _lanes_view(buf, spec_shape, cb: int):
    """A view of an N x C x H x W tensor held with channel block ``cb`` (0: NCHW) as
    N x ceil(C/cb) x H x W x cb, NCHW as N x C x H x W x 1: one index form for both layouts."""
    n, c, h, w = spec_shape
    cb = max(cb, 1)
    return T.decl_buffer((n, _cdiv(c, cb), h, w, cb), "float32", data=buf.data)


def _pad_func(spec: Conv2DSpec, cb: int):
    """x -> xp, both in the layout of channel block ``cb`` (0: NCHW), zero borders (the lanes
    past C of a blocked x are copied, zeros as they are); parallel over (n, channel block)."""
    N, C, H, W = spec.x_shape
    Hp, Wp = spec.padded_h, spec.padded_w
    pt, pl = spec.padding[0], spec.padding[1]
    L = max(cb, 1)
    NB = _cdiv(C, L)

    @T.prim_func
    def pad(x: T.Buffer(layout_shape(spec.x_shape, layout_of_block(cb)), "float32"),
            xp: T.Buffer(layout_shape((N, C, Hp, Wp), layout_of_block(cb)), "float32")):
        xv = _lanes_view(x, (N, C, H, W), cb)
        pv = _lanes_view(xp, (N, C, Hp, Wp), cb)
        for t in T.parallel(N * NB):
            for h in range(Hp):
                if h >= pt and h < pt + H:
                    for w, l in T.grid(pl, L):
                        pv[t // NB, t % NB, h, w, l] = T.float32(0)
                    for w in range(W):
                        for l in T.vectorized(L):
                            pv[t // NB, t % NB, h, pl + w, l] = xv[t // NB, t % NB, h - pt, w, l]
                    for w, l in T.grid(Wp - pl - W, L):
                        pv[t // NB, t % NB, h, pl + W + w, l] = T.float32(0)
                else:
                    for w, l in T.grid(Wp, L):
                        pv[t // NB, t % NB, h, w, l] = T.float32(0)

    return pad


def _when(flag: bool, cond):
    """``cond`` when ``flag``, else True (an ``if True:`` vanishes when the TVMScript is parsed)."""
    return cond if flag else True


def _in_range(v, n: int):
    return tvm.tirx.all(v >= 0, v < n)


def _task(t, n_mt: int, rows: int, split: str, bands: int):
    """Task t -> (n, M tile, row or pixel tile) in the split's order, as expressions: binding
    them to names (let statements) made the gemm kernel ~15% slower."""
    if split == "m_outer":
        return t // (n_mt * rows), t // rows % n_mt, t % rows
    if split == "row_band":  # bands of `size` rows (the last may be shorter): (n, band, mo, row in band)
        size = _cdiv(rows, bands)
        ti = t % (n_mt * rows)
        band = ti // (n_mt * size)
        ln = tvm.tirx.min(size, rows - band * size)  # this band's rows
        tb = ti - band * n_mt * size
        return t // (n_mt * rows), tb // ln, band * size + tb % ln
    return t // (n_mt * rows), t % n_mt, t // n_mt % rows


def _channel_vector_store(spec: Conv2DSpec, tl: DenseTiling, ep: Epilogue):
    """The store of a register tile acc[b, j] (BT pixels x m_tile channels, vectors of channels)
    as a macro store(yv, resv, bias, acc, n, mo, p0, BT), pixels p0 .. p0+BT-1 of the flat
    output. NCHW (yv N x M x P): one vector of BT pixels per channel, channels >= M not stored
    (per-element stores cost ~3x more). Blocked (yv N x ceil(M/cb) x P x cb): per pixel
    vectors of gcd(m_tile, cb) channels (cb a power of two: a vector never straddles two
    blocks), blocks past the last not stored."""
    M, mt, cbo = spec.out_channels, tl.m_tile, tl.cb_out
    if cbo == 0:
        m_whole = M % mt == 0

        @T.macro
        def store(yv, resv, bias, acc, n, mo, p0, BT):
            for j in T.unroll(mt):
                if _when(not m_whole, mo * mt + j < M):
                    for b in T.vectorized(BT):
                        store_output(yv, (n, mo * mt + j, p0 + b), acc[b, j], bias, resv, ep)

        return store
    vw = gcd(mt, cbo)
    covered = _cdiv(M, cbo) * cbo
    beyond = tl.n_mt * mt > covered  # the last M tile reaches past the last block

    @T.macro
    def store_blocked(yv, resv, bias, acc, n, mo, p0, BT):
        for b in T.unroll(BT):
            for jb in T.unroll(mt // vw):
                if _when(beyond, mo * mt + jb * vw < covered):
                    for j in T.vectorized(vw):
                        yv[n, (mo * mt + jb * vw) // cbo, p0 + b, (mo * mt + jb * vw) % cbo + j] = blocked_value(
                            acc[b, jb * vw + j], mo * mt + jb * vw + j, bias, ep, resv,
                            (n, (mo * mt + jb * vw) // cbo, p0 + b, (mo * mt + jb * vw) % cbo + j), M, M < covered)

    return store_blocked


def _output_views(spec: Conv2DSpec, tl: DenseTiling, ep: Epilogue, res, y):
    """Flat-pixel views of y and the residual in y's layout: N x M x P or N x ceil(M/cb) x P x cb."""
    N, M, Oh, Ow = spec.y_shape
    shape = (N, M, Oh * Ow) if tl.cb_out == 0 else (N, _cdiv(M, tl.cb_out), Oh * Ow, tl.cb_out)
    return (T.decl_buffer(shape, "float32", data=y.data),
            T.decl_buffer(shape, "float32", data=_residual_data(ep, res, y)))


def weights_outer(block: int, m_tile: int, v: int, cpu: CPU) -> bool:
    """Whether the window kernel's tap loops over its weight vectors outside its pixels (each
    weight vector loaded once, then one FMA per pixel): where pixels outside overflow the
    registers and weights outside do not. With pixels outside LLVM keeps every weight vector
    of the tap live for all pixels, and block x m_tile/v accumulators + m_tile/v weights + a
    broadcast (3 x 32 on AVX2: 12 + 4 + 1) spilled two accumulators in the channel loop, 2.3x
    slower than the 4 x 16 tile; weights outside keep the pixels' broadcasts live instead
    (12 + 3 + 1)."""
    acc, vectors = block * m_tile // v, m_tile // v
    return acc + vectors + 1 > cpu.registers >= acc + block + 1


def _window_func(spec: Conv2DSpec, tl: DenseTiling, cpu: CPU, ep: Epilogue, xin_shape, inplace: bool):
    """The multiply PrimFunc of the window kernel. ``inplace``: read x itself and skip the padded
    taps (a runtime test per kernel row, a compile-time one per border tile); otherwise read
    the padded copy xp, which has no out-of-range tap. ``xin_shape``: the NCHW shape of what it
    reads (x or xp), held in layout_in."""
    C, H, W, M = spec.in_channels, spec.height, spec.width, spec.out_channels
    Kh, Kw, Oh, Ow = spec.kernel_h, spec.kernel_w, spec.out_h, spec.out_w
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    pt, pl = (spec.padding[0], spec.padding[1]) if inplace else (0, 0)
    B, mt, cb, n_mt = tl.block, tl.m_tile, tl.c_block, tl.n_mt
    V = vector_width(mt, cpu)
    cbi = max(tl.cb_in, 1)
    n_cb = _cdiv(C, cb)
    ntask = spec.batch * n_mt * Oh
    row_check = inplace and (pt > 0 or (Oh - 1) * sh + (Kh - 1) * dh - pt >= H)
    W = W if inplace else spec.padded_w  # columns of the buffer read
    interior, border = _tile_classes(spec, B, pl, W)
    store = _channel_vector_store(spec, tl, ep)
    weights_first = weights_outer(B, mt, V, cpu)

    @T.macro
    def fma(xv, w, acc, n, mo, k, ci, i, l, w0, q, b, jv):
        for j in T.vectorized(V):
            acc[b, jv * V + j] = acc[b, jv * V + j] + \
                xv[n, k, i, (w0 + b) * sw + q * dw - pl, ci] * w[mo, l, k * cbi + ci, q, jv * V + j]

    @T.macro
    def channel_taps(xv, w, acc, n, mo, k, ci, i, l, w0, BT, col_check):
        """acc[b, :] += x[n, c, i, (w0 + b)*sw + q*dw - pl] * w[mo, l, c, q, :] for the channel
        c = k*cbi + ci (xv: x viewed as N x C/cbi x H x W x cbi, layout_in's blocks or cbi = 1).
        In a border tile (col_check) w0 is a constant, so the column test folds per (b, q)."""
        for q in T.unroll(Kw):
            if weights_first:
                for jv in T.unroll(mt // V):
                    for b in T.unroll(BT):
                        if _when(col_check, _in_range((w0 + b) * sw + q * dw - pl, W)):
                            fma(xv, w, acc, n, mo, k, ci, i, l, w0, q, b, jv)
            else:
                for b in T.unroll(BT):
                    if _when(col_check, _in_range((w0 + b) * sw + q * dw - pl, W)):
                        for jv in T.unroll(mt // V):
                            fma(xv, w, acc, n, mo, k, ci, i, l, w0, q, b, jv)

    @T.macro
    def taps(xv, w, acc, n, mo, c0, c1, i, l, w0, BT, col_check):
        """channel_taps for c0 <= c < c1 (c0 a multiple of cbi: make_tiling): the whole blocks,
        then the channels of a last partial one in a loop of their own (a test of the channel
        in the loop over all of them made a 58 -> 58 1x1 from 16-channel blocks 2x slower)."""
        for k, ci in T.grid((c1 - c0) // cbi, cbi):
            channel_taps(xv, w, acc, n, mo, c0 // cbi + k, ci, i, l, w0, BT, col_check)
        if C % cbi != 0:
            for ci in range((c1 - c0) % cbi):
                channel_taps(xv, w, acc, n, mo, c0 // cbi + (c1 - c0) // cbi, ci, i, l, w0, BT, col_check)

    @T.macro
    def tile(xv, w, bias, resv, yv, acc, part, n, mo, r, w0, BT, col_check, c0, c1, first, last):
        """Pixels w0 .. w0+BT-1 of row r, channels mo*mt .. +mt, input channels c0 .. c1-1."""
        if first:
            for b in T.unroll(BT):
                for jv in T.unroll(mt // V):
                    for j in T.vectorized(V):
                        acc[b, jv * V + j] = T.float32(0)
        else:
            for b in T.unroll(BT):
                for jv in T.unroll(mt // V):
                    for j in T.vectorized(V):
                        acc[b, jv * V + j] = part[w0 + b, jv * V + j]
        for l in T.unroll(Kh):
            if _when(row_check, _in_range(r * sh + l * dh - pt, H)):  # outside the channel loop
                taps(xv, w, acc, n, mo, c0, c1, r * sh + l * dh - pt, l, w0, BT, col_check)
        if last:
            store(yv, resv, bias, acc, n, mo, r * Ow + w0, BT)
        else:
            for b in T.unroll(BT):
                for jv in T.unroll(mt // V):
                    for j in T.vectorized(V):
                        part[w0 + b, jv * V + j] = acc[b, jv * V + j]

    def border_tiles(*args):
        """One copy of the tile per border tile, its w0 a constant (a Python loop at parse time)."""
        for w0, BT in border:
            tile(*args[:10], w0, BT, True, *args[10:])

    @T.macro
    def row(xv, w, bias, resv, yv, acc, part, n, mo, r, c0, c1, first, last):
        for g in range(interior[0], interior[1]):
            tile(xv, w, bias, resv, yv, acc, part, n, mo, r, g * B, B, False, c0, c1, first, last)
        border_tiles(xv, w, bias, resv, yv, acc, part, n, mo, r, c0, c1, first, last)

    @T.macro
    def body(xin, w, bias, res, y):
        xv = _lanes_view(xin, xin_shape, tl.cb_in)
        yv, resv = _output_views(spec, tl, ep, res, y)
        for t in T.parallel(ntask):
            acc = T.alloc_local((B, mt), "float32")
            if n_cb == 1:
                row(xv, w, bias, resv, yv, acc, acc, *_task(t, n_mt, Oh, tl.split, cpu.cores), 0, C, True, True)
            else:
                part = T.alloc_buffer((Ow, mt), "float32")
                for k in range(n_cb):
                    row(xv, w, bias, resv, yv, acc, part, *_task(t, n_mt, Oh, tl.split, cpu.cores), k * cb,
                        T.min(k * cb + cb, C),
                        k == 0, k == n_cb - 1)

    func = _multiply_prim(spec, tl, ep, xin_shape, (n_mt, Kh, C, Kw, mt), body)
    # from NCHW, with the accumulators on the stack LLVM keeps them in registers across the
    # padded-tap branches and spills (208 vector spills against 1 in a 64 -> 64 3x3 at 56 x 56):
    # VGG-16's 3x3 layers ran 6-26% slower, where in channel blocks they ran the same
    return func.with_attr(SCRATCH_IN_WORKSPACE, True) if tl.cb_in == 0 else func


def _pixel_tiles(P: int, B: int, tile):
    """macro(xv, w, bias, resv, yv, acc, n, mo, g): pixel tile g of B flat pixels of the P, the
    last one P % B, through the macro tile(..., p0, BT)."""
    n_full = P // B

    @T.macro
    def pixel_tile(xv, w, bias, resv, yv, acc, n, mo, g):
        if P % B == 0:
            tile(xv, w, bias, resv, yv, acc, n, mo, g * B, B)
        elif g < n_full:
            tile(xv, w, bias, resv, yv, acc, n, mo, g * B, B)
        else:
            tile(xv, w, bias, resv, yv, acc, n, mo, n_full * B, P % B)

    return pixel_tile


def _gemm_func(spec: Conv2DSpec, tl: DenseTiling, cpu: CPU, ep: Epilogue):
    """The multiply PrimFunc of the gemm kernel (pointwise layers), x and y read as N x C x P
    (NCHW) or N x C/cb x P x cb (blocked): vectors of pixels from NCHW, of output channels from
    channel blocks."""
    N, C, H, W = spec.x_shape
    M, P = spec.out_channels, spec.out_h * spec.out_w
    B, mt, n_mt = tl.block, tl.m_tile, tl.n_mt
    ntask = N * n_mt * _cdiv(P, B)
    tile = _pixel_vector_tile(spec, tl, cpu, ep) if tl.pixel_vectors else _channel_vector_tile(spec, tl, cpu, ep)
    pixel_tile = _pixel_tiles(P, B, tile)
    acc_shape = (mt, B) if tl.pixel_vectors else (B, mt)

    @T.macro
    def body(x, w, bias, res, y):
        xv = T.decl_buffer((N, _cdiv(C, max(tl.cb_in, 1)), H * W, max(tl.cb_in, 1)), "float32", data=x.data)
        yv, resv = _output_views(spec, tl, ep, res, y)
        for t in T.parallel(ntask):
            acc = T.alloc_local(acc_shape, "float32")
            pixel_tile(xv, w, bias, resv, yv, acc, *_task(t, n_mt, _cdiv(P, B), tl.split, cpu.cores))

    return _multiply_prim(spec, tl, ep, spec.x_shape, (n_mt, C, mt), body)


def _channel_vector_tile(spec: Conv2DSpec, tl: DenseTiling, cpu: CPU, ep: Epilogue):
    """gemm from channel blocks: acc[b, :] += x[n, c, p0 + b] * w[mo, c, :] (one broadcast of the
    input per pixel and channel, m_tile/lanes weight vectors), as the window kernel's 1x1 tile
    but over the flat pixels."""
    C, mt, cbi = spec.in_channels, tl.m_tile, tl.cb_in
    V = vector_width(mt, cpu)
    W, Ow, (sh, sw) = spec.width, spec.out_w, spec.stride
    store = _channel_vector_store(spec, tl, ep)

    def source(p):
        """The flat input pixel output pixel p reads."""
        return p if (sh, sw) == (1, 1) else p // Ow * sh * W + p % Ow * sw

    @T.macro
    def channel(xv, w, acc, n, mo, p0, BT, k, ci):
        """acc[b, :] += x of channel k*cbi + ci at pixel p0 + b times its weights."""
        for b in T.unroll(BT):
            for jv in T.unroll(mt // V):
                for j in T.vectorized(V):
                    acc[b, jv * V + j] = acc[b, jv * V + j] + \
                        xv[n, k, source(p0 + b), ci] * w[mo, k * cbi + ci, jv * V + j]

    @T.macro
    def tile(xv, w, bias, resv, yv, acc, n, mo, p0, BT):
        for b in T.unroll(BT):
            for jv in T.unroll(mt // V):
                for j in T.vectorized(V):
                    acc[b, jv * V + j] = T.float32(0)
        # whole channel blocks (no index division per channel), then a last partial one in a
        # loop of its own (a test of the channel in the loop made a 58 -> 58 1x1 2x slower)
        for k, ci in T.grid(C // cbi, cbi):
            channel(xv, w, acc, n, mo, p0, BT, k, ci)
        if C % cbi != 0:
            for ci in range(C % cbi):
                channel(xv, w, acc, n, mo, p0, BT, C // cbi, ci)
        store(yv, resv, bias, acc, n, mo, p0, BT)

    return tile


def _pixel_vector_tile(spec: Conv2DSpec, tl: DenseTiling, cpu: CPU, ep: Epilogue):
    """gemm from NCHW: acc[i, :] += w[mo, c, i] * x[n, c, p0 : p0 + BT] (vectors of lanes pixels,
    m_tile broadcast weights per channel). The store: NCHW, each output row one contiguous run;
    blocked, each channel's pixels cb floats apart."""
    C, M, mt, cbo = spec.in_channels, spec.out_channels, tl.m_tile, tl.cb_out
    covered = M if cbo == 0 else _cdiv(M, cbo) * cbo  # channels y holds
    m_whole = covered % mt == 0

    def chunks(BT, emit):
        """emit(offset, lanes) for each vector of the BT pixels: full vectors, the last BT % lanes."""
        for off in range(0, BT, cpu.lanes):
            emit(off, min(cpu.lanes, BT - off))

    @T.macro
    def zero_chunk(acc, i, off, ln):
        for p in T.vectorized(ln):
            acc[i, off + p] = T.float32(0)

    @T.macro
    def fma_chunk(xv, w, acc, n, mo, c, i, p0, off, ln):
        for p in T.vectorized(ln):
            acc[i, off + p] = acc[i, off + p] + w[mo, c, i] * xv[n, c, p0 + off + p, 0]

    @T.macro
    def store_chunk(yv, acc, bias, resv, n, m, i, p0, off, ln):
        if cbo == 0:
            for p in T.vectorized(ln):
                store_output(yv, (n, m, p0 + off + p), acc[i, off + p], bias, resv, ep)
        else:
            for p in T.vectorized(ln):
                yv[n, m // cbo, p0 + off + p, m % cbo] = blocked_value(
                    acc[i, off + p], m, bias, ep, resv, (n, m // cbo, p0 + off + p, m % cbo), M, M < covered)

    @T.macro
    def tile(xv, w, bias, resv, yv, acc, n, mo, p0, BT):
        # channel-major everywhere: a broadcast weight dies after its row (no spill), and each
        # output row is written as one contiguous run
        for i in T.unroll(mt):
            chunks(BT, lambda off, ln: zero_chunk(acc, i, off, ln))
        for c in range(C):
            for i in T.unroll(mt):
                chunks(BT, lambda off, ln: fma_chunk(xv, w, acc, n, mo, c, i, p0, off, ln))
        for i in T.unroll(mt):
            if _when(not m_whole, mo * mt + i < covered):
                chunks(BT, lambda off, ln: store_chunk(yv, acc, bias, resv, n, mo * mt + i, i, p0, off, ln))

    return tile


def _residual_data(ep: Epilogue, res, y):
    """res's data for a flat view of it; y's when there is no residual (a view never read, so
    that the unused res parameter can be dropped)."""
    return res.data if ep.residual else y.data


def _multiply_prim(spec: Conv2DSpec, tl: DenseTiling, ep: Epilogue, x_shape, w_shape, body):
    """multiply(x, w[, bias][, res], y) whose body is the macro ``body(x, w, bias, res, y)``; x
    (NCHW ``x_shape``) in layout_in, y and res in layout_out, bias padded to the M tiles when
    y is blocked."""
    x_shape = layout_shape(x_shape, layout_of_block(tl.cb_in))
    y_shape = layout_shape(spec.y_shape, layout_of_block(tl.cb_out))
    bias_len = tl.n_mt * tl.m_tile if tl.cb_out else spec.out_channels

    @T.prim_func
    def multiply(x: T.Buffer(x_shape, "float32"), w: T.Buffer(w_shape, "float32"),
                 bias: T.Buffer((bias_len,), "float32"), res: T.Buffer(y_shape, "float32"),
                 y: T.Buffer(y_shape, "float32")):
        body(x, w, bias, res, y)

    return drop_unused(multiply, ep)


def _tile_classes(spec: Conv2DSpec, B: int, pl: int, width: int):
    """Split an output row into tiles of B pixels (the last one Ow % B): the interior tiles
    g in [g0, g1), whose taps all read columns inside [0, width), and the border tiles as
    (w0, pixels), whose out-of-range taps are skipped."""
    Ow, sw, dw, Kw = spec.out_w, spec.stride[1], spec.dilation[1], spec.kernel_w
    tiles = [(w0, min(B, Ow - w0)) for w0 in range(0, Ow, B)]
    inside = [w0 * sw - pl >= 0 and (w0 + bt - 1) * sw + (Kw - 1) * dw - pl < width and bt == B
              for w0, bt in tiles]
    g0 = inside.index(True) if any(inside) else 0
    g1 = g0
    while g1 < len(tiles) and inside[g1]:
        g1 += 1
    return (g0, g1), [t for g, t in enumerate(tiles) if not g0 <= g < g1]


def _copies(spec: Conv2DSpec, tl: DenseTiling) -> bool:
    """Whether a "pad" stage copies x into a zero-padded xp first (window, pad="copy", padding)."""
    return tl.kernel == "window" and tl.pad == "copy" and any(spec.padding)


def padded_storage(spec: Conv2DSpec, tl: DenseTiling) -> Storage:
    """The padded copy xp (N x C x Hp x Wp float32, in layout_in) when there is one, else nothing."""
    if not _copies(spec, tl):
        return Storage(0, 0)
    shape = layout_shape((spec.batch, spec.in_channels, spec.padded_h, spec.padded_w), layout_of_block(tl.cb_in))
    return Storage.of((int(np.prod(shape)), 4))


@register
class Dense(Algorithm):
    name = "dense"
    sparse = False
    fuses_residual = True
    kernel_knob = "kernel"

    def default_knobs(self, spec: Conv2DSpec, cpu: CPU) -> dict:
        return default_tiling(spec, cpu)

    def knobs(self, spec: Conv2DSpec, knobs=None, cpu=None) -> dict:
        """As Algorithm.knobs, with the defaults of the kernel and input layout asked for (tile
        sizes differ)."""
        knobs = dict(knobs or {})
        if knobs.get("kernel") in _OLD_KERNEL_NAMES:
            knobs["kernel"] = _OLD_KERNEL_NAMES[knobs["kernel"]]
        out = default_tiling(spec, cpu_of(cpu), knobs.get("kernel"), knobs.get("layout_in", NCHW))
        unknown = sorted(set(knobs) - set(out))
        if unknown:
            raise KnobError(f"{self.name} has no knob {unknown[0]!r} (knobs: {sorted(out)})")
        return {**out, **knobs}

    def constants(self, spec, weight, bias, knobs):
        tl = make_tiling(spec, knobs)
        # the channels past M of a blocked y read bias 0
        return {"w": tile_weights(spec, weight, tl), **bias_constant(spec, bias, tl.cb_out and tl.n_mt * tl.m_tile)}

    def build_stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        tl, cpu = make_tiling(spec, knobs), cpu_of(cpu)
        stages = []
        xin, xin_shape = "x", spec.x_shape
        if _copies(spec, tl):
            xin, xin_shape = "xp", (spec.batch, spec.in_channels, spec.padded_h, spec.padded_w)
            stages.append(Stage("pad", "encode", prim(_pad_func(spec, tl.cb_in)), ("x",),
                                (Buffer("xp", layout_shape(xin_shape, layout_of_block(tl.cb_in))),)))
        if tl.kernel == "gemm":
            mul = _gemm_func(spec, tl, cpu, epilogue)
        else:
            mul = _window_func(spec, tl, cpu, epilogue, xin_shape, inplace=xin == "x")
        stages.append(Stage("multiply", "multiply", prim(mul), (xin, "w") + epilogue_inputs(epilogue),
                            (Buffer("y", layout_shape(spec.y_shape, layout_of_block(tl.cb_out))),)))
        return stages

    def storage(self, spec, knobs, produced):
        return Storage.of(produced["xp"]) if "xp" in produced else Storage(0, 0)

    def reference_storage(self, spec, knobs, x):
        return padded_storage(spec, make_tiling(spec, knobs))

    def reference(self, spec, knobs, x, w):
        return dense_conv2d(spec, x, w)

    def knob_grid(self, spec, cpu):
        """The tiles below, each with x and y in NCHW or in blocks of the CPU's lanes; tiles of 3
        vectors where M is a multiple of them."""
        lanes = lanes_layout(cpu)
        # 3 vectors where they cover M exactly (M = 24 on AVX2)
        m_tiles = (16, 32, 64) + ((3 * cpu.lanes,) if spec.out_channels % (3 * cpu.lanes) == 0 else ())
        for io in grid(layout_in=(NCHW, lanes), layout_out=(NCHW, lanes)):
            for k in grid(kernel=("window",), block=(3, 4, 5, 6, 8), m_tile=m_tiles, split=DENSE_SPLITS,
                          pad=PADS):
                if registers_ok(cpu, k["block"], k["m_tile"]) and k["block"] <= spec.out_w:
                    yield {**k, **io}
            if not gemm_applies(spec, channel_block(io["layout_in"])):
                continue
            if io["layout_in"] == NCHW:
                tiles = grid(kernel=("gemm",), block=(16, 24, 32, 48, 64), m_tile=(4, 6, 8, 12, 16),
                             split=DENSE_SPLITS)
                tiles = (k for k in tiles if k["block"] % cpu.lanes == 0)
            else:
                tiles = grid(kernel=("gemm",), block=(3, 4, 6, 8, 12), m_tile=m_tiles, split=DENSE_SPLITS)
            for k in tiles:
                if registers_ok(cpu, k["block"], k["m_tile"]):
                    yield {**k, **io}
