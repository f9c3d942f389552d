"""Knob spaces of the hand-scheduled kernels: the candidates the tuner may measure.

Register-tiled kernels keep (pixels x M tile / lanes) vector registers of accumulators; more
than 3/4 of the CPU's registers spills (24 on AVX-512, 12 on AVX2) and fewer than ~4 starves
the FMA units, so the grids are cut to that band. Every candidate is validated by the
algorithm itself (an invalid combination is dropped, never measured).
"""
from __future__ import annotations

import itertools
import random

from ..algorithms import get_algorithm
from ..conv import Conv2DSpec
from ..cpu import CPU, cpu_of


def _grid(**axes):
    keys = list(axes)
    for vals in itertools.product(*(axes[k] for k in keys)):
        yield dict(zip(keys, vals))


def _raw_space(name: str, spec: Conv2DSpec, cpu: CPU):
    def _regs_ok(pixels: int, m_tile: int) -> bool:
        return 4 <= pixels * m_tile / cpu.lanes <= cpu.registers * 3 // 4

    if name in ("halo", "im2csr"):
        from ..algorithms.tiling import SPLITS

        for k in _grid(block=(2, 3, 4, 6, 8), m_tile=(16, 32, 64), split=SPLITS):
            if _regs_ok(k["block"], k["m_tile"]) and k["block"] <= spec.out_w:
                yield k
    elif name in ("cpo", "cps"):
        for k in _grid(multiply=("gather",), m_tile=(32, 64), pixels=(2, 4, 8)):
            if _regs_ok(k["pixels"], k["m_tile"]):
                yield k
        for k in _grid(multiply=("scatter",), m_tile=(32, 64), row_tile=(0, 8)):
            yield k
    elif name == "pixcsr":  # weight blocks per kernel row of 16-256 KB (L1 to L2), tasks of 1-8 output rows
        for k in _grid(m_tile=(32, 64, 128), c_block=(2, 4, 8, 16, 32, 64, 128, 256), rows=(1, 2, 4, 8)):
            cb = min(k["c_block"], spec.in_channels)
            if 4096 <= spec.kernel_w * cb * k["m_tile"] <= 65536 and k["rows"] <= spec.out_h and cb == k["c_block"] \
                    and k["m_tile"] <= 8 * cpu.lanes:
                yield k
    elif name == "hybrid":  # halo's register tiles, pixcsr's weight blocks, the dense share around the default
        for k in _grid(block=(2, 3, 4, 8), m_tile=(32, 64, 128), c_block=(32, 64, 128), rows=(2, 4)):
            cb = min(k["c_block"], spec.in_channels)
            if _regs_ok(k["block"], k["m_tile"]) and k["block"] <= spec.out_w and cb == k["c_block"]:
                products = k["block"] * spec.kernel_w
                for share in (0.5, 0.65, 0.8):
                    yield {**k, "dense_from": max(1, round(share * products))}
    elif name == "dense":
        from ..algorithms.dense import PADS, SPLITS, is_pointwise

        for k in _grid(kernel=("direct",), block=(3, 4, 6, 8), m_tile=(16, 32, 64), split=SPLITS, pad=PADS):
            if _regs_ok(k["block"], k["m_tile"]) and k["block"] <= spec.out_w:
                yield k
        if is_pointwise(spec):
            for k in _grid(kernel=("gemm",), block=(16, 24, 32, 48, 64), m_tile=(4, 6, 8, 12, 16), split=SPLITS):
                if k["block"] % cpu.lanes == 0 and _regs_ok(k["block"], k["m_tile"]):
                    yield k


def knob_space(name: str, spec: Conv2DSpec, target=None) -> list[dict]:
    """Valid, complete knob dicts for ``name`` on ``spec`` and the CPU of ``target`` (None: this
    machine): the defaults first, then the rest in a fixed shuffled order, so that any prefix
    (what a small budget measures) spreads over every axis of the grid rather than varying
    only its last one."""
    algo, cpu = get_algorithm(name), cpu_of(target)
    seen, out = set(), []
    for k in [{}] + list(_raw_space(name, spec, cpu)):
        try:
            full = algo.knobs(spec, k, cpu)
            algo.constants(spec, _zeros_weight(spec), None, full)  # validates tile sizes cheaply
        except (ValueError, KeyError):
            continue
        key = tuple(sorted(full.items()))
        if key not in seen:
            seen.add(key)
            out.append(full)
    rest = out[1:]
    random.Random(0).shuffle(rest)
    return out[:1] + rest


def _zeros_weight(spec: Conv2DSpec):
    import numpy as np

    return np.zeros(spec.w_shape, np.float32)
