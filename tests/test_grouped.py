"""grouped: grouped and depthwise convs against the float64 NumPy reference (both kernels, tile
shapes, every epilogue, NaN/Inf, channel counts that leave partial vectors), built for the other
x86 ISAs, and in small models against onnxruntime with the tuner's and the rewrite's view of it.

Before each run the output is filled with NaN (CompiledLayer.poison), so an output element a
kernel leaves unwritten shows as a NaN where the reference has a number.
"""
import itertools

import numpy as np
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax

from tvm_sparseconv.algorithms import get_algorithm
from tvm_sparseconv.algorithms.grouped import shares_group
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.api import compile as tvms_compile
from tvm_sparseconv.compile import lower, resolve_plan
from tvm_sparseconv.conv import Conv2DSpec, UnsupportedConvError
from tvm_sparseconv.cpu import cpu_of
from tvm_sparseconv.frontend import load_model
from tvm_sparseconv.plan import Plan, PlanLayer
from tvm_sparseconv.reference import dense_conv2d

from conftest import AVX2_TARGET, AVX512_TARGET, HOST, SSE_TARGET, accepts, activation, assert_conv_close, \
    isa_cases, save_onnx, weight

GROUPED = get_algorithm("grouped")
VECTORS = ("channels", "width")

# the epilogues, as CompiledLayer / dense_conv2d arguments
EPILOGUES = {
    "bias": dict(bias=True),
    "relu": dict(relu=True),
    "bias-relu6": dict(bias=True, relu=True, clip=6.0),
    "residual": dict(residual=True),
    "bias-residual-relu6": dict(bias=True, residual=True, relu=True, clip=6.0),
    "residual-relu": dict(residual=True, relu=True),
}


