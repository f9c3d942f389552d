"""The output-stationary sparse kernels (im2csr, halo, pixcsr, hybrid): compiled encoders equal
the NumPy encoders exactly, outputs equal the dense oracle."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tvm_sparseconv.algorithms import KnobError, get_algorithm
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.conv import Conv2DSpec, UnsupportedConvError
from tvm_sparseconv.reference import dense_conv2d
from tvm_sparseconv.reference.halo import halo_encode
from tvm_sparseconv.reference.hybrid import hybrid_encode, hybrid_segments
from tvm_sparseconv.reference.im2csr import im2csr_encode
from tvm_sparseconv.reference.pixcsr import pixcsr_encode

from tvm_sparseconv.cpu import cpu_of

from conftest import AVX2_TARGET, AVX512_TARGET, DENSITIES, GRID, activation, assert_conv_close, grid_spec, weight

ALGORITHMS = ("im2csr", "halo", "pixcsr", "hybrid")
# per algorithm: the NumPy encoder and the names of its arrays, (pointers, indices, values) per part
ENCODERS = {"im2csr": (lambda s, x, k: im2csr_encode(s, x, k["block"]), (("csr_ptr", "csr_col", "csr_val"),)),
            "halo": (lambda s, x, k: halo_encode(s, x, k["block"]), (("halo_ptr", "halo_chan", "halo_val"),)),
            "pixcsr": (lambda s, x, k: pixcsr_encode(s, x, k["c_block"]), (("pix_ptr", "pix_code", "pix_val"),)),
            "hybrid": (lambda s, x, k: hybrid_encode(s, x, k["block"], k["c_block"], k["dense_from"]),
                       (("hyb_hptr", "hyb_hchan", "hyb_hval"), ("hyb_pptr", "hyb_pcode", "hyb_pval")))}
# small tiles, so that small layers have several of them: B = 2 pixels, or 2 channels x 2 rows
SMALL = {"im2csr": {"block": 2}, "halo": {"block": 2}, "pixcsr": {"c_block": 2, "rows": 2},
         "hybrid": {"block": 2, "c_block": 2, "rows": 2, "dense_from": 3}}


def assert_encoding_equals_reference(layer: CompiledLayer, x: np.ndarray, per_part: bool = False):
    """The compiled encoder's arrays, on their valid prefix, equal the NumPy encoder's; returns
    nnz (summed over the parts, or a list per part)."""
    encode, parts = ENCODERS[layer.algorithm.name]
    ref = encode(layer.spec, x, layer.knobs)
    out = layer.produced()
    counts = []
    for p, names in enumerate(parts):
        r = ref[3 * p:3 * p + 3]
        np.testing.assert_array_equal(out[names[0]], r[0])
        nnz = int(r[0][-1])
        for name, want in zip(names[1:], r[1:]):
            assert all(o >= w for o, w in zip(out[name].shape, want.shape))  # worst-case sized
            valid = tuple(slice(0, w) for w in want.shape)  # the entry axis may be any (hybrid's hval: L x nh)
            np.testing.assert_array_equal(out[name][valid], want)  # NaN == NaN here
        counts.append(nnz)
    assert layer.storage() == layer.algorithm.reference_storage(layer.spec, layer.knobs, x)
    return counts if per_part else sum(counts)


def check_layer(layer: CompiledLayer, w: np.ndarray, densities=DENSITIES, seed: int = 0) -> None:
    spec = layer.spec
    for d in densities:
        x = activation(spec, d, seed)
        assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
        nnz = assert_encoding_equals_reference(layer, x)
        if d == 0:  # only the pointers are stored
            out = layer.produced()
            pointers = sum(out[names[0]].size for names in ENCODERS[layer.algorithm.name][1])
            assert nnz == 0 and layer.storage().elements == pointers


@pytest.mark.slow  # a grid: the fast tier has test_conformance, the default run a covering sample
@pytest.mark.cover("algorithm", "grid_case")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_grid_all_densities(algorithm, grid_case):
    w = weight(grid_case)
    check_layer(CompiledLayer(algorithm, grid_case, w), w)


# every thread split, B = 1 (plain im2CSR), B not dividing Ow, M tile not dividing M
KNOB_VARIANTS = [{"block": 1, "m_tile": 16, "split": "tile_outer"},
                 {"block": 3, "m_tile": 8, "split": "tile_inner"},
                 {"block": 5, "m_tile": 48, "split": "fused"}]
# pixcsr: one block of all channels, blocks not dividing C, rows not dividing Oh, M tile not dividing M
PIXCSR_VARIANTS = [{"m_tile": 16, "c_block": 64, "rows": 1}, {"m_tile": 8, "c_block": 3, "rows": 3},
                   {"m_tile": 48, "c_block": 5, "rows": 64}]
# hybrid: all halo (dense_from 1), all pixel entries (1000), a mix; blocks and tiles as above
HYBRID_VARIANTS = [{"block": 1, "m_tile": 16, "c_block": 64, "rows": 1, "dense_from": 1},
                   {"block": 3, "m_tile": 8, "c_block": 3, "rows": 3, "dense_from": 4},
                   {"block": 5, "m_tile": 48, "c_block": 5, "rows": 64, "dense_from": 1000}]
VARIANTS = [(a, k) for a in ALGORITHMS[:2] for k in KNOB_VARIANTS] + [("pixcsr", k) for k in PIXCSR_VARIANTS] + \
    [("hybrid", k) for k in HYBRID_VARIANTS]


@pytest.mark.slow  # a grid: the fast tier has test_conformance, the default run a covering sample
@pytest.mark.cover("algorithm", "knobs", "case")
@pytest.mark.parametrize("algorithm,knobs", VARIANTS,
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{a}{b}" for a, b in v.items()))
@pytest.mark.parametrize("case", [GRID[2], GRID[7], GRID[8]], ids=("k3s2asym", "dil2", "k1s2batch2"))
def test_knob_variants(algorithm, knobs, case):
    spec = grid_spec(case)
    w = weight(spec)
    check_layer(CompiledLayer(algorithm, spec, w, knobs=knobs), w, densities=(0.05, 0.3, 1.0), seed=3)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", GRID, ids=range(len(GRID)))
def test_numpy_reference_multiply(algorithm, case):
    spec = grid_spec(case)
    algo = get_algorithm(algorithm)
    w, x = weight(spec), activation(spec, 0.3, seed=2)
    for knobs in ({}, SMALL[algorithm]):
        knobs = algo.knobs(spec, knobs)
        assert_conv_close(algo.reference(spec, knobs, x, w), dense_conv2d(spec, x, w), spec)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_nan_inf_negative_zero_bias_relu(algorithm):
    spec = Conv2DSpec.from_shapes((1, 6, 9, 10), (20, 6, 3, 3), padding=1)
    w = weight(spec)
    bias = np.linspace(-1, 1, 20).astype(np.float32)
    x = activation(spec, 0.3)
    x[0, 1, 4, 4], x[0, 2, 0, 9], x[0, 5, 8, 0] = np.nan, np.inf, -np.inf
    x[0, 3:5] = 0  # a NaN and an Inf with only zeros around: stored for themselves alone
    x[0, 3, 6, 2], x[0, 4, 1, 7] = np.nan, np.inf
    neg = np.where(x == 0, np.float32(-0.0), x)  # every zero as -0.0
    assert np.signbit(neg).sum() > np.signbit(x).sum()
    plain = CompiledLayer(algorithm, spec, w)
    y = plain(neg)
    ref = dense_conv2d(spec, x, w)
    assert np.isnan(ref).any() and np.isinf(ref).any()
    assert_conv_close(y, ref, spec)
    nnz = assert_encoding_equals_reference(plain, neg)
    plain(x)
    assert nnz == assert_encoding_equals_reference(plain, x)  # -0.0 stored nowhere more than 0.0
    fused = CompiledLayer(algorithm, spec, w, bias=bias, relu=True)
    y = fused(neg)
    ref = dense_conv2d(spec, x, w, bias, relu=True)
    assert np.isnan(y).sum() == np.isnan(ref).sum() > 0
    assert_conv_close(y, ref, spec)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_worst_case_fills_the_whole_buffers(algorithm):
    """No padding, B dividing Ow, every value non-zero: every candidate entry is stored."""
    spec = Conv2DSpec.from_shapes((2, 3, 6, 8), (8, 3, 3, 3))
    w = weight(spec)
    x = np.full(spec.x_shape, 0.5, np.float32)
    layer = CompiledLayer(algorithm, spec, w, knobs=SMALL[algorithm])
    assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
    nnz = assert_encoding_equals_reference(layer, x)
    assert nnz == layer.produced()[ENCODERS[algorithm][1][0][1]].shape[0]


def hybrid_one_part_each(spec, w, knobs, x, above):
    """x with every value non-zero, through hybrid with dense_from 1 (every (segment, channel) a
    halo entry) and ``above`` > B*Kw (every read offset a pixel entry); checked against the
    oracle and the NumPy encoder. Yields (layer, (halo nnz, pixel nnz), the part's index array)."""
    for dense_from, full in ((1, "hyb_hchan"), (above, "hyb_pcode")):
        layer = CompiledLayer("hybrid", spec, w, knobs={**knobs, "dense_from": dense_from})
        assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
        yield layer, assert_encoding_equals_reference(layer, x, per_part=True), full


# pixcsr's and hybrid's encoders transpose 16x16 tiles of a channel block when C and c_block
# are multiples of 16 and W >= 16: a tail tile (W = 20, 17), a last block past C (C = 48,
# c_block 32), batch 2 and 1x1; c_block 24 (not a multiple of 16) takes the element-wise copy
TILE_CASES = [((1, 32, 20, 20), (16, 32, 3, 3), 1, 1, {}),
              ((1, 48, 18, 17), (20, 48, 3, 3), 2, 1, {"c_block": 32}),
              ((2, 64, 16, 16), (32, 64, 1, 1), 1, 0, {"c_block": 16}),
              ((1, 48, 17, 19), (16, 48, 3, 3), 1, 1, {"c_block": 24})]
TILE_IDS = ("tail", "pad-strided", "1x1", "untiled")


@pytest.mark.parametrize("shape,wshape,stride,padding,knobs", TILE_CASES, ids=TILE_IDS)
def test_pixcsr_transposed_tiles(shape, wshape, stride, padding, knobs):
    spec = Conv2DSpec.from_shapes(shape, wshape, stride, padding)
    w = weight(spec)
    layer = CompiledLayer("pixcsr", spec, w, knobs=knobs)
    check_layer(layer, w, seed=4)
    x = np.full(spec.x_shape, -2.0, np.float32)  # worst case: every pixel's every channel an entry
    assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
    assert assert_encoding_equals_reference(layer, x) == layer.produced()["pix_code"].shape[0]


HYBRID_TILE_KNOBS = ({}, {"block": 3}, {"dense_from": 2})  # added to the first three TILE_CASES


@pytest.mark.slow  # the default run has it, the fast tier has test_conformance
@pytest.mark.parametrize("shape,wshape,stride,padding,knobs",
                         [(*case[:4], {**case[4], **extra}) for case, extra in zip(TILE_CASES, HYBRID_TILE_KNOBS)],
                         ids=TILE_IDS[:3])
def test_hybrid_transposed_tiles(shape, wshape, stride, padding, knobs):
    spec = Conv2DSpec.from_shapes(shape, wshape, stride, padding)
    w = weight(spec)
    layer = CompiledLayer("hybrid", spec, w, knobs=knobs)
    check_layer(layer, w, seed=4)
    for _, counts, full in hybrid_one_part_each(spec, w, knobs, np.full(spec.x_shape, -2.0, np.float32), 10 ** 6):
        assert counts[full == "hyb_pcode"] > 0 and counts[full != "hyb_pcode"] == 0


@pytest.mark.parametrize("shape,wshape,stride", [((1, 96, 10, 10), (160, 96, 1, 1), 1),
                                                 ((1, 64, 9, 9), (40, 64, 1, 1), 2)], ids=("1x1", "1x1-strided"))
def test_hybrid_pointwise_defaults(shape, wshape, stride):
    """1x1 defaults (block 2 x m_tile up to 128, 64-channel blocks, 2-row tasks): a partial
    last m-tile and channel block, an odd number of output rows."""
    spec = Conv2DSpec.from_shapes(shape, wshape, stride)
    w = weight(spec)
    layer = CompiledLayer("hybrid", spec, w)
    assert (layer.knobs["block"], layer.knobs["c_block"], layer.knobs["rows"]) == (2, 64, 2)
    check_layer(layer, w, seed=6)


@pytest.mark.parametrize("algorithm", ["pixcsr", "hybrid"])
def test_encoders_without_avx512(algorithm):
    """The encoders' compress and shuffles are generic LLVM vector operations: a target without
    AVX-512 gets them expanded, and the same answers."""
    spec = Conv2DSpec.from_shapes((1, 32, 20, 20), (16, 32, 3, 3), padding=1)
    w = weight(spec)
    layer = CompiledLayer(algorithm, spec, w, target={"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    check_layer(layer, w, densities=(0.0, 0.3, 1.0), seed=5)


def test_hybrid_worst_case_fills_either_part():
    """Every value non-zero: with dense_from 1 every (segment, channel) is a halo entry, with a
    dense_from above B*Kw every read offset of it a pixel entry; either fills its buffers."""
    spec = Conv2DSpec.from_shapes((2, 3, 6, 8), (8, 3, 3, 3))
    w = weight(spec)
    x = np.full(spec.x_shape, 0.5, np.float32)
    for layer, (nh, npx), full in hybrid_one_part_each(spec, w, SMALL["hybrid"], x, 7):
        assert (nh if full == "hyb_hchan" else npx) == layer.produced()[full].shape[0]
        assert (npx if full == "hyb_hchan" else nh) == 0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_channels_and_regions_cost_nothing(algorithm):
    spec = Conv2DSpec.from_shapes((1, 8, 12, 12), (16, 8, 3, 3), padding=1)
    w = weight(spec)
    x = np.zeros(spec.x_shape, np.float32)
    x[0, 5, 2, 3] = 1.5  # one non-zero: im2csr stores Kh*Kw entries, halo at most 2 (segment overlap)
    layer = CompiledLayer(algorithm, spec, w, knobs={"block": 4} if algorithm != "pixcsr" else {"c_block": 3})
    assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
    names = ENCODERS[algorithm][1][0]
    nnz = assert_encoding_equals_reference(layer, x)
    out = layer.produced()
    if algorithm == "im2csr":
        assert 1 <= nnz <= 9 and set(out[names[1]][:nnz] // 9) == {5}
    elif algorithm == "pixcsr":  # stored once: code = column * c_block + channel in its block
        assert nnz == 1 and out[names[1]][0] == 3 * 3 + 5 % 3 and out[names[2]][0] == 1.5
    elif algorithm == "hybrid":  # a pixel entry in each of the 2 segments holding column 3
        parts = [out[n] for names in ENCODERS[algorithm][1] for n in names]
        seg = hybrid_segments(spec, 4, layer.knobs["c_block"], *parts)
        assert nnz == 2 and int(out["hyb_hptr"][-1]) == 0 and set(np.nonzero(seg)[1]) == {5}
    else:
        assert 1 <= nnz <= 2 and set(out[names[1]][:nnz]) == {5}


@pytest.mark.parametrize("algorithm", ("halo", "pixcsr", "hybrid"))
def test_strided_pointwise_skips_unread_rows_and_columns(algorithm):
    """1x1 stride 2 reads every other row and column: the rest is never stored."""
    spec = Conv2DSpec.from_shapes((1, 4, 8, 8), (8, 4, 1, 1), stride=2)
    w = weight(spec)
    x = np.zeros(spec.x_shape, np.float32)
    x[0, :, 1::2, :] = 1.0  # odd rows: unread
    x[0, :, ::2, 1::2] = 1.0  # odd columns of even rows: unread
    layer = CompiledLayer(algorithm, spec, w, knobs=SMALL[algorithm])
    assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
    assert assert_encoding_equals_reference(layer, x) == 0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_groups_and_bad_knobs_are_refused(algorithm):
    g = Conv2DSpec.from_shapes((1, 8, 6, 6), (8, 4, 3, 3), padding=1, groups=2)
    with pytest.raises(UnsupportedConvError, match="groups=2"):
        CompiledLayer(algorithm, g, weight(g))
    spec = Conv2DSpec.from_shapes((1, 4, 6, 6), (8, 4, 3, 3), padding=1)
    bad = (({"tile": 4}, "no knob"), ({"m_tile": 2.5}, "m_tile"))
    bad += {"pixcsr": (({"c_block": 0}, "c_block"), ({"rows": -1}, "rows")),
            "hybrid": (({"block": 0}, "block"), ({"dense_from": 0}, "dense_from"), ({"rows": True}, "rows"))}.get(
        algorithm, (({"block": 0}, "block"), ({"split": "rows"}, "split")))
    for knobs, msg in bad:
        with pytest.raises(KnobError, match=msg):
            CompiledLayer(algorithm, spec, weight(spec), knobs=knobs)


@pytest.mark.parametrize("target", (AVX512_TARGET, AVX2_TARGET), ids=("avx512", "avx2"))
@pytest.mark.parametrize("algorithm", ("im2csr", "halo", "hybrid"))
def test_defaults_fill_the_accumulator_registers(algorithm, target):
    algo, cpu = get_algorithm(algorithm), cpu_of(target)
    big = Conv2DSpec.from_shapes((1, 256, 56, 56), (256, 256, 3, 3), padding=1)
    k = algo.knobs(big, None, cpu)
    # half the registers: 16 zmm on AVX-512, 8 ymm on AVX2 (no spill)
    assert k["block"] * k["m_tile"] // cpu.lanes == cpu.accumulators
    small = Conv2DSpec.from_shapes((1, 3, 4, 3), (5, 3, 3, 3), padding=1)
    k = algo.knobs(small, None, cpu)
    assert k["block"] <= small.out_w and k["m_tile"] == 16


@st.composite
def small_layers(draw):
    n, c, m = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 20))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(max(1, dil[0] * (kh - 1) + 1 - pad[0] - pad[2]), 9))
    w = draw(st.integers(max(1, dil[1] * (kw - 1) + 1 - pad[1] - pad[3]), 9))
    spec = Conv2DSpec.from_shapes((n, c, h, w), (m, c, kh, kw), stride, pad, dil)
    knobs = {"block": draw(st.integers(1, 5)), "m_tile": draw(st.sampled_from((8, 16, 32))),
             "split": draw(st.sampled_from(("tile_outer", "fused", "tile_inner"))),
             "c_block": draw(st.integers(1, 7)), "rows": draw(st.integers(1, 4)),
             "dense_from": draw(st.integers(1, 12))}
    return spec, knobs, draw(st.sampled_from((0.0, 0.2, 0.6, 1.0))), draw(st.integers(0, 2**16))


@pytest.mark.slow  # the default run has it, the fast tier has test_conformance
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=6, deadline=None)
@given(case=small_layers())
def test_random_small_layers(algorithm, case):
    spec, knobs, density, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(spec.x_shape).astype(np.float32)
    x[rng.random(spec.x_shape) >= density] = 0  # unclustered zeros, for coverage
    w = weight(spec, seed)
    own = get_algorithm(algorithm).knobs(spec)
    layer = CompiledLayer(algorithm, spec, w, knobs={k: v for k, v in knobs.items() if k in own})
    assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
    assert_encoding_equals_reference(layer, x)


