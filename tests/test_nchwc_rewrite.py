"""Channel blocks between layers in a rewritten model: where RewriteConv2D puts the layout
transforms, the ops it computes blocked, plans with and without layout knobs; every output
against onnxruntime or NumPy float64."""
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax

import tvm_sparseconv
from tvm_sparseconv.compile import build, lower
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.frontend import load_model
from tvm_sparseconv.layout import NCHW, lanes_layout
from tvm_sparseconv.passes import LayerChoice, LayoutGraph, RewriteConv2D, layout_transforms
from tvm_sparseconv.plan import PLAN_VERSION, Plan, PlanError
from tvm_sparseconv.reference import dense_conv2d

from conftest import HOST, save_onnx

BLOCKED = lanes_layout(HOST)


def block_onnx(path):
    """x (1, 4, 10, 10) -> conv 3x3 + bias, ReLU -> conv 1x1 (20 channels: a partial block) ->
    y * sigmoid(y) -> max pool 3x3/2 -> conv 3x3 + bias and conv 1x1 (the shortcut) -> add ->
    ReLU -> global average pool -> flatten: the ops between convs of a ResNet / EfficientNet
    block."""
    rng = np.random.default_rng(0)
    shapes = {"w1": (20, 4, 3, 3), "b1": (20,), "w2": (20, 20, 1, 1), "w3": (24, 20, 3, 3), "b3": (24,),
              "w4": (24, 20, 1, 1)}
    init = [numpy_helper.from_array((0.3 * rng.standard_normal(s)).astype("float32"), n) for n, s in shapes.items()]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["c2"], ["s2"]),
             helper.make_node("Mul", ["c2", "s2"], ["m2"]),
             helper.make_node("MaxPool", ["m2"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Conv", ["p", "w4"], ["c4"], kernel_shape=[1, 1]),
             helper.make_node("Add", ["c3", "c4"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["y"])]
    return save_onnx(path, "block", nodes, [1, 4, 10, 10], [1, 24], init)


@pytest.fixture(scope="module")
def block_model(tmp_path_factory):
    path = block_onnx(tmp_path_factory.mktemp("nchwc") / "block.onnx")
    m = load_model(path)
    x = np.random.default_rng(1).standard_normal((1, 4, 10, 10)).astype(np.float32)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return m, x, ref


def plan_with(m, layouts: dict, algorithm: str = "dense") -> Plan:
    """Every layer on ``algorithm``; ``layouts``: {key: (layout_in, layout_out)} (others NCHW)."""
    plan = Plan.uniform(m.sites, algorithm)
    for l in plan.layers:
        if l.key in layouts:
            l.knobs = {"layout_in": layouts[l.key][0], "layout_out": layouts[l.key][1]}
    return plan


def run(b, x):
    out = b.vm()["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def test_blocked_between_every_layer_transforms_only_at_the_edges(block_model):
    """Every layer reads and writes blocks: the sigmoid, the multiply, the max pool and the
    global mean run on blocks too, the residual add is fused in its layout; the model's input is
    blocked once and the output unblocked once, before the flatten (an op that needs NCHW)."""
    m, x, ref = block_model
    keys = [s.key for s in m.sites]
    plan = plan_with(m, {k: (BLOCKED, BLOCKED) for k in keys})
    mod, applied = lower(m, plan, None)
    assert set(applied.values()) == {"dense"}
    moves = layout_transforms(mod)
    assert [t for _, _, t in moves] == [f"nchw->{BLOCKED}", f"{BLOCKED}->nchw"], moves
    assert moves[0][1] == f"{keys[0]}_x_{BLOCKED}"
    np.testing.assert_allclose(run(build(m, plan, None), x), ref, rtol=1e-4, atol=1e-5)


def test_a_leaky_relu_between_blocked_layers_keeps_the_blocks(tmp_path):
    """conv 3x3 -> LeakyRelu(0.1) -> conv 1x1 -> LeakyRelu (a YOLO-like block; 20 channels: a
    partial block): the LeakyRelus run on blocks, so the only transforms are at the edges, and
    NaN and negative inputs come out as onnxruntime's."""
    rng = np.random.default_rng(5)
    init = [numpy_helper.from_array((0.3 * rng.standard_normal(s)).astype("float32"), n)
            for n, s in (("w1", (20, 4, 3, 3)), ("b1", (20,)), ("w2", (20, 20, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("LeakyRelu", ["c1"], ["l1"], alpha=0.1),
             helper.make_node("Conv", ["l1", "w2"], ["c2"], kernel_shape=[1, 1]),
             helper.make_node("LeakyRelu", ["c2"], ["y"], alpha=0.1)]
    path = save_onnx(tmp_path / "leaky.onnx", "leaky", nodes, [1, 4, 10, 10], [1, 20, 10, 10], init)
    m = load_model(path)
    keys = [s.key for s in m.sites]
    plan = plan_with(m, {k: (BLOCKED, BLOCKED) for k in keys})
    mod, _ = lower(m, plan, None)
    assert [t for _, _, t in layout_transforms(mod)] == [f"nchw->{BLOCKED}", f"{BLOCKED}->nchw"]
    x = rng.standard_normal((1, 4, 10, 10)).astype(np.float32)
    x[0, 1, 4, 4] = np.nan
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y = run(build(m, plan, None), x)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def se_onnx(path):
    """x (1, 4, 10, 10) -> conv 3x3 + bias, ReLU (20 channels: a partial block) -> a
    squeeze-and-excitation block (global average pool, conv 1x1 20 -> 4, ReLU, conv 1x1 4 -> 20,
    sigmoid, multiply by the 1 x 20 x 1 x 1 scales) -> conv 1x1 (8 channels)."""
    rng = np.random.default_rng(3)
    shapes = {"w1": (20, 4, 3, 3), "b1": (20,), "ws": (4, 20, 1, 1), "we": (20, 4, 1, 1), "be": (20,),
              "w2": (8, 20, 1, 1)}
    init = [numpy_helper.from_array((0.5 * rng.standard_normal(s)).astype("float32"), n) for n, s in shapes.items()]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
             helper.make_node("Conv", ["g", "ws"], ["cs"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["cs"], ["rs"]),
             helper.make_node("Conv", ["rs", "we", "be"], ["ce"], kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["ce"], ["s"]),
             helper.make_node("Mul", ["r1", "s"], ["m"]),
             helper.make_node("Conv", ["m", "w2"], ["y"], kernel_shape=[1, 1])]
    return save_onnx(path, "se", nodes, [1, 4, 10, 10], [1, 8, 10, 10], init)


def test_a_squeeze_and_excitation_block_stays_in_blocks(tmp_path):
    """With every layer in blocks, the SE block's global mean (an adaptive pool of the blocks),
    its sigmoid and its multiply by per-channel scales (broadcast alike in blocks) run on blocks:
    the only transforms are the model's input and output. It matches onnxruntime."""
    path = se_onnx(tmp_path / "se.onnx")
    m = load_model(path)
    plan = plan_with(m, {s.key: (BLOCKED, BLOCKED) for s in m.sites})
    mod, _ = lower(m, plan, None)
    assert [t for _, _, t in layout_transforms(mod)] == [f"nchw->{BLOCKED}", f"{BLOCKED}->nchw"]
    graph = LayoutGraph(m.mod["main"], plan.choices(m.sites), m.sites)
    assert graph.transforms({s.key: (BLOCKED, BLOCKED) for s in m.sites}) == [
        ((1, 4, 10, 10), NCHW, BLOCKED), ((1, 8, 10, 10), BLOCKED, NCHW)]
    x = np.random.default_rng(4).standard_normal((1, 4, 10, 10)).astype(np.float32)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run(build(m, plan, None), x), ref, rtol=1e-4, atol=1e-5)


def fire_onnx(path):
    """x (1, 4, 10, 10) -> a SqueezeNet fire module (conv 1x1 4 -> 8 + ReLU, then conv 1x1 -> 16
    and conv 3x3 -> 32, each + ReLU, concatenated: 48 channels, whole blocks) -> max pool 3x3/2
    -> conv 1x1 -> 20 (a partial block) and conv 3x3 -> 16, concatenated -> conv 1x1 -> 8."""
    rng = np.random.default_rng(5)
    shapes = {"ws": (8, 4, 1, 1), "w1": (16, 8, 1, 1), "w3": (32, 8, 3, 3), "w4": (20, 48, 1, 1),
              "w5": (16, 48, 3, 3), "w6": (8, 36, 1, 1)}
    init = [numpy_helper.from_array((0.4 * rng.standard_normal(s)).astype("float32"), n) for n, s in shapes.items()]
    conv = lambda x, w, y, k: helper.make_node("Conv", [x, w], [y], kernel_shape=[k, k],  # noqa: E731
                                               pads=[k // 2] * 4)
    nodes = [conv("x", "ws", "cs", 1), helper.make_node("Relu", ["cs"], ["s"]),
             conv("s", "w1", "c1", 1), helper.make_node("Relu", ["c1"], ["e1"]),
             conv("s", "w3", "c3", 3), helper.make_node("Relu", ["c3"], ["e3"]),
             helper.make_node("Concat", ["e1", "e3"], ["f"], axis=1),
             helper.make_node("MaxPool", ["f"], ["p"], kernel_shape=[3, 3], strides=[2, 2]),
             conv("p", "w4", "c4", 1), conv("p", "w5", "c5", 3),
             helper.make_node("Concat", ["c4", "c5"], ["g"], axis=1),
             conv("g", "w6", "y", 1)]
    return save_onnx(path, "fire", nodes, [1, 4, 10, 10], [1, 8, 4, 4], init)


def test_a_concat_of_whole_blocks_stays_in_blocks(tmp_path):
    """With every layer in blocks, the fire module's concat (16 + 32 channels) runs on blocks, so
    the pool and the two convs after it read blocks with no transform; the second concat has a
    20-channel operand (a partial block, whose pad lanes would land inside the output), so its
    operands go back to NCHW and the last conv's input into blocks. LayoutGraph counts the
    same transforms. It matches onnxruntime."""
    path = fire_onnx(tmp_path / "fire.onnx")
    m = load_model(path)
    layouts = {s.key: (BLOCKED, BLOCKED) for s in m.sites}
    plan = plan_with(m, layouts)
    mod, _ = lower(m, plan, None)
    moves = layout_transforms(mod)
    assert [t for _, _, t in moves] == [f"nchw->{BLOCKED}", f"{BLOCKED}->nchw", f"{BLOCKED}->nchw",
                                        f"nchw->{BLOCKED}", f"{BLOCKED}->nchw"], moves
    k = [s.key for s in m.sites]
    assert [src for src, _, _ in moves[1:3]] == [f"{k[3]}_y_{BLOCKED}", f"{k[4]}_y_{BLOCKED}"]
    graph = LayoutGraph(m.mod["main"], plan.choices(m.sites), m.sites)
    assert graph.transforms(layouts) == [((1, 4, 10, 10), NCHW, BLOCKED), ((1, 20, 4, 4), BLOCKED, NCHW),
                                         ((1, 16, 4, 4), BLOCKED, NCHW), ((1, 36, 4, 4), NCHW, BLOCKED),
                                         ((1, 8, 4, 4), BLOCKED, NCHW)]
    x = np.random.default_rng(6).standard_normal((1, 4, 10, 10)).astype(np.float32)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run(build(m, plan, None), x), ref, rtol=1e-4, atol=1e-5)


def upsample_onnx(path, mode: str):
    """x (1, 4, 10, 10) -> conv 3x3 -> 16 + LeakyRelu (y) -> conv 3x3 / 2 -> 16 -> conv 1x1 -> 16
    -> Resize x2 (``mode``: "nearest", as YOLO's upsample, or "linear") concatenated with y (32
    channels) -> conv 3x3 -> 8: a YOLO / FPN neck."""
    rng = np.random.default_rng(7)
    shapes = {"w1": (16, 4, 3, 3), "w2": (16, 16, 3, 3), "w3": (16, 16, 1, 1), "w4": (8, 32, 3, 3)}
    init = [numpy_helper.from_array((0.4 * rng.standard_normal(s)).astype("float32"), n) for n, s in shapes.items()]
    init.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("LeakyRelu", ["c1"], ["y1"], alpha=0.1),
             helper.make_node("Conv", ["y1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Conv", ["c2", "w3"], ["c3"], kernel_shape=[1, 1]),
             helper.make_node("Resize", ["c3", "", "scales"], ["u"], mode=mode,
                              coordinate_transformation_mode="asymmetric" if mode == "nearest" else "half_pixel",
                              nearest_mode="floor"),
             helper.make_node("Concat", ["u", "y1"], ["cat"], axis=1),
             helper.make_node("Conv", ["cat", "w4"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    return save_onnx(path, "upsample", nodes, [1, 4, 10, 10], [1, 8, 10, 10], init)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_a_nearest_upsample_stays_in_blocks_a_bilinear_one_reads_nchw(tmp_path, mode):
    """With every layer in blocks, a nearest-neighbour resize runs on blocks (a block's lanes
    move together), and so does the concat after it: the only transforms are the model's
    input and output. A bilinear one reads NCHW (passes/separable_resize.py computes it there),
    so transforms stand around it. LayoutGraph counts what the rewrite inserts; the output,
    NaN and negatives included, is onnxruntime's."""
    path = upsample_onnx(tmp_path / "up.onnx", mode)
    m = load_model(path)
    layouts = {s.key: (BLOCKED, BLOCKED) for s in m.sites}
    plan = plan_with(m, layouts)
    mod, _ = lower(m, plan, None)
    moves = [t for _, _, t in layout_transforms(mod)]
    graph = LayoutGraph(m.mod["main"], plan.choices(m.sites), m.sites)
    assert [f"{a}->{b}" for _, a, b in graph.transforms(layouts)] == moves
    if mode == "nearest":
        assert moves == [f"nchw->{BLOCKED}", f"{BLOCKED}->nchw"]
    else:
        assert len(moves) > 2
    x = np.random.default_rng(8).standard_normal((1, 4, 10, 10)).astype(np.float32)
    x[0, 2, 3, 3] = np.nan
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y = run(build(m, plan, None), x)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    # outputs up to ~60 from 288-term float32 sums: an absolute error of the output's scale
    # (another summation order left 3e-5 on an element of 0.05)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.nanmax(np.abs(ref)))))


def dense_block_onnx(path):
    """x (1, 4, 28, 28) -> conv 3x3 -> 64 + ReLU -> a DenseNet layer (BatchNormalization, ReLU,
    conv 1x1 -> 32, ReLU, conv 3x3 -> 64) concatenated with its input (128 channels) ->
    BatchNormalization, ReLU -> conv 1x1 -> 8: batch norms no conv before them can fold. 28 x 28:
    LLVM miscompiled a concat of blocks fused with the per-channel ops after it at that size."""
    rng = np.random.default_rng(7)
    arrays = {"w0": (0.4 * rng.standard_normal((64, 4, 3, 3))), "w1": (0.2 * rng.standard_normal((32, 64, 1, 1))),
              "w2": (0.2 * rng.standard_normal((64, 32, 3, 3))), "w3": (0.2 * rng.standard_normal((8, 128, 1, 1)))}
    for name, c in (("n1", 64), ("n2", 128)):
        arrays.update({f"{name}_g": rng.uniform(0.5, 1.5, c), f"{name}_b": rng.standard_normal(c),
                       f"{name}_m": rng.standard_normal(c), f"{name}_v": rng.uniform(0.2, 2.0, c)})
    init = [numpy_helper.from_array(v.astype("float32"), n) for n, v in arrays.items()]
    bn = lambda x, n, y: helper.make_node(  # noqa: E731
        "BatchNormalization", [x, f"{n}_g", f"{n}_b", f"{n}_m", f"{n}_v"], [y], epsilon=1e-3)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             bn("r0", "n1", "b1"), helper.make_node("Relu", ["b1"], ["a1"]),
             helper.make_node("Conv", ["a1", "w1"], ["c1"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c1"], ["a2"]),
             helper.make_node("Conv", ["a2", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["r0", "c2"], ["cat"], axis=1),
             bn("cat", "n2", "b2"), helper.make_node("Relu", ["b2"], ["a3"]),
             helper.make_node("Conv", ["a3", "w3"], ["y"], kernel_shape=[1, 1])]
    return save_onnx(path, "dense_block", nodes, [1, 4, 28, 28], [1, 8, 28, 28], init)


def test_a_dense_block_with_batch_norms_stays_in_blocks(tmp_path):
    """With every layer in blocks, the batch norms (a multiply and an add by per-channel
    constants, passes/batch_norm_as_affine.py, their constants blocked) and the concat run on
    blocks: the only transforms are the model's input and output. It matches onnxruntime."""
    path = dense_block_onnx(tmp_path / "dense_block.onnx")
    m = load_model(path)
    layouts = {s.key: (BLOCKED, BLOCKED) for s in m.sites}
    plan = plan_with(m, layouts)
    mod, _ = lower(m, plan, None)
    assert [t for _, _, t in layout_transforms(mod)] == [f"nchw->{BLOCKED}", f"{BLOCKED}->nchw"]
    assert LayoutGraph(m.mod["main"], plan.choices(m.sites), m.sites).transforms(layouts) == [
        ((1, 4, 28, 28), NCHW, BLOCKED), ((1, 8, 28, 28), BLOCKED, NCHW)]
    x = np.random.default_rng(8).standard_normal((1, 4, 28, 28)).astype(np.float32)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run(build(m, plan, None), x), ref, rtol=1e-4, atol=1e-5)


def test_layouts_that_do_not_chain_get_transforms(block_model):
    """A plan whose layouts do not chain is not refused: each reader in another layout than its
    producer wrote gets a transform (conv001 writes NCHW, the pool's readers read blocks: one
    transform of the pool's output, shared by both)."""
    m, x, ref = block_model
    k0, k1, k2, k3 = (s.key for s in m.sites)
    plan = plan_with(m, {k0: (NCHW, BLOCKED), k1: (NCHW, NCHW), k2: (BLOCKED, BLOCKED), k3: (BLOCKED, BLOCKED)})
    mod, _ = lower(m, plan, None)
    moves = layout_transforms(mod)
    assert [t for _, _, t in moves] == [f"{BLOCKED}->nchw", f"nchw->{BLOCKED}", f"{BLOCKED}->nchw"], moves
    assert moves[0][0] == f"{k0}_y_{BLOCKED}"  # conv000 wrote blocks, conv001 reads NCHW
    # conv003 (the shortcut) reads it first: conv002 is emitted where the add it fuses was
    assert moves[1][1] == f"{k3}_x_{BLOCKED}"
    np.testing.assert_allclose(run(build(m, plan, None), x), ref, rtol=1e-4, atol=1e-5)


def test_nchw_neighbours_and_a_direct_layer(block_model):
    """conv002 left to TVM's conv2d (NCHW) between blocked layers: its input unblocked, its
    output blocked for conv003, which fuses the add with it as the residual."""
    m, x, ref = block_model
    k0, k1, k2, k3 = (s.key for s in m.sites)
    plan = plan_with(m, {k0: (BLOCKED, BLOCKED), k1: (BLOCKED, BLOCKED), k3: (BLOCKED, BLOCKED)})
    plan.layers[2].algorithm, plan.layers[2].knobs = "direct", {}
    mod, applied = lower(m, plan, None)
    assert applied[k2] == "direct" and applied[k3] == "dense"
    moves = [t for _, _, t in layout_transforms(mod)]
    assert moves == [f"nchw->{BLOCKED}", f"{BLOCKED}->nchw", f"nchw->{BLOCKED}", f"{BLOCKED}->nchw"], moves
    np.testing.assert_allclose(run(build(m, plan, None), x), ref, rtol=1e-4, atol=1e-5)


def test_nchw_plan_has_no_transform(block_model):
    m, x, ref = block_model
    mod, _ = lower(m, Plan.uniform(m.sites, "dense"), None)
    assert layout_transforms(mod) == []


def nhwc_module():
    """x NHWC -> conv 3x3 (HWIO) + ReLU -> conv 1x1 (HWIO) + ReLU, 12 -> 20 -> 20 channels."""
    rng = np.random.default_rng(2)
    w1 = (0.3 * rng.standard_normal((20, 12, 3, 3))).astype("float32")
    w2 = (0.3 * rng.standard_normal((20, 20, 1, 1))).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 7, 9, 12), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, relax.const(w1.transpose(2, 3, 1, 0)), padding=1, data_layout="NHWC",
                                           kernel_layout="HWIO"))
            r = bb.emit(relax.op.nn.relu(c))
            c2 = bb.emit(relax.op.nn.conv2d(r, relax.const(w2.transpose(2, 3, 1, 0)), data_layout="NHWC",
                                            kernel_layout="HWIO"))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(c2)))
        bb.emit_func_output(out)
    return bb.get(), w1, w2


def test_nhwc_model_keeps_blocks_between_its_layers():
    mod, w1, w2 = nhwc_module()
    choices = {"conv000": LayerChoice("dense", {"layout_in": NCHW, "layout_out": BLOCKED}),
               "conv001": LayerChoice("dense", {"layout_in": BLOCKED, "layout_out": NCHW})}
    target = tvm.target.Target({"kind": "llvm"})
    with target:
        out = RewriteConv2D(choices, target)(mod)
    assert layout_transforms(out) == []  # conv000 writes blocks, conv001 reads them
    x = np.random.default_rng(3).standard_normal((2, 7, 9, 12)).astype(np.float32)
    ex = tvm.compile(out, target=target)
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    xc = x.transpose(0, 3, 1, 2)
    h = dense_conv2d(Conv2DSpec.from_shapes(xc.shape, w1.shape, padding=1), xc, w1, relu=True)
    ref = dense_conv2d(Conv2DSpec.from_shapes(h.shape, w2.shape), h, w2, relu=True).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_plan_versions_and_layouts(block_model, tmp_path):
    """A version-1 plan (no layout knobs) loads with every layer in NCHW; plans are written as
    version 2 and their layouts read back; an unknown version is refused."""
    m, _, _ = block_model
    plan = plan_with(m, {"conv001": (BLOCKED, BLOCKED)})
    plan.save(str(tmp_path / "p.json"))
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["version"] == PLAN_VERSION == 2
    assert Plan.load(str(tmp_path / "p.json")).layouts()["conv001"] == (BLOCKED, BLOCKED)
    old = dict(Plan.uniform(m.sites, "dense").to_dict(), version=1)
    assert set(Plan.from_dict(old).layouts().values()) == {(NCHW, NCHW)}
    with pytest.raises(PlanError, match="reads versions 1, 2"):
        Plan.from_dict(dict(old, version=3))


def rewritten_transforms(m, choices) -> list[str]:
    """The transforms RewriteConv2D puts into ``m`` for ``choices``, as "src->dst", sorted."""
    with tvm.target.Target({"kind": "llvm"}) as target:
        mod = RewriteConv2D(choices, target, sites=m.sites)(m.mod)
    return sorted(t for _, _, t in layout_transforms(mod))


def random_layouts(m, rng) -> dict:
    pairs = [(a, b) for a in (NCHW, BLOCKED) for b in (NCHW, BLOCKED)]
    return {s.key: pairs[rng.integers(4)] for s in m.sites}


def check_graph_counts_what_the_rewrite_inserts(m, algorithms: dict, assignments):
    """LayoutGraph (what the tuner weighs) against the transforms RewriteConv2D inserts."""
    for layouts in assignments:
        choices = {k: LayerChoice(algorithms.get(k, "dense"), {"layout_in": i, "layout_out": o} if
                                  algorithms.get(k, "dense") == "dense" else {}) for k, (i, o) in layouts.items()}
        graph = LayoutGraph(m.mod["main"], choices, m.sites)
        used = {k: v for k, v in layouts.items() if choices[k].algorithm == "dense"}
        counted = sorted(f"{src}->{dst}" for _, src, dst in graph.transforms(used))
        assert counted == rewritten_transforms(m, choices), layouts


def test_layout_graph_counts_what_the_rewrite_inserts(block_model):
    m, _, _ = block_model
    rng = np.random.default_rng(5)
    check_graph_counts_what_the_rewrite_inserts(m, {}, [random_layouts(m, rng) for _ in range(3)])
    # a layer on TVM's conv2d in the middle: it reads and writes NCHW, and fuses no residual
    check_graph_counts_what_the_rewrite_inserts(m, {"conv002": "direct"}, [random_layouts(m, rng)])


@pytest.mark.slow
def test_layout_graph_on_resnet50():
    """Random layouts over ResNet-50-half with its shipped mix of dense and hybrid layers (hybrid
    reads and writes NCHW): the graph counts what the rewrite inserts."""
    from tvm_sparseconv.models import model_path

    m = load_model(model_path("resnet50-nsfw"))
    plan = Plan.load(os.path.join(os.path.dirname(tvm_sparseconv.__file__), "shipped", "llvm-znver5-2c",
                                  "resnet50-nsfw", "plan.json"))
    algorithms = {l.key: l.algorithm for l in plan.layers}
    assert "hybrid" in algorithms.values()
    rng = np.random.default_rng(6)
    check_graph_counts_what_the_rewrite_inserts(m, algorithms, [random_layouts(m, rng) for _ in range(3)])