def same_padding(size: int, extent: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME along one axis: Oh = ceil(H / S), the odd pixel of padding after."""
    total = max((-(-size // stride) - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def layer_spec(kind: str, c: int, hw: tuple[int, int], kernel: tuple[int, int], stride: int, batch: int = 1,
               padding=None) -> Conv2DSpec:
    """kind: "g2" (2 groups), "half" (C/2 groups of 2 channels), "dw" (depthwise), "dw2" (depthwise,
    channel multiplier 2), "g16" (C/16 groups of 16 channels: RegNet's, a whole number of vectors
    per group on every ISA), "g8x2" (C/8 groups of 8 input and 16 output channels); padding None:
    SAME."""
    groups, m = {"g2": (2, c), "half": (c // 2, c), "dw": (c, c), "dw2": (c, 2 * c), "g16": (c // 16, c),
                 "g8x2": (c // 8, 2 * c)}[kind]
    if padding is None:
        (pt, pb), (pl, pr) = (same_padding(s, k, stride) for s, k in zip(hw, kernel))
        padding = (pt, pl, pb, pr)
    return Conv2DSpec.from_shapes((batch, c, *hw), (m, c // groups, *kernel), stride, padding, 1, groups)


def nan_inf(spec: Conv2DSpec) -> np.ndarray:
    x = activation(spec, 0.5, seed=5)
    x[0, 0, 1, 1], x[0, -1, 2, 0], x[-1, 1, -1, -1] = np.nan, np.inf, -np.inf
    return x


def check(spec: Conv2DSpec, knobs=None, epilogue="bias-relu6", target=None, densities=(0.0, 0.5, 1.0)):
    """Build the layer and compare it with the reference on inputs of each density and one with
    NaN and +-Inf (finite weights: the NaN/Inf promise of docs/algorithms.md 0.3)."""
    ep = EPILOGUES[epilogue]
    w = weight(spec)
    bias = np.linspace(-1, 1, spec.out_channels).astype(np.float32) if ep.get("bias") else None
    layer = CompiledLayer(GROUPED.name, spec, w, bias, ep.get("relu", False), target=target, knobs=knobs,
                          residual=ep.get("residual", False), clip=ep.get("clip"))
    res = None
    if ep.get("residual"):
        res = np.random.default_rng(7).standard_normal(spec.y_shape).astype(np.float32)
        res.flat[[2, res.size // 2]] = np.nan, np.inf
    if target is not None and not _runs_here(target):
        return layer
    for x in [activation(spec, d, seed=i) for i, d in enumerate(densities)] + [nan_inf(spec)]:
        layer.poison()
        y = layer(x, res)
        ref = dense_conv2d(spec, x, w, bias, ep.get("relu", False), residual=res, clip=ep.get("clip"))
        unwritten = np.isnan(y) & ~np.isnan(ref)
        assert not unwritten.any(), f"{int(unwritten.sum())} output elements never written ({layer.knobs})"
        assert_conv_close(y, ref, spec)
    return layer


def _runs_here(target) -> bool:
    return next((runs for _, t, runs in isa_cases() if t == target), True)


# -- fast: one case of each kind, both kernels ----------------------------------------------------

FAST = [
    # depthwise, 19 channels (a partial vector on every ISA), SAME 3x3, ReLU6
    ("dw", 19, (9, 11), (3, 3), 1, 1, None, {"vector": "channels"}, "bias-relu6"),
    ("dw", 19, (9, 11), (3, 3), 1, 1, None, {"vector": "width"}, "residual"),
    # a channel multiplier, 5x5 stride 2, asymmetric padding, batch 2, the residual then ReLU6
    ("dw2", 19, (12, 13), (5, 5), 2, 2, (1, 0, 2, 1), {"vector": "channels"}, "bias-residual-relu6"),
    # groups of 2 channels, 3x5: tiles of 2 rows and tasks of 3 rows (both end in a tail)
    ("half", 38, (11, 10), (3, 5), 1, 1, None, {"vector": "channels", "tile_rows": 2, "rows": 3, "block": 4},
     "relu"),
    # two groups of 19, 1x1 stride 2
    ("g2", 38, (9, 9), (1, 1), 2, 1, None, {"vector": "width", "tile_rows": 2}, "bias"),
    # groups of 16 (each vector of outputs in one group: its input rows packed once, broadcast)
    ("g16", 48, (9, 11), (3, 3), 2, 2, None, {"vector": "channels"}, "bias-residual-relu6"),
    ("g8x2", 16, (10, 7), (5, 3), 1, 1, None, {"vector": "channels", "tile_rows": 2, "rows": 3}, "residual-relu"),
]


@pytest.mark.parametrize("kind,c,hw,kernel,stride,batch,padding,knobs,epilogue", FAST,
                         ids=[f"{k[0]}-c{k[1]}-k{k[3][0]}x{k[3][1]}-s{k[4]}-{k[7]['vector']}" for k in FAST])
def test_grouped_layer(kind, c, hw, kernel, stride, batch, padding, knobs, epilogue):
    check(layer_spec(kind, c, hw, kernel, stride, batch, padding), knobs, epilogue)


def test_refuses_what_it_does_not_compute():
    dense = Conv2DSpec.from_shapes((1, 8, 6, 6), (8, 8, 3, 3), 1, 1)
    assert not accepts("grouped", dense) and GROUPED.groups and GROUPED.fuses_residual
    with pytest.raises(UnsupportedConvError, match="groups=1"):
        CompiledLayer("grouped", dense, weight(dense))
    spec = layer_spec("dw", 8, (6, 6), (3, 3), 1)
    for bad, what in (({"vector": "rows"}, "vector"), ({"c_block": 0}, "c_block"), ({"tile_rows": 2.0}, "tile_rows"),
                      ({"block": 200}, "block")):
        with pytest.raises(ValueError, match=what):
            GROUPED.constants(spec, weight(spec), None, GROUPED.knobs(spec, bad))
    with pytest.raises(ValueError, match="no knob 'm_tile'"):
        GROUPED.knobs(spec, {"m_tile": 16})


@pytest.mark.parametrize("target", [AVX512_TARGET, AVX2_TARGET, SSE_TARGET], ids=["avx512", "avx2", "sse"])
def test_defaults_and_knob_space_follow_the_cpu(target):
    """The channel block is the target's lanes; the default kernel is width where the channels
    kernel would copy each input into the lanes of every output that reads it and a row fills a
    vector (docs/algorithms.md 15.4); no default or candidate register tile leaves the register
    band (docs/algorithms.md 13), and every candidate is a valid knob dict."""
    cpu = cpu_of(target)
    for kind, c, hw, k, s in (("dw", 144, (56, 56), (3, 3), 1), ("dw", 960, (7, 7), (5, 5), 1),
                              ("dw", 96, (112, 112), (3, 3), 2), ("half", 38, (11, 10), (3, 5), 1),
                              ("half", 64, (56, 56), (3, 3), 2), ("dw2", 32, (56, 56), (3, 3), 1),
                              ("g16", 64, (56, 56), (3, 3), 1)):
        spec = layer_spec(kind, c, hw, k, s)
        space = GROUPED.knob_space(spec, cpu)
        assert space[0] == GROUPED.knobs(spec, None, cpu) and space[0]["c_block"] == cpu.lanes
        copies = kind in ("half", "dw2")  # input channels shared by the lanes of several outputs
        assert space[0]["vector"] == ("width" if copies and spec.out_w >= cpu.lanes else "channels"), (kind, target)
        assert {d["vector"] for d in space} == {"channels", "width"}
        # no block spans groups where one vector of lanes would not (each input copied per lane)
        assert all(shares_group(spec, d["c_block"]) for d in space
                   if d["vector"] == "channels" and shares_group(spec, cpu.lanes)), (kind, target)
        if kind == "g16" and cpu.lanes == 16:
            assert {d["c_block"] for d in space if d["vector"] == "channels"} == {16}
        for d in space + [GROUPED.knobs(spec, {"vector": "width"}, cpu)]:
            tile = min(d["block"], spec.out_w) * min(d["tile_rows"], spec.out_h)
            vectors = tile * d["c_block"] // cpu.lanes if d["vector"] == "channels" else \
                -(-min(d["block"], spec.out_w) // cpu.lanes) * min(d["tile_rows"], spec.out_h)
            assert vectors <= cpu.registers * 3 // 4, (target, spec, d)


@pytest.mark.parametrize("isa,target,runs", [c[:3] for c in isa_cases()], ids=[c[0] for c in isa_cases()])
def test_other_isas(isa, target, runs):
    """Both kernels built for AVX2 (8 lanes) and SSE (4): the channel blocks, transposes and
    pixel vectors of another width; run when this host has the ISA."""
    spec = layer_spec("dw", 19, (9, 11), (5, 5), 1)
    for vector in VECTORS:
        layer = check(spec, {"vector": vector}, "bias-residual-relu6", target, densities=(0.5,))
        assert layer.knobs["c_block"] == cpu_of(target).lanes
    if not runs:
        pytest.skip(f"built for {isa} without running it: this host ({HOST.name}) has no {isa}")


# -- slow: the grid ---------------------------------------------------------------------------------

GRID_KINDS = [("g2", 38), ("half", 38), ("dw", 37), ("dw2", 19), ("g16", 32)]
GRID_KERNELS = [(1, 1), (3, 3), (5, 5), (3, 5)]
GRID_CASES = list(itertools.product(GRID_KINDS, GRID_KERNELS, (1, 2), VECTORS))


@pytest.mark.slow  # 80 builds: the default run a covering sample, the extended run all
@pytest.mark.cover("kind", "kernel", "stride", "vector")
@pytest.mark.parametrize("vector", VECTORS)
@pytest.mark.parametrize("stride", (1, 2), ids=lambda s: f"s{s}")
@pytest.mark.parametrize("kernel", GRID_KERNELS, ids=lambda k: f"k{k[0]}x{k[1]}")
@pytest.mark.parametrize("kind", GRID_KINDS, ids=lambda k: k[0])
def test_grid(kind, kernel, stride, vector):
    """groups 2, C/2, C/16 and C (multiplier 1 and 2) x 1x1, 3x3, 5x5, 3x5 x strides 1, 2 x both
    kernels, SAME padding on a 12 x 13 input (asymmetric at stride 2), the epilogues in turn."""
    epilogue = list(EPILOGUES)[GRID_CASES.index((kind, kernel, stride, vector)) % len(EPILOGUES)]
    check(layer_spec(kind[0], kind[1], (12, 13), kernel, stride), {"vector": vector}, epilogue)


@pytest.mark.slow
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("vector", VECTORS)
def test_batch8(vector, stride):
    check(layer_spec("dw", 37, (14, 14), (3, 3), stride, batch=8), {"vector": vector}, "bias-residual-relu6")


@pytest.mark.parametrize("stride", [(2, 2), (1, 3), (3, 2)], ids=lambda s: f"s{s[0]}x{s[1]}")
def test_width_kernel_phases(stride):
    """The width kernel's rows split by phase (docs/algorithms.md 15.2) at strides 2 and 3 along
    W, with a dilation of 2 (taps of one phase at stride 2), asymmetric padding (a phase whose
    first column is padding), a partial vector and a partial band."""
    spec = Conv2DSpec.from_shapes((2, 12, 13, 23), (12, 4, 3, 3), stride, (2, 1, 2, 3), 2, 3)
    check(spec, {"vector": "width", "block": 8, "tile_rows": 2, "rows": 3}, "bias-residual-relu6")


@pytest.mark.slow
@pytest.mark.extended  # about 100 s of builds; test_grid and test_conformance cover the kernels
def test_knob_space_sample():
    """The first 16 candidates of the knob space (the tuner's spread prefix) on one layer, each
    with a dilation, a partial vector of channels and a partial pixel tile."""
    spec = Conv2DSpec.from_shapes((1, 37, 13, 15), (37, 1, 3, 3), 1, (2, 1, 2, 3), 2, 37)
    for knobs in GROUPED.knob_space(spec)[:16]:
        check(spec, knobs, "bias-residual-relu6", densities=(0.5,))


# -- in a model ---------------------------------------------------------------------------------------

def depthwise_onnx(path) -> str:
    """x (1, 8, 10, 10) -> 1x1 8->16 + bias -> ReLU -> depthwise 3x3 + bias -> clip(0, 6) -> depthwise
    3x3 + its input (a residual add, no activation) -> depthwise 5x5 stride 2 x2 (SAME: pads
    1, 1, 2, 2) -> 1x1 32->8."""
    rng = np.random.default_rng(0)
    arrays = {"w1": (16, 8, 1, 1), "b1": (16,), "w2": (16, 1, 3, 3), "b2": (16,), "w3": (16, 1, 3, 3),
              "w4": (32, 1, 5, 5), "w5": (8, 32, 1, 1)}
    init = [numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype("float32"), n) for n, s in arrays.items()]
    init += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16),
             helper.make_node("Add", ["c3", "r2"], ["a3"]),
             helper.make_node("Conv", ["a3", "w4"], ["c4"], kernel_shape=[5, 5], pads=[1, 1, 2, 2], strides=[2, 2],
                              group=16),
             helper.make_node("Conv", ["c4", "w5"], ["y"], kernel_shape=[1, 1])]
    return save_onnx(path, "depthwise", nodes, [1, 8, 10, 10], [1, 8, 5, 5], init)


@pytest.fixture(scope="module")
def depthwise_model(tmp_path_factory):
    ort = pytest.importorskip("onnxruntime")
    path = depthwise_onnx(tmp_path_factory.mktemp("dw") / "dw.onnx")
    x = np.random.default_rng(3).standard_normal((1, 8, 10, 10)).astype(np.float32)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return load_model(path), x, want


def _ops(mod) -> set[str]:
    out = set()
    relax.analysis.post_order_visit(mod["main"].body, lambda e: out.add(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return out


@pytest.mark.slow  # a model build with TVM's conv2d
def test_algorithm_grouped_takes_the_grouped_layers(depthwise_model):
    """``algorithm="grouped"`` (compile --algorithm grouped) puts it on the three depthwise layers
    and the documented fallback (algorithms.dense_fallback: dense) on the 1x1 layers; the model
    matches onnxruntime."""
    m, x, want = depthwise_model
    plan = resolve_plan(m, None, "grouped", None)
    assert [l.algorithm for l in plan.layers] == ["dense", "grouped", "grouped", "grouped", "dense"]
    _, applied = lower(m, plan, None)
    assert list(applied.values()) == ["dense", "grouped", "grouped", "grouped", "dense"]
    vm = relax.VirtualMachine(tvms_compile(m, algorithm="grouped"), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), want, rtol=1e-4, atol=1e-4)


def test_grouped_and_dense_plan_fuses_clip_and_residual(depthwise_model):
    """dense on the 1x1 layers, grouped (both kernels) on the depthwise ones: every conv is
    rewritten, the clip and the residual add go into the grouped kernels' stores, and the
    model matches onnxruntime."""
    m, x, want = depthwise_model
    algos = ["dense", "grouped", "grouped", "grouped", "dense"]
    knobs = [{}, {"vector": "width"}, {"vector": "channels"}, {"vector": "channels"}, {}]
    plan = Plan([PlanLayer(s.key, s.spec.to_dict(), a, k) for s, a, k in zip(m.sites, algos, knobs)])
    lowered, applied = lower(m, plan, None)
    assert list(applied.values()) == algos
    assert not _ops(lowered) & {"relax.nn.conv2d", "relax.add", "relax.clip", "relax.minimum", "relax.maximum"}
    vm = relax.VirtualMachine(tvms_compile(m, plan=plan), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), want, rtol=1e-4, atol=1e-4)


def test_tuner_measures_it_on_the_grouped_layers(depthwise_model, tmp_path):
    """The tuner's candidates: grouped (its knob space) for each depthwise workload beside direct
    (MetaSchedule's, once there is a database), and not for the 1x1 layers."""
    from tvm_sparseconv.tune.tuner import TuneConfig, Tuner
    from tvm_sparseconv.tune.workloads import extract_workloads

    m, x, _ = depthwise_model
    tuner = Tuner(m, [x], str(tmp_path / "run"), config=TuneConfig(knob_trials=2))
    (tmp_path / "run" / "database").mkdir()
    workloads = extract_workloads(m.sites, [[np.zeros(s.spec.x_shape, np.float32)] for s in m.sites])
    for w in workloads:
        cands = dict(tuner.candidates(w))
        if w.spec.groups > 1:
            assert {"grouped", "direct"} <= set(cands) and not {"dense", "halo", "pixcsr"} & set(cands)
            assert cands["grouped"][0] == GROUPED.knobs(w.spec, None, tuner.target) and len(cands["grouped"]) > 1
        else:
            assert "grouped" not in cands and "dense" in cands
