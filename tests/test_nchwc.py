"""The channel-blocked activation layout (NCHWc): the layout names, the transforms to and from
NCHW, and the dense kernels reading and writing it, against NumPy float64."""
import itertools

import numpy as np
import pytest
import tvm

from tvm_sparseconv.algorithms import KnobError, get_algorithm
from tvm_sparseconv.algorithms.layout import transform_stage
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.conv import Conv2DSpec, Epilogue
from tvm_sparseconv.cpu import cpu_of
from tvm_sparseconv.layout import NCHW, LayoutError, channel_block, lanes_layout, layout_shape
from tvm_sparseconv.reference import Storage, dense_conv2d
from tvm_sparseconv.reference.layout import from_layout, to_layout
from tvm_sparseconv.stages import stage_func

from conftest import DENSITIES, GRID, HOST, activation, assert_conv_close, grid_id, grid_spec, isa_cases, weight

DENSE = get_algorithm("dense")
BLOCKED = lanes_layout(HOST)  # one vector of the host per pixel's block
PAIRS = list(itertools.product((NCHW, BLOCKED), repeat=2))
PAIR_IDS = [f"{a}-{b}" for a, b in PAIRS]


def test_layout_names():
    assert channel_block("nchw") == 0 and channel_block("nchw16c") == 16 and channel_block("nchw1c") == 1
    for bad in ("nhwc", "nchw3c", "nchw0c", "nchw016c", "nchw128c", "NCHW16c", "nchw16", None):
        with pytest.raises(LayoutError, match="nchw<cb>c"):
            channel_block(bad)
    assert layout_shape((2, 20, 5, 7), "nchw8c") == (2, 3, 5, 7, 8)
    assert layout_shape((2, 20, 5, 7), "nchw") == (2, 20, 5, 7)
    assert lanes_layout(cpu_of({"kind": "llvm", "mcpu": "haswell"})) == "nchw8c"


def test_numpy_twins():
    x = np.arange(2 * 20 * 3 * 5, dtype=np.float32).reshape(2, 20, 3, 5)
    xb = to_layout(x, "nchw8c")
    assert xb.shape == (2, 3, 3, 5, 8)
    assert xb[1, 2, 1, 4, 3] == x[1, 19, 1, 4]  # channel 19 = block 2, lane 3
    assert not xb[:, 2, :, :, 4:].any()  # channels 20..23 of the last block are zeros
    np.testing.assert_array_equal(from_layout(xb, "nchw8c", 20), x)
    assert to_layout(x, NCHW) is x


def _transforms(shape, layout, target):
    """The library of both transforms of ``shape``: "f0" to ``layout``, "f1" back."""
    cpu = cpu_of(target)
    funcs = {f"f{i}": stage_func(transform_stage(shape, a, b, cpu)).with_attr("global_symbol", f"f{i}")
             for i, (a, b) in enumerate(((NCHW, layout), (layout, NCHW)))}
    return tvm.compile(tvm.IRModule(funcs), target=target)


def _run_transforms(lib, shape, layout, x):
    xb = tvm.runtime.tensor(np.full(layout_shape(shape, layout), np.nan, np.float32))  # poisoned
    lib["f0"](tvm.runtime.tensor(x), xb)
    back = tvm.runtime.tensor(np.full(shape, np.nan, np.float32))
    lib["f1"](xb, back)
    return xb.numpy(), back.numpy()


@pytest.mark.parametrize("isa,target,runs", [("host", None, True)] + [c[:3] for c in isa_cases()],
                         ids=["host"] + [c[0] for c in isa_cases()])
