"""Activation layouts between layers: NCHW, and NCHW in channel blocks (NCHWc).

A layout is named by a string:

    "nchw"        N x C x H x W
    "nchw{cb}c"   N x ceil(C/cb) x H x W x cb, cb a power of two in 1..64 (e.g. "nchw16c"):
                  channel c of pixel (h, w) at [n, c // cb, h, w, c % cb]; the cb channels of a
                  pixel's block are contiguous. Channels past C in the last block are zeros
                  (every writer stores them; no reader uses them).

A kernel that reads and writes blocks of the target's vector width (cb = cpu.lanes) loads a
pixel's channels with one vector access, and a register tile's loads walk ceil(C/cb) streams
instead of C. docs/algorithms.md section 16 specifies the layout and where kernels take it;
docs/design.md says where the model rewrite puts the transforms between layouts.
"""
from __future__ import annotations

import re

NCHW = "nchw"
NCHW_LAYOUTS = {"layout_in": NCHW, "layout_out": NCHW}  # the default knobs of an algorithm with layout knobs
MAX_BLOCK = 64
_BLOCKED = re.compile(r"nchw(\d+)c")


class LayoutError(ValueError):
    """A layout name that is not "nchw" or "nchw{cb}c" with cb a power of two in 1..64."""


def channel_block(layout: str) -> int:
    """cb of a blocked layout "nchw{cb}c"; 0 for "nchw". Raises LayoutError for anything else."""
    if layout == NCHW:
        return 0
    m = _BLOCKED.fullmatch(layout) if isinstance(layout, str) else None
    cb = int(m.group(1)) if m else 0
    if not m or cb < 1 or cb > MAX_BLOCK or cb & (cb - 1) or m.group(1) != str(cb):
        raise LayoutError(f"layout must be 'nchw' or 'nchw<cb>c' with cb a power of two in 1..{MAX_BLOCK} "
                          f"(e.g. 'nchw16c'), got {layout!r}")
    return cb


def blocked(cb: int) -> str:
    """The name of the layout in blocks of ``cb`` channels."""
    return f"nchw{int(cb)}c"


def layout_of_block(cb: int) -> str:
    """The layout whose channel block is ``cb`` (the inverse of channel_block): "nchw" for 0."""
    return blocked(cb) if cb else NCHW


def lanes_layout(cpu) -> str:
    """The blocked layout of ``cpu``'s vector width (cpu.CPU): one vector per pixel's block."""
    return blocked(cpu.lanes)


def layout_shape(nchw_shape, layout: str) -> tuple[int, ...]:
    """The shape of an N x C x H x W tensor held in ``layout``."""
    n, c, h, w = (int(v) for v in nchw_shape)
    cb = channel_block(layout)
    return (n, c, h, w) if cb == 0 else (n, -(-c // cb), h, w, cb)
