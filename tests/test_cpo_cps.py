"""CPO and CPS: NumPy formats, compiled encoders (exact), multiplies (gather and scatter), storage."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from tvm_sparseconv.algorithms import get_algorithm
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.conv import Conv2DSpec, ConvSpecError, UnsupportedConvError
from tvm_sparseconv.reference import dense_conv2d, pad_input
from tvm_sparseconv.reference.cpo import (column_order, column_types, cpo_encode, cpo_multiply, cps_decode,
                                          cps_encode, cps_multiply)
from tvm_sparseconv.reference.dense import is_nonzero

from conftest import random_sparse, relu_like

DENSITIES = (0.0, 0.05, 0.3, 0.7, 1.0)


def tol(spec):
    return dict(rtol=1e-4, atol=1e-4 * np.sqrt(spec.in_channels * spec.kernel_h * spec.kernel_w))


# -- the compiled format against the reference encoder ---------------------------------------

def check_encoding(layer: CompiledLayer, x: np.ndarray):
    """The compiled encoder's arrays equal the NumPy encoder's exactly (on the valid prefix)."""
    spec, alg = layer.spec, layer.algorithm
    got = alg.unpack(spec, layer.produced())
    want = alg.encode_reference(spec, x)
    for field in got.__dataclass_fields__:
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and a.shape == b.shape, (field, a.shape, b.shape)
        np.testing.assert_array_equal(a.view(np.int32) if a.dtype == np.float32 else a,
                                      b.view(np.int32) if b.dtype == np.float32 else b, err_msg=field)
    assert layer.storage() == alg.reference_storage(spec, layer.knobs, x)


def run_layer(alg, spec, knobs=None, epilogue=False, densities=DENSITIES, seed=0):
    """Compile once; for every density check the output against the dense oracle and the
    encoder against the reference, on a clustered and a random input."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(spec.w_shape).astype(np.float32)
    bias = rng.standard_normal(spec.out_channels).astype(np.float32) if epilogue else None
    layer = CompiledLayer(alg, spec, w, bias=bias, relu=epilogue, knobs=knobs)
    for d in densities:
        for x in (relu_like(spec.x_shape, d, rng), random_sparse(spec.x_shape, d, rng)):
            y = layer(x)
            np.testing.assert_allclose(y, dense_conv2d(spec, x, w, bias, epilogue), **tol(spec))
            check_encoding(layer, x)
    return layer, w


LAYERS = [
    # (N, C, H, W), (M, Kh, Kw), stride, padding (top, left, bottom, right), dilation
    ((1, 4, 9, 10), (20, 1, 1), 1, 0, 1),
    ((2, 3, 9, 8), (16, 3, 3), 1, 1, 1),
    ((1, 5, 11, 12), (33, 3, 3), 2, (0, 1, 2, 1), 1),
    ((2, 3, 12, 11), (8, 5, 5), 1, 2, 1),
    ((1, 3, 14, 13), (24, 7, 7), 2, 3, 1),
    ((1, 4, 10, 12), (17, 1, 7), 1, (0, 3, 0, 3), 1),
    ((2, 4, 12, 10), (16, 7, 1), (2, 1), (3, 0, 2, 0), 1),
    ((1, 3, 13, 13), (20, 3, 3), 1, 2, 2),
    ((1, 3, 13, 12), (70, 3, 3), 2, (1, 0, 0, 2), (2, 1)),
    ((2, 3, 8, 9), (16, 1, 1), 2, 0, 1),
    ((1, 6, 9, 9), (130, 3, 3), 1, 1, 1),
]


def make_spec(xs, ws, stride, padding, dilation):
    m, kh, kw = ws
    return Conv2DSpec.from_shapes(xs, (m, xs[1], kh, kw), stride, padding, dilation)


@pytest.mark.slow  # a grid: the fast tier has test_conformance, the default run a covering sample
@pytest.mark.cover("alg", "case")
@pytest.mark.parametrize("alg", ["cpo", "cps"])
@pytest.mark.parametrize("case", range(len(LAYERS)))
def test_layers_gather(alg, case):
    spec = make_spec(*LAYERS[case])
    run_layer(alg, spec, epilogue=bool(case % 2), seed=case)


