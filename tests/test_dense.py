"""dense (register-tiled direct conv in TIR) against the NumPy oracle."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tvm_sparseconv.algorithms import KnobError, get_algorithm
from tvm_sparseconv.algorithms.dense import DENSE_SPLITS, default_tiling, make_tiling, tile_weights, weights_outer
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.conv import Conv2DSpec, Epilogue, UnsupportedConvError
from tvm_sparseconv.reference import Storage, dense_conv2d, pad_input

from tvm_sparseconv.cpu import cpu_of

from conftest import AVX2_TARGET, AVX512_TARGET, SSE_TARGET, DENSITIES, activation, assert_conv_close, grid_spec, weight

DENSE = get_algorithm("dense")

# knob sets that reach every code path of the direct kernel: pixel tails, border tiles, channel
# blocks (with a short last block), M tiles past M, every parallel order, the padded copy
KNOB_SETS = [
    {},
    {"kernel": "window", "block": 3, "m_tile": 16, "c_block": 3, "split": "row_outer"},
    {"kernel": "window", "block": 5, "m_tile": 64, "c_block": 2, "pad": "copy", "split": "row_band"},
]


def check_all_densities(spec, knobs=None, seed=0):
    w = weight(spec)
    layer = CompiledLayer("dense", spec, w, knobs=knobs)
    for d in DENSITIES:
        x = activation(spec, d, seed)
        assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
    return layer


@pytest.mark.slow  # a grid: the fast tier has test_conformance, the default run a covering sample
@pytest.mark.cover("grid_case", "knobs")
@pytest.mark.parametrize("knobs", KNOB_SETS, ids=["defaults", "tails-cblock-rowouter", "odd-tiles-padcopy-rowband"])
def test_grid_all_densities(grid_case, knobs):
    check_all_densities(grid_case, knobs)


@pytest.mark.parametrize("case", [
    ((1, 3, 20, 20), 64, (3, 3), 1, 1, 1),    # VGG's first layer: 3 channels
    ((1, 3, 21, 21), 64, (7, 7), 2, 3, 1),    # ResNet stem
    ((1, 16, 9, 9), 24, (3, 3), 1, 1, 1),     # M not a multiple of 16 or 32
    ((2, 20, 7, 7), 40, (1, 1), 1, 0, 1),     # pointwise, batch 2, read in place
    ((1, 12, 11, 11), 24, (1, 1), 2, 0, 1),   # strided pointwise
    ((1, 8, 14, 14), 16, (3, 3), 1, 2, 2),    # dilation 2
    ((1, 4, 5, 5), 16, (1, 1), 1, 2, 1),      # padding wider than the kernel: all-padding rows and tiles
    ((1, 8, 7, 7), 32, (3, 3), 1, 1, 1),      # ResNet's last stage: rows narrower than a tile
], ids=["first-layer", "stem-7x7-s2", "m24", "pointwise-batch2", "pointwise-s2", "dilated", "wide-padding",
        "7x7"])
def test_layer_shapes(case):
    check_all_densities(grid_spec(case))


@pytest.mark.parametrize("knobs", [{"block": 16, "m_tile": 5}, {"block": 64, "m_tile": 16, "split": "row_outer"},
                                   {"block": 32, "m_tile": 1}, {"block": 16, "m_tile": 6, "split": "row_band"}])
def test_gemm_kernel_tails(knobs):
    # P = 7 * 9 = 63 pixels: a short last pixel tile; M = 20: a short last M tile (except m_tile 1)
    spec = Conv2DSpec.from_shapes((2, 12, 7, 9), (20, 12, 1, 1))
    layer = check_all_densities(spec, {"kernel": "gemm", **knobs})
    assert layer.knobs["kernel"] == "gemm"


def test_pad_stage_output_and_storage():
    spec = grid_spec(((2, 6, 9, 11), 20, (3, 3), 2, (1, 0, 2, 1), 1))
    x = activation(spec, 0.3, seed=5)
    layer = CompiledLayer("dense", spec, weight(spec), knobs={"pad": "copy"})
    layer(x)
    produced = layer.produced()
    np.testing.assert_array_equal(produced["xp"], pad_input(spec, x))
    assert layer.storage() == DENSE.reference_storage(spec, layer.knobs, x)
    assert layer.storage().elements == 2 * 6 * 12 * 12
    assert [st.kind for st in layer.stages] == ["encode", "multiply"]


@pytest.mark.parametrize("w_shape,pad", [((16, 8, 1, 1), 0), ((16, 8, 3, 3), 1)], ids=["pointwise", "padded"])
def test_default_reads_x_in_place(w_shape, pad):
    spec = Conv2DSpec.from_shapes((1, 8, 6, 6), w_shape, padding=pad)
    layer = CompiledLayer("dense", spec, weight(spec))
    assert [st.name for st in layer.stages] == ["multiply"]
    assert layer.stages[0].inputs[0] == "x"
    x = activation(spec, 0.5)
    layer(x)
    assert layer.storage() == DENSE.reference_storage(spec, layer.knobs, x) == Storage(0, 0)


@pytest.mark.parametrize("knobs", [{}, {"c_block": 3, "block": 3}])
def test_epilogue_bias_relu_nan_inf_and_negative_zero(knobs):
    spec = Conv2DSpec.from_shapes((2, 5, 9, 9), (24, 5, 3, 3), padding=1)
    w = weight(spec)
    bias = np.linspace(-1, 1, 24).astype(np.float32)
    x = activation(spec, 0.5)
    x[0, 1, 3, 3], x[0, 2, 0, 6], x[1, 4, 8, 8], x[1, 0, 5, 1] = np.nan, np.inf, -np.inf, -0.0
    layer = CompiledLayer("dense", spec, w, bias=bias, relu=True, knobs=knobs)
    y = layer(x)
    ref = dense_conv2d(spec, x, w, bias, relu=True)
    assert np.isnan(y).sum() == np.isnan(ref).sum() > 0
    assert_conv_close(y, ref, spec)
    # bias alone, no ReLU: negative outputs stay
    y2 = CompiledLayer("dense", spec, w, bias=bias, knobs=knobs)(x)
    ref2 = dense_conv2d(spec, x, w, bias)
    assert (ref2 < 0).any()
    assert_conv_close(y2, ref2, spec)


def test_inf_weight_meets_padding():
    """pad="copy" multiplies the padded zeros (0 * Inf = NaN, as the reference); the default
    pad="inplace" skips padded taps, so an Inf weight that meets only padding adds nothing there
    (as in oneDNN's direct convolution)."""
    spec = Conv2DSpec.from_shapes((1, 4, 6, 6), (16, 4, 3, 3), padding=1)
    w = weight(spec)
    w[3, 1, 0, 0] = np.inf
    x = activation(spec, 1.0)
    x[0, 1, 2, 2] = 0.0  # an in-image zero meets the Inf weight: NaN on both paths
    ref = dense_conv2d(spec, x, w)
    assert_conv_close(CompiledLayer("dense", spec, w, knobs={"pad": "copy"})(x), ref, spec)
    y = CompiledLayer("dense", spec, w)(x)
    padded_tap = np.zeros(ref.shape, bool)
    padded_tap[0, 3, 0, :] = padded_tap[0, 3, :, 0] = True  # output pixels whose (0, 0) tap is padding
    assert np.isnan(ref[padded_tap]).all() and np.isfinite(y[padded_tap]).all()
    assert np.isnan(y[0, 3, 3, 3]) and np.isnan(ref[0, 3, 3, 3])
    assert_conv_close(y[~padded_tap], ref[~padded_tap], spec)


def test_groups_are_refused():
    spec = Conv2DSpec.from_shapes((1, 8, 6, 6), (8, 4, 3, 3), padding=1, groups=2)
    with pytest.raises(UnsupportedConvError, match="groups=2"):
        CompiledLayer("dense", spec, weight(spec))


@pytest.mark.parametrize("bad,k", [({"block": 0}, 3), ({"m_tile": 20}, 3), ({"m_tile": 40}, 3), ({"c_block": -1}, 3),
                                   ({"split": "diagonal"}, 3), ({"pad": "mirror"}, 3), ({"unroll": 2}, 3),
                                   ({"kernel": "gemm"}, 3), ({"kernel": "gemm", "block": 34}, 1),
                                   ({"kernel": "gemm", "m_tile": 17}, 1), ({"kernel": "winograd"}, 1)])
def test_bad_knobs_are_refused(bad, k):
    spec = Conv2DSpec.from_shapes((1, 8, 6, 6), (16, 8, k, k), padding=k // 2)
    with pytest.raises(KnobError):
        DENSE.stages(spec, Epilogue(), DENSE.knobs(spec, bad))


def test_weight_layouts():
    spec = Conv2DSpec.from_shapes((1, 3, 5, 5), (20, 3, 3, 2))
    knobs = DENSE.knobs(spec, {"block": 4, "m_tile": 16})
    w = weight(spec)
    wt = tile_weights(spec, w, make_tiling(spec, knobs))
    assert wt.shape == (2, 3, 3, 2, 16)  # n_mt, Kh, C, Kw, m_tile
    np.testing.assert_array_equal(wt[1, 0, 2, 1, 3], w[19, 2, 0, 1])
    assert not wt[1, ..., 4:].any()  # output channels past M are zero
    spec = Conv2DSpec.from_shapes((1, 3, 5, 5), (20, 3, 1, 1))
    w = weight(spec)
    wt = tile_weights(spec, w, make_tiling(spec, DENSE.knobs(spec, {"m_tile": 8})))
    assert wt.shape == (3, 3, 8)  # n_mt, C, m_tile
    np.testing.assert_array_equal(wt[2, 1, 3], w[19, 1, 0, 0])
    assert not wt[2, :, 4:].any()


def test_default_knobs_rule():
    avx512, avx2 = cpu_of(AVX512_TARGET), cpu_of(AVX2_TARGET)  # L2 1 MB and 256 KB per core
    vgg = Conv2DSpec.from_shapes((1, 256, 56, 56), (256, 256, 3, 3), padding=1)
    assert default_tiling(vgg, avx512)["kernel"] == "window" and default_tiling(vgg, avx512)["block"] == 8
    assert default_tiling(vgg, avx512)["split"] == "m_outer"  # 2.4 MB of weights: keep an M tile's in cache
    # AVX2 at stride 1: 5 pixels x 2 vectors = 10 of the 16 ymm registers
    assert (default_tiling(vgg, avx2)["block"], default_tiling(vgg, avx2)["m_tile"]) == (5, 16)
    res5 = Conv2DSpec.from_shapes((1, 512, 7, 7), (512, 512, 3, 3), padding=1)
    assert default_tiling(res5, avx512)["block"] == 7  # never wider than the row
    assert default_tiling(res5, avx2)["block"] == 4  # balanced over it: 4 + 3 columns, not 5 + 2
    row14 = Conv2DSpec.from_shapes((1, 64, 14, 14), (64, 64, 3, 3), padding=1)
    assert default_tiling(row14, avx512)["block"] == 7  # 7 + 7, not 8 + 6
    strided = Conv2DSpec.from_shapes((1, 32, 56, 56), (32, 32, 3, 3), padding=1, stride=2)
    assert (default_tiling(strided, avx2)["block"], default_tiling(strided, avx2)["m_tile"]) == (4, 16)
    res = Conv2DSpec.from_shapes((1, 256, 14, 14), (1024, 256, 1, 1))
    assert default_tiling(res, avx512)["kernel"] == "gemm" and default_tiling(res, avx512)["split"] == "m_outer"
    assert (default_tiling(res, avx2)["block"], default_tiling(res, avx2)["m_tile"]) == (16, 6)
    # gemm: a channel-reducing 1x1 whose pixel tile's input fits in the L1 walks every M tile per
    # pixel tile; with 64 KB per tile (512 channels x 32 pixels) it does not
    reduce56 = Conv2DSpec.from_shapes((1, 128, 56, 56), (32, 128, 1, 1))
    reduce14 = Conv2DSpec.from_shapes((1, 512, 14, 14), (128, 512, 1, 1))
    assert default_tiling(reduce56, avx512)["split"] == "row_outer"
    assert default_tiling(reduce14, avx512)["split"] == "m_outer"
    down = Conv2DSpec.from_shapes((1, 256, 56, 56), (512, 256, 1, 1), stride=2)
    nchw = {"layout_in": "nchw", "layout_out": "nchw"}  # the layouts default to NCHW
    assert default_tiling(down, avx512) == {"kernel": "window", "block": 4, "m_tile": 64, "c_block": 64,
                                            "split": "row_outer", "pad": "inplace", **nchw}
    # 512 KB of weights do not fit half of a 256 KB L2
    assert default_tiling(down, avx2) == {"kernel": "window", "block": 2, "m_tile": 32, "c_block": 64,
                                          "split": "m_outer", "pad": "inplace", **nchw}
    for cpu in (avx512, avx2):
        for spec in (vgg, res5, res, down, Conv2DSpec.from_shapes((1, 3, 5, 3), (24, 3, 3, 3))):
            tl = make_tiling(spec, default_tiling(spec, cpu))
            # accumulator vectors fit the registers with room for the operands
            assert tl.block * tl.m_tile // cpu.lanes <= cpu.registers * 3 // 4


def test_window_tiles_that_loop_over_the_weights_outside_the_pixels():
    """The window tiles whose accumulators, weight vectors and a broadcast overflow the
    registers (3 x 32 on AVX2) loop over a tap's weight vectors outside its pixels; built for
    AVX2 (every x86 host here runs it), in NCHW and blocks, with border tiles, against NumPy."""
    avx2, avx512 = cpu_of(AVX2_TARGET), cpu_of(AVX512_TARGET)
    assert weights_outer(3, 32, 8, avx2) and weights_outer(1, 64, 8, avx2)
    assert not weights_outer(4, 16, 8, avx2) and not weights_outer(6, 16, 8, avx2)  # fit, or neither order fits
    assert not any(weights_outer(b, m, 16, avx512) for b in (3, 4, 5, 6, 8) for m in (16, 32, 64) if b * m // 16 <= 24)
    spec = Conv2DSpec.from_shapes((1, 20, 6, 13), (40, 20, 3, 3), padding=1)  # 13 columns: a border tile of 1
    w = weight(spec)
    for layout in ("nchw", "nchw8c"):
        layer = CompiledLayer("dense", spec, w, target=AVX2_TARGET, knobs={
            "kernel": "window", "block": 3, "m_tile": 32, "layout_in": layout, "layout_out": layout})
        for d in (0.0, 0.4, 1.0):
            x = activation(spec, d)
            assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 9), hw=st.integers(3, 11), m=st.integers(1, 40),
       k=st.sampled_from([(1, 1), (3, 3), (2, 3), (5, 1)]), s=st.integers(1, 2), d=st.integers(1, 2),
       pad=st.tuples(*[st.integers(0, 2)] * 4), block=st.integers(1, 9), c_block=st.integers(0, 4),
       split=st.sampled_from(DENSE_SPLITS), defaults=st.booleans(), seed=st.integers(0, 1000))
def test_random_small_layers(n, c, hw, m, k, s, d, pad, block, c_block, split, defaults, seed):
    try:
        spec = Conv2DSpec.from_shapes((n, c, hw, hw + 1), (m, c) + k, s, pad, d)
    except ValueError:
        return  # the kernel does not fit the padded input
    w = weight(spec, seed)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(spec.x_shape) * (rng.random(spec.x_shape) < 0.5)).astype(np.float32)
    knobs = {} if defaults else {"block": block, "c_block": c_block, "kernel": "window", "split": split}
    y = CompiledLayer("dense", spec, w, knobs=knobs)(x)
    assert_conv_close(y, dense_conv2d(spec, x, w), spec)


