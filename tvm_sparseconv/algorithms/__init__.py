"""The convolution algorithms, by name: one registry that a new algorithm joins in one place.

An algorithm is a module of this package whose Algorithm subclass carries ``@register``
(base.py); importing the package imports every module, so the registry is complete. Its
properties (sparse, metaschedule, fuses_residual, check, knob_grid) are read from there: the
tuner, ``layer``, the docs and the tests iterate it. docs/algorithms.md specifies each one.

direct   TVM's own conv2d (topi), the dense baseline MetaSchedule tunes
dense    register-tiled direct conv in TIR: the dense path at the peers' rate
grouped  register-tiled grouped and depthwise conv in TIR (groups > 1 only), channel-blocked or along rows
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
import pkgutil

from .. import tvmscript
from ..conv import UnsupportedConvError
from .base import REGISTRY, Algorithm, Buffer, KnobError, Stage

tvmscript.install()  # before any kernel is parsed: TVMScript's own macro lookup doubles a build's time

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

# dense algorithms first, then sparse; by name within each
ALGORITHMS = tuple(sorted(REGISTRY, key=lambda n: (REGISTRY[n].sparse, n)))
SPARSE = tuple(n for n in ALGORITHMS if REGISTRY[n].sparse)
DENSE = tuple(n for n in ALGORITHMS if not REGISTRY[n].sparse)
METASCHEDULE = tuple(n for n in ALGORITHMS if REGISTRY[n].metaschedule)


def get_algorithm(name: str) -> Algorithm:
    """The algorithm called ``name`` (one of ALGORITHMS)."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}") from None


def supports(name: str, spec, why_dense: str | None = None) -> bool:
    """The algorithm ``name`` can compute the layer (Algorithm.check); a layer only TVM's conv2d
    takes (``why_dense``, graph.ConvSite): "direct" alone."""
    if why_dense and name != "direct":
        return False
    try:
        get_algorithm(name).check(spec)
        return True
    except UnsupportedConvError:
        return False


def dense_fallback(spec, why_dense: str | None = None) -> str:
    """The algorithm of a layer that the one asked for does not take: the first registered dense
    hand-scheduled algorithm that takes it (dense, or grouped for a grouped conv), "direct"
    (TVM's conv2d) where none does or the layer is one only it takes (``why_dense``)."""
    return next((n for n in DENSE if not REGISTRY[n].metaschedule and supports(n, spec, why_dense)), "direct")


def knob_space(name: str, spec, target=None) -> list[dict]:
    """Algorithm.knob_space of ``name`` for the CPU of ``target`` (None: this machine)."""
    return get_algorithm(name).knob_space(spec, target)


__all__ = ["ALGORITHMS", "SPARSE", "DENSE", "METASCHEDULE", "Algorithm", "Buffer", "Stage", "KnobError",
           "dense_fallback", "get_algorithm", "knob_space", "supports"]