@pytest.mark.slow  # a grid: the fast tier has test_conformance, the default run a covering sample
@pytest.mark.cover("alg", "case")
@pytest.mark.parametrize("alg", ["cpo", "cps"])
@pytest.mark.parametrize("case", range(0, len(LAYERS), 2))
def test_layers_scatter(alg, case):
    """The paper's scatter, with row tiles and a small M tile (zero filters padded)."""
    spec = make_spec(*LAYERS[case])
    run_layer(alg, spec, knobs={"multiply": "scatter", "row_tile": 3, "m_tile": 16},
              epilogue=not case % 4, densities=(0.0, 0.3, 1.0), seed=case)


@pytest.mark.parametrize("alg", ["cpo", "cps"])
def test_gather_knobs(alg):
    """Odd pixel blocks, more tasks than rows' worth, an M tile that needs zero filters."""
    spec = make_spec((2, 5, 10, 11), (40, 3, 3), 1, (1, 2, 1, 0), 1)
    run_layer(alg, spec, knobs={"pixels": 3, "chunks": 5, "m_tile": 32}, densities=(0.05, 0.7))


@pytest.mark.parametrize("alg", ["cpo", "cps"])
def test_no_column_in_any_window(alg):
    """Huge padding and stride: the input is in no window; the output is the bias alone."""
    spec = Conv2DSpec.from_shapes((1, 2, 3, 1), (3, 2, 1, 1), 3, (0, 5, 0, 5))
    assert len(column_order(spec)) == 0
    run_layer(alg, spec, epilogue=True, densities=(1.0,))


# -- special values -------------------------------------------------------------------------

@pytest.mark.parametrize("multiply", ["gather", "scatter"])
@pytest.mark.parametrize("alg", ["cpo", "cps"])
def test_nan_inf_negative_zero(alg, multiply):
    spec = Conv2DSpec.from_shapes((1, 3, 8, 8), (16, 3, 3, 3), 1, 1)
    rng = np.random.default_rng(1)
    w = rng.standard_normal(spec.w_shape).astype(np.float32)
    layer = CompiledLayer(alg, spec, w, knobs={"multiply": multiply})
    x = relu_like(spec.x_shape, 0.3, rng)
    x[0, 0, 2, 3], x[0, 1, 6, 6], x[0, 2, 0, 7] = np.nan, np.inf, -np.inf
    x[0, 2, 4, :] = -0.0
    y = layer(x)
    want = dense_conv2d(spec, x, w)
    assert np.isnan(y).any() and np.isinf(y).any()
    np.testing.assert_allclose(y, want, equal_nan=True, **tol(spec))
    check_encoding(layer, x)
    # -0.0 is a zero: it is not stored
    stored = layer.algorithm.unpack(spec, layer.produced())
    assert len((cps_decode(spec, stored) if alg == "cps" else stored).values) == int((x != 0).sum())