def test_pixcsr_defaults_keep_a_weight_block_near_64kb():
    algo = get_algorithm("pixcsr")
    for shape, wshape in (((1, 256, 56, 56), (256, 256, 3, 3)), ((1, 256, 14, 14), (1024, 256, 1, 1)),
                          ((1, 64, 56, 56), (64, 64, 7, 7))):
        spec = Conv2DSpec.from_shapes(shape, wshape, padding=wshape[2] // 2)
        k = algo.knobs(spec)
        block_kb = spec.kernel_w * k["c_block"] * k["m_tile"] * 4 / 1024  # weights of one kernel row
        assert 32 <= block_kb <= 128 or k["c_block"] == spec.in_channels, (k, block_kb)
        assert k["rows"] * spec.out_w >= 112 or k["rows"] == spec.out_h
    small = Conv2DSpec.from_shapes((1, 3, 4, 3), (5, 3, 3, 3), padding=1)
    assert algo.knobs(small) == {"m_tile": 16, "c_block": 3, "rows": 4, "layout_in": "nchw", "layout_out": "nchw"}
    knobs = algo.knobs(small, {"c_block": np.int64(2), "rows": np.int32(3)})  # NumPy ints, as from arrays
    assert algo.constants(small, weight(small), None, knobs)["w"].shape == (1, 2 * 9 * 2, 16)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rows_ending_in_empty_rows(algorithm):
    """Only the first pixel of every input row is non-zero: every row (and parallel unit) of the
    encoder ends in empty rows, whose candidates must not clobber the next unit's entries."""
    spec = Conv2DSpec.from_shapes((2, 5, 7, 9), (6, 5, 3, 3), padding=1)
    w = weight(spec)
    x = np.zeros(spec.x_shape, np.float32)
    x[:, :, :, 0] = np.arange(1, 1 + 2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    layer = CompiledLayer(algorithm, spec, w, knobs=SMALL[algorithm])
    assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
    assert assert_encoding_equals_reference(layer, x) > 0


def test_timing_modes_and_the_fresh_input_refresh():
    """cache="fresh" rewrites x from a saved copy before every run (and re-runs the stages
    before the one timed); the refresh must restore x exactly, float32 or int32, any length."""
    from tvm_sparseconv.build import _refresher

    spec = Conv2DSpec.from_shapes((1, 24, 9, 11), (32, 24, 3, 3), padding=1)
    x, w = activation(spec, 0.3), weight(spec)
    layer = CompiledLayer("hybrid", spec, w)
    for cache in ("fresh", "warm", "cold"):
        t = layer.time(x, repeat=2, cache=cache)
        assert t.encode_ms > 0 and t.multiply_ms > 0
        assert_conv_close(layer.buffers["y"].numpy(), dense_conv2d(spec, x, w), spec)  # left holding x's result
    with pytest.raises(ValueError, match="cache must be one of"):
        layer.time(cache="hot")
    layer(x)
    for name in ("x", "hyb_pptr"):
        buf = layer.buffers[name]
        saved = buf.numpy()
        refresh = _refresher(buf, layer.target)
        buf.copyfrom(np.full(saved.shape, 7, saved.dtype))
        refresh()
        assert np.array_equal(buf.numpy(), saved)
