"""CPS stores at most what CPO stores, on every input (NumPy references; the compiled encoders
equal them: tests/test_cpo_cps.py).

The bound is counted independently of the encoders: CPO = 2*nnz + pointers + ncols; CPS = nnz
+ one entry per non-empty aligned set of 4 padded rows of a kept column + pointers + ncols,
both from the padded input itself.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from tvm_sparseconv.algorithms.cpo_layout import Geometry
from tvm_sparseconv.conv import Conv2DSpec, ConvSpecError
from tvm_sparseconv.layer import synthesize_activation
from tvm_sparseconv.reference import pad_input
from tvm_sparseconv.reference.cpo import (column_order, cpo_encode, cpo_storage, cps_decode, cps_encode,
                                          cps_storage)
from tvm_sparseconv.reference.dense import is_nonzero

from conftest import random_sparse, relu_like


def counted(spec: Conv2DSpec, x: np.ndarray) -> tuple[int, int, int]:
    """(NZEs, non-empty sets of 4 padded rows, pointers) of the kept columns, from x alone."""
    cols = column_order(spec)
    nz = is_nonzero(pad_input(spec, x)[..., cols])  # N, C, Hp, ncols
    nz = np.pad(nz, ((0, 0), (0, 0), (0, -nz.shape[2] % 4), (0, 0)))
    n, c, hp, k = nz.shape
    sets = int(nz.reshape(n, c, hp // 4, 4, k).any(axis=3).sum())
    return int(nz.sum()), sets, n * c * len(cols) + 1


def inputs(kind: str, shape, density: float, rng) -> np.ndarray:
    """An activation of one kind: zeros, a few NZEs, ReLU-like clustered zeros (with all-zero
    channels), uniformly scattered NZEs, all non-zero, or uniform with half the channels zero."""
    if kind == "zero":
        return np.zeros(shape, np.float32)
    if kind == "few":  # near 0: 1-3 NZEs
        x = np.zeros(shape, np.float32)
        idx = rng.integers(0, x.size, rng.integers(1, 4))
        x.reshape(-1)[idx] = rng.standard_normal(len(idx))
        return x
    if kind == "clustered":
        return relu_like(shape, density, rng, zero_channels=0.3)
    if kind == "dense":
        return relu_like(shape, 1.0, rng)
    x = random_sparse(shape, density, rng)
    if kind == "zero-channels":
        x[:, rng.random(shape[1]) < 0.5] = 0
    return x


layers = st.tuples(
    st.integers(1, 2), st.integers(1, 4), st.integers(1, 12), st.integers(1, 12),  # N, C, H, W
    st.integers(1, 5), st.integers(1, 5),  # Kh, Kw: 1x1, rectangular, 5x5
    st.tuples(st.integers(1, 3), st.integers(1, 3)),  # stride
    st.tuples(*[st.integers(0, 3)] * 4),  # padding: every alignment of the sets of 4 rows
    st.tuples(st.integers(1, 2), st.integers(1, 2)),  # dilation
)
KINDS = ("zero", "few", "clustered", "uniform", "dense", "zero-channels")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=layers, kind=st.sampled_from(KINDS), density=st.floats(0, 1), seed=st.integers(0, 2 ** 16))
def test_cps_never_stores_more_than_cpo(s, kind, density, seed):
    n, c, h, w, kh, kw, stride, pad, dil = s
    try:
        spec = Conv2DSpec.from_shapes((n, c, h, w), (3, c, kh, kw), stride, pad, dil)
    except ConvSpecError:
        assume(False)
    x = inputs(kind, spec.x_shape, density, np.random.default_rng(seed))
    cpo, cps = cpo_encode(spec, x), cps_encode(spec, x)
    s_cpo, s_cps = cpo_storage(cpo), cps_storage(cps)
    nnz, sets, ptrs = counted(spec, x)
    ncols = len(column_order(spec))
    assert s_cpo.elements == 2 * nnz + ptrs + ncols
    assert s_cps.elements == nnz + sets + ptrs + ncols
    assert s_cps.elements <= s_cpo.elements and s_cps.bytes <= s_cpo.bytes
    assert (s_cps.elements < s_cpo.elements) == (sets < nnz)  # equal only when no set holds 2 NZEs
    if nnz == 0:  # only the pointers and the column order
        assert s_cps.elements == s_cpo.elements == ptrs + ncols
    # the stream fits the worst-case buffer, which density 1 fills exactly
    g = Geometry(spec)
    assert len(cps.stream) <= g.stream_cap
    if kind == "dense" and g.ncols:
        assert len(cps.stream) == g.stream_cap
    # CPS decodes to exactly CPO's rows, values (bits) and pointers
    dec = cps_decode(spec, cps)
    np.testing.assert_array_equal(dec.rows, cpo.rows)
    np.testing.assert_array_equal(dec.values.view(np.int32), cpo.values.view(np.int32))
    np.testing.assert_array_equal(dec.ptr, cpo.ptr)


# the layers where CPS with separate value and index pointers stored more than CPO (the last
# all zero): x shape, weight shape, stride, padding, density
REGRESSION = {
    "37-45-3x3-s2-23x19-d0.25": ((1, 37, 23, 19), (45, 37, 3, 3), 2, 1, 0.25),
    "64-64-5x5-30x30-d0.10": ((1, 64, 30, 30), (64, 64, 5, 5), 1, 2, 0.10),
    "16-24-3x3-17x17-d1.0": ((1, 16, 17, 17), (24, 16, 3, 3), 1, 1, 1.0),
    "all-zero-8x9x9": ((1, 8, 9, 9), (8, 8, 3, 3), 1, 1, 0.0),
}


@pytest.mark.parametrize("name", REGRESSION)
def test_cps_not_larger_on_the_layers_that_were(name):
    xs, ws, stride, pad, density = REGRESSION[name]
    spec = Conv2DSpec.from_shapes(xs, ws, stride, pad)
    for x in (synthesize_activation(xs, density, seed=0), random_sparse(xs, density, np.random.default_rng(0))):
        s_cpo, s_cps = cpo_storage(cpo_encode(spec, x)), cps_storage(cps_encode(spec, x))
        assert s_cps.elements <= s_cpo.elements and s_cps.bytes <= s_cpo.bytes
        if density == 0:
            assert s_cps.elements == spec.batch * spec.in_channels * len(column_order(spec)) + 1 + len(column_order(spec))