def test_transforms_against_numpy(isa, target, runs):
    """Both transforms per ISA: whole register-transposed tiles (C and cb multiples of the
    lanes, rows at least a vector), and element by element (a partial last block, narrow rows,
    a block narrower than a vector); NaN, Inf and -0.0 move as they are; the lanes past C are
    zeros whatever the buffer held."""
    lanes = cpu_of(target).lanes
    rng = np.random.default_rng(3)
    for shape, cb in (((1, 4 * lanes, 3, lanes + 3), lanes), ((2, 2 * lanes, 2, lanes), 2 * lanes),
                      ((1, 20, 3, 19), lanes), ((2, 3, 5, 2), lanes), ((1, 12, 2, 9), max(lanes // 2, 1))):
        layout = f"nchw{cb}c"
        x = rng.standard_normal(shape).astype(np.float32)
        x.flat[[0, 5, 9]] = np.nan, np.inf, -0.0
        lib = _transforms(shape, layout, target)
        if not runs:
            continue
        xb, back = _run_transforms(lib, shape, layout, x)
        np.testing.assert_array_equal(xb, to_layout(x, layout))
        assert np.array_equal(back.view(np.uint32), x.view(np.uint32))  # bit for bit, -0.0 and NaN too
    if not runs:
        pytest.skip(f"built for {isa} without running it: this host ({HOST.name}) has no {isa}")


def test_transform_between_two_blocked_layouts_is_refused():
    with pytest.raises(ValueError, match="between nchw and a blocked"):
        transform_stage((1, 8, 4, 4), "nchw8c", "nchw16c", HOST)


# -- the dense kernels ----------------------------------------------------------------------
# C = 20 and M = 24: neither a multiple of 8 or 16, so the last block of x and y is partial
LAYERS = {
    "window-3x3-batch8": (Conv2DSpec.from_shapes((8, 20, 6, 9), (24, 20, 3, 3), padding=1), {"kernel": "window"}),
    "window-1x1-s2": (Conv2DSpec.from_shapes((1, 20, 9, 9), (24, 20, 1, 1), stride=2), {"kernel": "window"}),
    "gemm": (Conv2DSpec.from_shapes((1, 20, 7, 9), (24, 20, 1, 1)), {"kernel": "gemm"}),
}


def check_layer(spec, knobs, target=None, densities=(0.0, 0.4, 1.0), relu=True, clip=0.7, bias=True, residual=True,
                specials=True, gate=None, slope=None, algorithm="dense"):
    """Build ``algorithm`` with ``knobs`` and the epilogue asked for, run it on each density (NaN, Inf
    and -0.0 in x and the residual when ``specials``), compare with dense_conv2d in float64; a
    blocked y's channels past M are zeros, although every buffer was NaN before the run."""
    w = weight(spec)
    b = np.linspace(-1, 1, spec.out_channels).astype(np.float32) if bias else None
    layer = CompiledLayer(algorithm, spec, w, b, relu, target, knobs, residual=residual, clip=clip if relu else None,
                          gate=gate, slope=slope)
    rng = np.random.default_rng(11)
    for d in densities:
        x = activation(spec, d)
        res = rng.standard_normal(spec.y_shape).astype(np.float32) if residual else None
        if specials:
            x.flat[[1, 100]] = np.nan, np.inf
            x.flat[7] = -0.0
            if residual:
                res.flat[[3, 50]] = np.nan, -np.inf
        layer.poison()
        layer.set_input(x, res)
        layer.run()
        ref = dense_conv2d(spec, x, w, b, relu, residual=res, clip=clip if relu else None, gate=gate, slope=slope)
        assert_conv_close(layer.output(), ref, spec)
        raw = layer.buffers["y"].numpy()
        assert raw.shape == layout_shape(spec.y_shape, layer.layout_out)
        if layer.layout_out != NCHW:
            cb = channel_block(layer.layout_out)
            assert not raw[:, -1, ..., spec.out_channels - (raw.shape[1] - 1) * cb:].any()
    return layer


@pytest.mark.parametrize("lin,lout", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_every_layout_pair(name, lin, lout):
    """Each kernel reads and writes each layout, with the whole epilogue (bias, the residual in
    y's layout, ReLU, clip) on partial channel blocks."""
    spec, knobs = LAYERS[name]
    layer = check_layer(spec, {**knobs, "layout_in": lin, "layout_out": lout})
    assert (layer.layout_in, layer.layout_out) == (lin, lout)
    assert layer.buffers["x"].shape == layout_shape(spec.x_shape, lin)
    assert layer.buffers["res"].shape == layout_shape(spec.y_shape, lout)


@pytest.mark.parametrize("epilogue", [dict(bias=False, relu=False, residual=False),
                                      dict(bias=True, relu=False, residual=False),
                                      dict(bias=True, relu=True, clip=None, residual=False),
                                      dict(bias=False, relu=False, residual=True),
                                      dict(bias=True, relu=False, residual=True, gate="hard_sigmoid"),
                                      dict(bias=True, relu=False, residual=True, gate="sigmoid"),
                                      dict(bias=True, relu=True, clip=None, residual=True, slope=0.1)],
                         ids=["none", "bias", "bias-relu", "residual-no-activation", "hard-swish", "silu",
                              "leaky-relu"])
def test_each_epilogue_blocked(epilogue):
    spec, knobs = LAYERS["window-3x3-batch8"]
    check_layer(spec, {**knobs, "layout_in": BLOCKED, "layout_out": BLOCKED}, densities=(0.5,), **epilogue)


@pytest.mark.parametrize("isa,target,runs", [c[:3] for c in isa_cases()], ids=[c[0] for c in isa_cases()])
@pytest.mark.parametrize("name", ["window-3x3-batch8", "gemm"])
def test_other_isas(isa, target, runs, name):
    """The blocked kernels built for the other x86 ISAs, in blocks of their lanes."""
    spec, knobs = LAYERS[name]
    layout = lanes_layout(cpu_of(target))
    knobs = {**knobs, "layout_in": layout, "layout_out": layout}
    if not runs:
        CompiledLayer("dense", spec, weight(spec), target=target, knobs=knobs)
        pytest.skip(f"built for {isa} without running it: this host ({HOST.name}) has no {isa}")
    check_layer(spec, knobs, target, densities=(0.5,))


BLOCKED_KNOB_SETS = [
    {"kernel": "window", "block": 3, "m_tile": 8, "c_block": 3, "split": "row_outer"},
    {"kernel": "window", "block": 5, "m_tile": 64, "c_block": 7, "pad": "copy", "split": "row_band"},
]


@pytest.mark.slow  # a grid: the fast tier has test_every_layout_pair, the default run a covering sample
@pytest.mark.cover("case", "knobs", "lin", "lout")
@pytest.mark.parametrize("lin,lout", PAIRS[1:], ids=PAIR_IDS[1:])
@pytest.mark.parametrize("knobs", BLOCKED_KNOB_SETS, ids=["m8-cblock3-rowouter", "m64-cblock7-padcopy-rowband"])
@pytest.mark.parametrize("case", GRID, ids=grid_id)
def test_grid_all_densities(case, knobs, lin, lout):
    spec = grid_spec(case)
    check_layer(spec, {**knobs, "layout_in": lin, "layout_out": lout}, densities=DENSITIES)


@pytest.mark.parametrize("lin,lout", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("kernel,k", [("window", 3), ("gemm", 1)])
def test_three_vector_channel_tiles(kernel, k, lin, lout):
    """Tiles of 3 of the host's vectors of output channels (24 on AVX2, 48 on AVX-512), written
    as whole vectors: M = 3 vectors (the default tile, one exact M tile) and M = 5 vectors (a
    second tile 2/3 full), each layout pair, the whole epilogue, against NumPy float64. The
    default and the knob space offer them only where M is a multiple of 3 vectors."""
    from tvm_sparseconv.algorithms.dense import default_tiling

    t = 3 * HOST.lanes
    for m in (t, 5 * HOST.lanes):
        if kernel == "gemm" and lin == NCHW:
            continue  # gemm from NCHW holds pixels in vectors: its m_tile is not a channel vector
        spec = Conv2DSpec.from_shapes((2, 20, 5, 7), (m, 20, k, k), padding=k // 2)
        layer = check_layer(spec, {"kernel": kernel, "block": 4, "m_tile": t, "layout_in": lin, "layout_out": lout},
                            densities=(0.0, 0.5, 1.0))
        assert layer.knobs["m_tile"] == t
    if kernel == "gemm" and lin == NCHW:
        return
    spec = Conv2DSpec.from_shapes((1, 20, 5, 7), (t, 20, k, k), padding=k // 2)
    assert default_tiling(spec, HOST, kernel, lin)["m_tile"] == t
    assert any(c["m_tile"] == t and c["kernel"] == kernel for c in DENSE.knob_space(spec, HOST))
    wide = Conv2DSpec.from_shapes((1, 20, 5, 7), (2 * t, 20, k, k), padding=k // 2)
    assert default_tiling(wide, HOST, kernel, lin)["m_tile"] != t  # 2 vectors cover 6 vectors too
    four = Conv2DSpec.from_shapes((1, 20, 5, 7), (4 * HOST.lanes, 20, k, k), padding=k // 2)
    assert not any(c["m_tile"] == t for c in DENSE.knob_space(four, HOST))  # 3 vectors do not divide 4


GEMM_TAILS = [(NCHW, lout, tile) for lout in (NCHW, BLOCKED) for tile in ({"block": 16, "m_tile": 6},)] + \
    [(BLOCKED, lout, tile) for lout in (NCHW, BLOCKED)
     for tile in ({"block": 4, "m_tile": 64, "split": "row_band"}, {"block": 7, "m_tile": 8, "split": "m_outer"})]


@pytest.mark.slow
@pytest.mark.parametrize("lin,lout,tile", GEMM_TAILS, ids=[f"{a}-{b}-m{t['m_tile']}" for a, b, t in GEMM_TAILS])
def test_gemm_tails(lin, lout, tile):
    """P = 63 pixels (a short last pixel tile), M = 20; pixel vectors from NCHW (any m_tile up
    to 16), channel vectors from blocks (powers of two)."""
    spec = Conv2DSpec.from_shapes((2, 12, 7, 9), (20, 12, 1, 1))
    check_layer(spec, {"kernel": "gemm", **tile, "layout_in": lin, "layout_out": lout}, densities=DENSITIES)


@pytest.mark.parametrize("lout", (NCHW, BLOCKED))
@pytest.mark.parametrize("stride", [(2, 2), (1, 3), (3, 2)])
def test_strided_gemm_from_blocks(stride, lout):
    """A strided 1x1 layer (a projection shortcut) as a gemm over the flat output pixels, each
    reading its input pixel's block; odd H and W, M and C not multiples of a block; NCHW x is
    refused (a strided pixel is no vector of it)."""
    spec = Conv2DSpec.from_shapes((2, 12, 9, 11), (20, 12, 1, 1), stride=stride)
    check_layer(spec, {"kernel": "gemm", "block": 5, "m_tile": 8, "layout_in": BLOCKED, "layout_out": lout},
                densities=DENSITIES)
    with pytest.raises(KnobError, match="stride 1 from NCHW"):
        DENSE.stages(spec, Epilogue(), DENSE.knobs(spec, {"kernel": "gemm"}))
    kernels = {(k["kernel"], k["layout_in"]) for k in DENSE.knob_space(spec, HOST)}
    assert ("gemm", BLOCKED) in kernels and ("gemm", NCHW) not in kernels


def test_padded_copy_is_blocked_and_counted():
    spec = Conv2DSpec.from_shapes((2, 20, 5, 6), (16, 20, 3, 3), padding=(1, 2, 0, 1))
    layer = CompiledLayer("dense", spec, weight(spec), knobs={"pad": "copy", "layout_in": "nchw8c"})
    x = activation(spec, 0.5)
    layer(x)
    xp = layer.produced()["xp"]
    assert xp.shape == (2, 3, 6, 9, 8)
    np.testing.assert_array_equal(xp, to_layout(np.pad(x, ((0, 0), (0, 0), (1, 0), (2, 1))), "nchw8c"))
    assert layer.storage() == DENSE.reference_storage(spec, layer.knobs, x) == Storage(xp.size, 4 * xp.size)


def test_cache_blocks_hold_whole_channel_blocks():
    """From channel blocks, the window kernel's cache blocks (c_block) are rounded up to whole
    blocks of x, so that its channel loop walks blocks and lanes with no index division."""
    from tvm_sparseconv.algorithms.dense import make_tiling

    spec = Conv2DSpec.from_shapes((1, 20, 6, 6), (16, 20, 3, 3))
    for c_block, want in ((3, 8), (8, 8), (9, 16), (19, 20), (0, 20)):
        knobs = DENSE.knobs(spec, {"kernel": "window", "c_block": c_block, "layout_in": "nchw8c"})
        assert make_tiling(spec, knobs).c_block == want
    assert make_tiling(spec, DENSE.knobs(spec, {"kernel": "window", "c_block": 3})).c_block == 3  # NCHW: as given


@pytest.mark.parametrize("bad", [{"layout_in": "nhwc"}, {"layout_out": "nchw3c"}, {"layout_in": 16},
                                 {"kernel": "gemm", "layout_in": "nchw16c", "m_tile": 20},
                                 {"kernel": "gemm", "layout_in": "nchw16c", "block": 40}])
def test_bad_layout_knobs_are_refused(bad):
    spec = Conv2DSpec.from_shapes((1, 16, 6, 6), (16, 16, 1, 1))
    with pytest.raises(KnobError):
        DENSE.stages(spec, Epilogue(), DENSE.knobs(spec, bad))


def test_defaults_and_knob_space():
    """Both layouts default to NCHW (a plan without layout knobs reads as before); the gemm
    defaults from channel blocks fill 3/4 of the registers with channel vectors; the knob space
    holds every layout pair of both kernels, each a valid configuration."""
    spec = Conv2DSpec.from_shapes((1, 128, 28, 28), (256, 128, 1, 1))
    for target in ({"kind": "llvm", "mcpu": "skylake-avx512"}, {"kind": "llvm", "mcpu": "haswell"}):
        cpu = cpu_of(target)
        k = DENSE.knobs(spec, None, cpu)
        assert DENSE.layouts(spec, k) == (NCHW, NCHW)
        g = DENSE.knobs(spec, {"layout_in": lanes_layout(cpu)}, cpu)
        assert g["kernel"] == "gemm" and g["m_tile"] == 2 * cpu.lanes
        assert g["block"] * g["m_tile"] // cpu.lanes == cpu.registers * 3 // 4
        space = DENSE.knob_space(spec, cpu)
        pairs = {(k["kernel"], k["layout_in"], k["layout_out"]) for k in space}
        blocked = lanes_layout(cpu)
        assert pairs == {(kern, a, b) for kern in ("window", "gemm") for a in (NCHW, blocked) for b in (NCHW, blocked)}