def test_the_old_kernel_name_direct_is_read_as_window():
    spec = Conv2DSpec.from_shapes((1, 8, 6, 6), (16, 8, 3, 3), padding=1)
    assert DENSE.knobs(spec, {"kernel": "direct", "block": 3})["kernel"] == "window"


def test_gemm_defaults_build_on_a_4_lane_isa():
    """4 lanes: the default pixel tile is 3 vectors (12 pixels) when 12 divides H*W, and the
    window kernel's channel tile 3 vectors (12 channels) for M = 12."""
    spec = Conv2DSpec.from_shapes((1, 16, 6, 6), (8, 16, 1, 1))
    assert DENSE.knobs(spec, None, SSE_TARGET)["block"] == 12
    x, w = activation(spec, 0.5), weight(spec)
    layer = CompiledLayer("dense", spec, w, target=SSE_TARGET)
    assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
    # M = 12: 3 vectors of 4 lanes by default, a tile the knobs accept
    spec = Conv2DSpec.from_shapes((1, 8, 5, 6), (12, 8, 3, 3), padding=1)
    assert DENSE.knobs(spec, None, SSE_TARGET)["m_tile"] == 12
    x, w = activation(spec, 0.5), weight(spec)
    assert_conv_close(CompiledLayer("dense", spec, w, target=SSE_TARGET)(x), dense_conv2d(spec, x, w), spec)