@pytest.mark.parametrize("multiply", ["gather", "scatter"])
@pytest.mark.parametrize("top", range(4))
def test_cps_every_set_pattern(top, multiply):
    """Every 4-bit pattern of a set of 4 padded rows (a column per pattern, shifted per set),
    at each alignment of the sets to the input rows (top padding 0-3), with NaN, +-Inf and -0.0
    inside packed sets and as single NZEs: the compiled stream equals the reference's and the
    output the dense float64 oracle's; the scatter's row tiles skip sets outside them."""
    spec = Conv2DSpec.from_shapes((1, 2, 11, 16), (20, 2, 3, 3), 1, (top, 1, 3 - top, 1))
    rng = np.random.default_rng(top)
    w = rng.standard_normal(spec.w_shape).astype(np.float32)
    i = np.arange(spec.padded_h)[:, None]
    pattern = (np.arange(16)[None, :] + 5 * (i // 4)) % 16 >> (i % 4) & 1  # padded row i, column j
    x = np.where(pattern[top:top + spec.height] == 1, rng.standard_normal(spec.x_shape), 0).astype(np.float32)
    x[0, 1] = np.where(x[0, 1] == 0, -0.0, x[0, 1])  # -0.0 everywhere the pattern has no NZE
    x[0, 0, 1, 7], x[0, 0, 5, 3], x[0, 1, 9, 12], x[0, 1, 2, 15] = np.nan, np.inf, -np.inf, np.nan
    assert np.isnan(x).sum() == 2 and np.isinf(x).sum() == 2
    layer = CompiledLayer("cps", spec, w, knobs={"multiply": multiply, "row_tile": 2})
    y = layer(x)
    np.testing.assert_allclose(y, dense_conv2d(spec, x, w), equal_nan=True, **tol(spec))
    check_encoding(layer, x)


def test_groups_raise():
    spec = Conv2DSpec.from_shapes((1, 4, 6, 6), (4, 2, 3, 3), 1, 1, groups=2)
    for alg in ("cpo", "cps"):
        with pytest.raises(UnsupportedConvError, match="groups"):
            CompiledLayer(alg, spec, np.zeros(spec.w_shape, np.float32))


def test_bad_knob():
    spec = Conv2DSpec.from_shapes((1, 2, 5, 5), (4, 2, 3, 3), 1, 1)
    with pytest.raises(ValueError, match="multiply"):
        CompiledLayer("cpo", spec, np.zeros(spec.w_shape, np.float32), knobs={"multiply": "magic"})


# -- the formats in NumPy --------------------------------------------------------------------

def test_worked_example():
    """algorithms.md section 4: 6x6 map, 3x3 kernel, stride 1: types 1 (cols 0, 5), 2 (1, 4), 3."""
    spec = Conv2DSpec.from_shapes((1, 1, 6, 6), (1, 1, 3, 3))
    np.testing.assert_array_equal(column_types(spec), [1, 2, 3, 3, 2, 1])
    np.testing.assert_array_equal(column_order(spec), [0, 5, 1, 4, 2, 3])
    x = np.zeros(spec.x_shape, np.float32)
    for j, rows in enumerate([(1, 4), (1, 4), (1, 2), (2, 5), (2, 4), (0, 3)]):
        x[0, 0, list(rows), j] = j + 1
    cpo = cpo_encode(spec, x)
    assert len(cpo.values) == 12
    np.testing.assert_array_equal(cpo.rows, [1, 4, 0, 3, 1, 4, 2, 4, 1, 2, 2, 5])
    np.testing.assert_array_equal(cpo.ptr, [0, 2, 4, 6, 8, 10, 12])


def test_cps_entries():
    """Sets of 4 rows: 2-4 NZEs -> one flagged entry (base, mask), 1 -> its raw row; each entry
    followed by its values' bits."""
    spec = Conv2DSpec.from_shapes((1, 1, 16, 1), (1, 1, 1, 1))
    x = np.zeros(spec.x_shape, np.float32)
    rows = [0, 1, 3, 5, 8, 9, 10, 11, 13, 14]  # set 0: 3 NZEs, set 1: 1, set 2: 4, set 3: 2
    x[0, 0, rows, 0] = np.arange(1, 11)
    cps = cps_encode(spec, x)
    flag, v = -2 ** 31, np.arange(1, 11, dtype=np.float32).view(np.int32)
    np.testing.assert_array_equal(cps.stream, [flag | 0 << 4 | 0b1011, *v[:3], 5, v[3], flag | 8 << 4 | 0b1111,
                                               *v[4:8], flag | 12 << 4 | 0b0110, *v[8:]])
    np.testing.assert_array_equal(cps.ptr, [0, 14])
    dec = cps_decode(spec, cps)
    np.testing.assert_array_equal(dec.rows, rows)
    np.testing.assert_array_equal(dec.values, np.arange(1, 11))


def test_cps_decode_refuses_a_malformed_stream():
    spec = Conv2DSpec.from_shapes((1, 1, 8, 1), (1, 1, 1, 1))
    x = np.zeros(spec.x_shape, np.float32)
    x[0, 0, [4, 6], 0] = 1
    cps = cps_encode(spec, x)
    cps.ptr[-1] -= 1  # the last value cut off
    with pytest.raises(ValueError, match="group 0"):
        cps_decode(spec, cps)
    cps.ptr[-1] += 1
    cps.stream[0] = -2 ** 31 | 4 << 4  # a set without rows
    with pytest.raises(ValueError, match="0 rows"):
        cps_decode(spec, cps)


layer_shapes = st.tuples(
    st.integers(1, 2), st.integers(1, 4), st.integers(1, 10), st.integers(1, 10),  # N, C, H, W
    st.integers(1, 20), st.integers(1, 4), st.integers(1, 4),  # M, Kh, Kw
    st.tuples(st.integers(1, 3), st.integers(1, 3)),  # stride
    st.tuples(*[st.integers(0, 2)] * 4),  # padding
    st.tuples(st.integers(1, 2), st.integers(1, 2)),  # dilation
)


def spec_or_skip(s):
    from hypothesis import assume
    n, c, h, w, m, kh, kw, stride, pad, dil = s
    try:
        return Conv2DSpec.from_shapes((n, c, h, w), (m, c, kh, kw), stride, pad, dil)
    except ConvSpecError:
        assume(False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=layer_shapes, density=st.floats(0, 1), seed=st.integers(0, 2 ** 16))
def test_reference_multiplies(s, density, seed):
    """The NumPy twins store every NZE some window reads, once, and multiply to the dense
    oracle (the CPS format against CPO's: tests/test_cps_storage.py)."""
    spec = spec_or_skip(s)
    x = random_sparse(spec.x_shape, density, np.random.default_rng(seed))
    cpo, cps = cpo_encode(spec, x), cps_encode(spec, x)
    assert len(cpo.values) == int((pad_input(spec, x)[..., column_order(spec)] != 0).sum())
    w = np.random.default_rng(seed).standard_normal(spec.w_shape).astype(np.float32)
    want = dense_conv2d(spec, x, w)
    np.testing.assert_allclose(cpo_multiply(spec, cpo, w), want, **tol(spec))
    np.testing.assert_allclose(cps_multiply(spec, cps, w), want, **tol(spec))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=layer_shapes, seed=st.integers(0, 2 ** 16), multiply=st.sampled_from(["gather", "scatter"]))
def test_random_layers_compiled(s, seed, multiply):
    spec = spec_or_skip(s)
    for alg in ("cpo", "cps"):
        run_layer(alg, spec, knobs={"multiply": multiply}, densities=(0.0, 0.4, 1.0), seed=seed)


def test_reference_algorithm_api():
    """Algorithm.reference / reference_storage agree with the dense oracle and the formats."""
    spec = Conv2DSpec.from_shapes((1, 3, 7, 7), (5, 3, 3, 3), 2, 1)
    rng = np.random.default_rng(3)
    x, w = relu_like(spec.x_shape, 0.4, rng), rng.standard_normal(spec.w_shape).astype(np.float32)
    for name in ("cpo", "cps"):
        alg = get_algorithm(name)
        kn = alg.knobs(spec)
        np.testing.assert_allclose(alg.reference(spec, kn, x, w), dense_conv2d(spec, x, w), **tol(spec))
    s_cpo = get_algorithm("cpo").reference_storage(spec, kn, x)
    s_cps = get_algorithm("cps").reference_storage(spec, kn, x)
    nnz, ncols = int((x != 0).sum()), len(column_order(spec))
    ptrs = spec.batch * spec.in_channels * ncols + 1
    assert s_cpo.elements == 2 * nnz + ptrs + ncols and s_cpo.bytes == 4 * s_cpo.elements
    # one entry per non-empty aligned set of 4 padded rows of a kept column, counted on the input
    xp = pad_input(spec, x)[..., column_order(spec)]
    xp = np.pad(xp, ((0, 0), (0, 0), (0, -xp.shape[2] % 4), (0, 0)))
    n, c, hp, k = xp.shape
    entries = int(is_nonzero(xp).reshape(n, c, hp // 4, 4, k).any(axis=3).sum())
    assert s_cps.elements == nnz + entries + ptrs + ncols and s_cps.bytes == 4 * s_cps.elements
