"""The convolution algorithms, by name.

direct   TVM's own conv2d (topi), the dense baseline MetaSchedule tunes
dense    register-tiled direct conv in TIR: the dense path at the peers' rate
im2col   lowering + GEMM
mec      MEC's compact lowering + Oh small GEMMs
cpo      Compressed Pattern Overlap: store each non-zero once, scatter it
cps      Compressed Pattern Sets: CPO with row indices packed in sets of 4
im2csr   CSR of the im2col matrix built straight from the input, output-stationary SpMM
halo     halo segments: store-once, output-stationary, register-tiled
pixcsr   each pixel's non-zero channels, store-once; pixel-granular direct conv (no zero multiplied)
hybrid   halo entries where a segment is dense, pixcsr-like pixel entries where it is sparse
"""
from __future__ import annotations

import importlib

from .base import Algorithm, Buffer, Stage, KnobError

ALGORITHMS = ("direct", "dense", "im2col", "mec", "cpo", "cps", "im2csr", "halo", "pixcsr", "hybrid")
SPARSE = ("cpo", "cps", "im2csr", "halo", "pixcsr", "hybrid")

_cache: dict[str, Algorithm] = {}


def get_algorithm(name: str) -> Algorithm:
    """The algorithm called ``name`` (one of ALGORITHMS)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    if name not in _cache:
        mod = importlib.import_module(f"{__name__}.{name}")
        _cache[name] = mod.ALGORITHM
    return _cache[name]


__all__ = ["ALGORITHMS", "SPARSE", "Algorithm", "Buffer", "Stage", "KnobError", "get_algorithm"]
