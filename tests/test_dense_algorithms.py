"""direct (topi), im2col and MEC against the NumPy oracle and against each other."""
import numpy as np
import pytest

from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.conv import Conv2DSpec, ConvSpecError, UnsupportedConvError
from tvm_sparseconv.reference import dense_conv2d, im2col_lower, mec_lower, im2col_storage, mec_storage

from conftest import DENSITIES, activation, assert_conv_close, weight

LOWERINGS = ("im2col", "mec")


@pytest.mark.parametrize("algorithm", ("direct",) + LOWERINGS)
def test_grid_all_densities(algorithm, grid_case):
    spec = grid_case
    w = weight(spec)
    layer = CompiledLayer(algorithm, spec, w)
    for d in DENSITIES:
        x = activation(spec, d)
        assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)


@pytest.mark.parametrize("algorithm", LOWERINGS)
def test_lowered_buffer_equals_reference(algorithm, grid_case):
    spec = grid_case
    x = activation(spec, 0.3, seed=5)
    layer = CompiledLayer(algorithm, spec, weight(spec))
    layer(x)
    produced = layer.produced()
    if algorithm == "im2col":
        np.testing.assert_array_equal(produced["a"], im2col_lower(spec, x))
        assert layer.storage() == im2col_storage(spec)
    else:
        np.testing.assert_array_equal(produced["l"], mec_lower(spec, x))
        assert layer.storage() == mec_storage(spec)
    assert layer.storage() == layer.algorithm.reference_storage(spec, layer.knobs, x)


def test_mec_is_smaller_than_im2col_by_about_kh_over_sh():
    spec = Conv2DSpec.from_shapes((1, 16, 28, 28), (16, 16, 3, 3), padding=1)
    r = im2col_storage(spec).elements / mec_storage(spec).elements
    assert 2.5 < r < 3.0  # Kh/Sh = 3 up to the padded rows


@pytest.mark.parametrize("algorithm", ("direct",) + LOWERINGS)
def test_epilogue_bias_relu_and_nan_inf(algorithm):
    spec = Conv2DSpec.from_shapes((1, 4, 7, 7), (8, 4, 3, 3), padding=1)
    w = weight(spec)
    bias = np.linspace(-1, 1, 8).astype(np.float32)
    x = activation(spec, 0.5)
    x[0, 1, 3, 3], x[0, 2, 0, 6], x[0, 0, 5, 1] = np.nan, np.inf, -0.0
    layer = CompiledLayer(algorithm, spec, w, bias=bias, relu=True)
    y = layer(x)
    ref = dense_conv2d(spec, x, w, bias, relu=True)
    assert np.isnan(y).sum() == np.isnan(ref).sum() > 0
    assert_conv_close(y, ref, spec)


def test_direct_supports_groups_lowerings_refuse_them():
    spec = Conv2DSpec.from_shapes((1, 8, 6, 6), (8, 4, 3, 3), padding=1, groups=2)
    w = weight(spec)
    x = activation(spec, 0.5)
    assert_conv_close(CompiledLayer("direct", spec, w)(x), dense_conv2d(spec, x, w), spec)
    for a in LOWERINGS:
        with pytest.raises(UnsupportedConvError, match="groups=2"):
            CompiledLayer(a, spec, w)


def test_wrong_input_and_weight_shapes_are_refused():
    spec = Conv2DSpec.from_shapes((1, 4, 7, 7), (8, 4, 3, 3), padding=1)
    with pytest.raises(ConvSpecError, match="weight shape"):
        CompiledLayer("im2col", spec, np.zeros((8, 4, 5, 5), np.float32))
    layer = CompiledLayer("direct", spec, weight(spec))
    with pytest.raises(ConvSpecError, match="input shape"):
        layer(np.zeros((1, 4, 8, 7), np.float32))
