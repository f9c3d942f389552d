"""Peers that fail softly, and the PyTorch peer's ONNX interpreter (onnx_torch) against onnxruntime.

Every op of onnx_torch runs on a tiny graph built with onnx.helper, in its attribute and opset
variants, and must match onnxruntime; a variant torch has no equivalent for is refused by name.
A model with an op the interpreter refuses (Softsign) still benches: the PyTorch row says why it was
skipped, every other row has its times."""
import contextlib
import io
import json
import stat

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tvm_sparseconv import bench
from tvm_sparseconv.cli import main
from tvm_sparseconv.cli.tables import print_layer_table
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.frontend import load_model
from tvm_sparseconv.layer import measure_peer, run_layer
from tvm_sparseconv.onnx_torch import OnnxTorch
from tvm_sparseconv.peers import PeerError, available_peers

ort = pytest.importorskip("onnxruntime")

N = helper.make_node
F32 = np.float32
SHAPE = (1, 3, 8, 10)


def save_graph(path, nodes, x_shape, consts=None, opset=13, y_shape=None) -> str:
    """x (float32, ``x_shape``) -> ``nodes`` -> y, with ``consts`` (name: array) as initializers."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (consts or {}).items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=9), str(path))
    return str(path)


def both(path, x):
    """(onnxruntime's output, OnnxTorch's output) of the model at ``path`` on ``x``."""
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return ref, OnnxTorch(path)(torch.from_numpy(x)).numpy()


def case(name, nodes, consts=None, opset=13, shape=SHAPE):
    return pytest.param(nodes, consts, opset, shape, id=name)


def y(op, *inputs, **attrs):
    """A node computing the graph's output ``y``."""
    return N(op, list(inputs), ["y"], **attrs)


def a(*v, dtype=np.int64):
    return np.array(v, dtype)


def resize(opset=13, sizes=None, scales=None, **attrs):
    """A Resize node and its constants, inputs laid out as the opset has them (11: roi and
    scales always present, empty when unused; 13+: unused ones unnamed)."""
    consts, names = {}, ["x"]
    for name, v, dtype in (("roi", None, F32), ("scales", scales, F32), ("sizes", sizes, np.int64)):
        if v is not None or (opset == 11 and name != "sizes"):
            consts[name] = np.array(v if v is not None else [], dtype)
            names.append(name)
        else:
            names.append("")
    while names[-1] == "":
        names.pop()
    return [y("Resize", *names, **attrs)], consts, opset


POS = {"c": np.abs(np.random.default_rng(2).standard_normal((1, 3, 8, 1))).astype(F32) + 0.5}
BN = {"s": a(0.5, 1.0, 2.0, dtype=F32), "b": a(0.1, -0.2, 0.3, dtype=F32), "m": a(0.0, 1.0, -1.0, dtype=F32),
      "v": a(1.0, 0.5, 2.0, dtype=F32)}

CASES = [
    # elementwise, activations
    case("Relu", [y("Relu", "x")]),
    case("Sigmoid", [y("Sigmoid", "x")]),
    case("HardSigmoid", [y("HardSigmoid", "x")]),
    case("HardSigmoid-alpha-beta", [y("HardSigmoid", "x", alpha=1 / 6, beta=0.5)]),
    case("HardSwish", [y("HardSwish", "x")], opset=14),
    case("Clip-inputs", [y("Clip", "x", "lo", "hi")], {"lo": F32(-1), "hi": F32(2)}),
    case("Clip-max-only", [y("Clip", "x", "", "hi")], {"hi": F32(0.5)}),
    case("Clip-unbounded", [y("Clip", "x")]),
    case("Clip-relu6-opset11", [y("Clip", "x", "lo", "hi")], {"lo": F32(0), "hi": F32(6)}, opset=11),
    case("Clip-attributes-opset6", [y("Clip", "x", min=0.0, max=6.0)], opset=6),
    case("Add-channel", [y("Add", "x", "c")], {"c": np.arange(3, dtype=F32).reshape(3, 1, 1)}),
    case("Add-self", [y("Add", "x", "x")]),
    case("Sub-row", [y("Sub", "x", "c")], {"c": np.arange(10, dtype=F32)}),
    case("Mul-scalar", [y("Mul", "c", "x")], {"c": F32(-1.5)}),
    case("Div-broadcast", [y("Div", "x", "c")], POS),
    case("Identity", [y("Identity", "x")]),
    case("Constant-tensor", [N("Constant", [], ["c"], value=numpy_helper.from_array(np.full((3, 1, 1), 2, F32))),
                             y("Mul", "x", "c")]),
    case("Constant-floats", [N("Constant", [], ["c"], value_floats=[0.5] * 10), y("Add", "x", "c")]),
    case("Dropout-opset13", [N("Dropout", ["x", "r"], ["y", "mask"])], {"r": F32(0.5)}),
    case("Dropout-opset10", [N("Dropout", ["x"], ["y"], ratio=0.3)], opset=10),
    case("Elu", [y("Elu", "x", alpha=0.5)]),
    case("Softplus", [y("Softplus", "x")]),
    case("PRelu-channel", [y("PRelu", "x", "s")], {"s": a(0.1, -0.2, 0.3, dtype=F32).reshape(3, 1, 1)}),
    case("PRelu-scalar", [y("PRelu", "x", "s")], {"s": a(0.25, dtype=F32)}),
    case("Exp", [y("Exp", "x")]),
    case("Erf", [y("Erf", "x")]),
    case("Log-Abs", [N("Abs", ["x"], ["b"]), y("Log", "b")]),
    case("Sqrt-Abs", [N("Abs", ["x"], ["b"]), y("Sqrt", "b")]),
    case("Neg", [y("Neg", "x")]),
    case("Pow-0.75", [N("Abs", ["x"], ["b"]), y("Pow", "b", "e")], {"e": F32(0.75)}),
    case("Pow-integer", [y("Pow", "x", "e")], {"e": F32(3.0)}),
    case("Softmax", [y("Softmax", "x")]),
    case("Softmax-axis1", [y("Softmax", "x", axis=1)]),
    case("Softmax-opset11-default", [y("Softmax", "x")], opset=11),  # over C*H*W at once
    case("Softmax-opset11-axis2", [y("Softmax", "x", axis=2)], opset=11),
    # shapes
    case("Concat-channels", [y("Concat", "x", "c", axis=1)], {"c": np.ones((1, 2, 8, 10), F32)}),
    case("Concat-last", [y("Concat", "x", "x", axis=-1)]),
    case("Flatten", [y("Flatten", "x")]),
    case("Flatten-axis0", [y("Flatten", "x", axis=0)]),
    case("Flatten-axis-1", [y("Flatten", "x", axis=-1)]),
    case("Reshape-zero-copy", [y("Reshape", "x", "s")], {"s": a(0, -1)}),
    case("Reshape", [y("Reshape", "x", "s")], {"s": a(1, 3, 2, 40)}),
    case("Reshape-to-Shape", [N("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]), N("Shape", ["x"], ["s"]),
                              y("Reshape", "t", "s")]),
    case("Shape-start-end", [N("Shape", ["x"], ["s"], start=1, end=-1), N("Concat", ["s", "t"], ["s2"], axis=0),
                             y("Reshape", "x", "s2")], {"t": a(-1, 1)}, opset=15),
    case("Transpose", [y("Transpose", "x", perm=[0, 2, 3, 1])]),
    case("Transpose-default", [y("Transpose", "x")]),
    case("Squeeze-attr", [y("Squeeze", "x", axes=[0, 2])], opset=11, shape=(1, 3, 1, 10)),
    case("Squeeze-input", [y("Squeeze", "x", "ax")], {"ax": a(-2)}, shape=(1, 3, 1, 10)),
    case("Squeeze-all", [y("Squeeze", "x")], shape=(1, 3, 1, 10)),
    case("Unsqueeze-attr", [y("Unsqueeze", "x", axes=[0, -1])], opset=11),
    case("Unsqueeze-input", [y("Unsqueeze", "x", "ax")], {"ax": a(1, -1)}),
    case("ReduceMean-hw", [y("ReduceMean", "x", axes=[2, 3])]),
    case("ReduceMean-c-nokeep", [y("ReduceMean", "x", axes=[1], keepdims=0)]),
    case("ReduceMean-all", [y("ReduceMean", "x")]),
    case("ReduceMean-opset18", [y("ReduceMean", "x", "ax", keepdims=0)], {"ax": a(-1)}, opset=18),
    case("ReduceSum-attr-opset11", [y("ReduceSum", "x", axes=[1])], opset=11),
    case("ReduceSum-input-nokeep", [y("ReduceSum", "x", "ax", keepdims=0)], {"ax": a(1, -1)}),
    case("ReduceSum-empty-noop", [y("ReduceSum", "x", "ax", noop_with_empty_axes=1)], {"ax": a()}),
    case("ReduceMax-hw", [y("ReduceMax", "x", axes=[2, 3])]),
    case("ReduceMin-all-opset18", [y("ReduceMin", "x", keepdims=0)], opset=18),
    case("Pad-value", [y("Pad", "x", "p", "v")], {"p": a(0, 0, 1, 2, 0, 0, 3, 0), "v": F32(1.5)}),
    case("Pad-zero-opset11", [y("Pad", "x", "p")], {"p": a(0, 1, 1, 1, 0, 0, 2, 2)}, opset=11),
    case("Pad-crop", [y("Pad", "x", "p")], {"p": a(0, 0, -1, 1, 0, 0, 1, -2)}),
    case("Pad-attr-opset2", [y("Pad", "x", pads=[0, 0, 2, 1, 0, 0, 0, 1], value=-1.0)], opset=2),
    case("Pad-axes-opset18", [y("Pad", "x", "p", "", "ax")], {"p": a(1, 2, 3, 4), "ax": a(-1, 2)}, opset=18),
    case("Pad-reflect", [y("Pad", "x", "p", mode="reflect")], {"p": a(0, 0, 1, 2, 0, 0, 3, 1)}),
    case("Pad-edge-axes-opset18", [y("Pad", "x", "p", "", "ax", mode="edge")], {"p": a(2, 0, 1, 3), "ax": a(2, 3)},
         opset=18),
    case("Gather-scalar-index", [N("Shape", ["x"], ["s"]), N("Gather", ["s", "i"], ["d"]), N("Cast", ["d"], ["f"], to=1),
                                 y("Mul", "x", "f")], {"i": np.array(-1, np.int64)}),
    case("Gather-axis1", [y("Gather", "x", "i", axis=1)], {"i": a([2, 0], [-1, 1])}),
    case("ConstantOfShape-Cast", [N("Shape", ["x"], ["s"]), N("ConstantOfShape", ["s"], ["z"],
                                   value=numpy_helper.from_array(np.array([3], np.int64))),
                                  N("Cast", ["z"], ["f"], to=1), y("Add", "x", "f")]),
    case("ConstantOfShape-default", [N("Shape", ["x"], ["s"]), N("ConstantOfShape", ["s"], ["z"]),
                                     y("Sub", "x", "z")]),
    # Split: sizes as an input, an attribute, equal parts by outputs or num_outputs (the last part
    # smaller); the parts joined again in another order, so that a wrong size or order shows
    case("Split-input", [N("Split", ["x", "s"], ["p0", "p1", "p2"], axis=1), y("Concat", "p2", "p0", "p1", axis=1)],
         {"s": a(1, 2, 3)}, shape=(1, 6, 4, 5)),
    case("Split-equal", [N("Split", ["x"], ["p0", "p1", "p2"], axis=1), y("Concat", "p1", "p2", "p0", axis=1)],
         shape=(1, 6, 4, 5)),
    case("Split-attr-opset11", [N("Split", ["x"], ["p0", "p1"], axis=-1, split=[3, 7]),
                                y("Concat", "p1", "p0", axis=-1)], opset=11),
    case("Split-num-outputs-opset18", [N("Split", ["x"], ["p0", "p1", "p2", "p3"], axis=1, num_outputs=4),
                                       y("Concat", "p3", "p1", "p0", "p2", axis=1)], opset=18, shape=(1, 7, 3, 2)),
    case("Slice-steps-clamped", [y("Slice", "x", "b", "e", "ax", "st")],
         {"b": a(-7, 1), "e": a(2**62, -1), "ax": a(3, 1), "st": a(2, 1)}),
    case("Slice-negative-steps", [y("Slice", "x", "b", "e", "ax", "st")],
         {"b": a(-1, 100, 6), "e": a(-2**62, 0, 1), "ax": a(3, 2, 1), "st": a(-1, -3, -2)}, shape=(1, 8, 8, 10)),
    case("Slice-reflect-pad-as-exported", [N("Slice", ["x", "b", "e", "ax", "st"], ["r"]),
                                           y("Concat", "r", "x", axis=3)],
         {"b": a(3), "e": a(0), "ax": a(-1), "st": a(-1)}),
    case("Slice-no-axes", [y("Slice", "x", "b", "e")], {"b": a(0, 1, 2, -3), "e": a(1, 3, 7, 10)}),
    case("Slice-attr-opset9", [y("Slice", "x", starts=[1, -12], ends=[-1, 4], axes=[2, 3])], opset=9),
    case("DepthToSpace-DCR", [y("DepthToSpace", "x", blocksize=2)], shape=(1, 8, 3, 4)),
    case("DepthToSpace-CRD", [y("DepthToSpace", "x", blocksize=2, mode="CRD")], shape=(1, 12, 3, 2)),
    case("LayerNormalization-last", [y("LayerNormalization", "x", "s", "b", epsilon=1e-3)],
         {"s": np.linspace(0.5, 2, 10, dtype=F32), "b": np.linspace(-1, 1, 10, dtype=F32)}, opset=17),
    case("LayerNormalization-chw-no-bias", [y("LayerNormalization", "x", "s", axis=1)],
         {"s": np.linspace(0.5, 2, 240, dtype=F32).reshape(3, 8, 10)}, opset=17),
    # dense
    case("BatchNormalization", [y("BatchNormalization", "x", "s", "b", "m", "v", epsilon=1e-3)], BN),
    case("InstanceNormalization", [y("InstanceNormalization", "x", "s", "b", epsilon=1e-3)],
         {"s": BN["s"], "b": BN["b"]}),
    case("LRN", [y("LRN", "x", size=3, alpha=1e-2, beta=0.75, bias=2.0)], shape=(1, 6, 5, 4)),
    case("LRN-defaults", [y("LRN", "x", size=5)], shape=(1, 7, 3, 3)),
    case("Gemm-transB-C", [y("Gemm", "x", "w", "c", transB=1, alpha=0.5, beta=2.0)],
         {"w": np.linspace(-1, 1, 24, dtype=F32).reshape(4, 6), "c": np.arange(4, dtype=F32)}, shape=(2, 6)),
    case("Gemm-transA", [y("Gemm", "x", "w", transA=1)], {"w": np.linspace(-1, 1, 8, dtype=F32).reshape(2, 4)},
         shape=(2, 6)),
    case("MatMul-batched", [y("MatMul", "x", "w")], {"w": np.linspace(-1, 1, 20, dtype=F32).reshape(4, 5)},
         shape=(2, 3, 4)),
    case("Conv-asym-groups-dilation", [y("Conv", "x", "w", "b", pads=[0, 1, 2, 1], dilations=[2, 1], group=3)],
         {"w": np.linspace(-1, 1, 6 * 1 * 9, dtype=F32).reshape(6, 1, 3, 3), "b": np.arange(6, dtype=F32)}),
    case("Conv-same-upper-stride2", [y("Conv", "x", "w", auto_pad="SAME_UPPER", strides=[2, 2])],
         {"w": np.linspace(-1, 1, 4 * 3 * 4, dtype=F32).reshape(4, 3, 2, 2)}),
    # pools
    case("MaxPool-k2s2", [y("MaxPool", "x", kernel_shape=[2, 2], strides=[2, 2])]),
    case("MaxPool-pad1", [y("MaxPool", "x", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]),
    case("MaxPool-asym", [y("MaxPool", "x", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])]),
    case("MaxPool-ceil", [y("MaxPool", "x", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)]),
    case("MaxPool-ceil-pad1", [y("MaxPool", "x", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                 ceil_mode=1)]),
    case("MaxPool-ceil-asym", [y("MaxPool", "x", kernel_shape=[3, 3], strides=[3, 2], pads=[1, 0, 0, 1],
                                 ceil_mode=1)]),
    case("MaxPool-dilated", [y("MaxPool", "x", kernel_shape=[2, 2], dilations=[2, 2])]),
    case("MaxPool-wide-pad", [y("MaxPool", "x", kernel_shape=[3, 3], pads=[2, 2, 2, 2])]),  # past torch's k/2
    case("MaxPool-same-upper", [y("MaxPool", "x", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")]),
    case("MaxPool-same-lower", [y("MaxPool", "x", kernel_shape=[2, 2], auto_pad="SAME_LOWER")]),
    case("AveragePool-pad1", [y("AveragePool", "x", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]),
    case("AveragePool-pad1-count", [y("AveragePool", "x", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                      count_include_pad=1)]),
    case("AveragePool-asym", [y("AveragePool", "x", kernel_shape=[3, 3], pads=[0, 1, 1, 0])]),
    case("AveragePool-asym-count", [y("AveragePool", "x", kernel_shape=[3, 3], pads=[0, 1, 1, 0],
                                      count_include_pad=1)]),
    case("AveragePool-ceil", [y("AveragePool", "x", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)]),
    case("AveragePool-ceil-pad1-count", [y("AveragePool", "x", kernel_shape=[3, 3], strides=[2, 2],
                                           pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1)]),
    case("AveragePool-ceil-asym", [y("AveragePool", "x", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1],
                                     ceil_mode=1)]),
    case("AveragePool-ceil-asym-count", [y("AveragePool", "x", kernel_shape=[3, 3], strides=[2, 2],
                                           pads=[1, 0, 0, 1], ceil_mode=1, count_include_pad=1)]),
    case("AveragePool-same-upper", [y("AveragePool", "x", kernel_shape=[2, 2], auto_pad="SAME_UPPER")]),
    case("GlobalAveragePool", [y("GlobalAveragePool", "x")]),
    case("GlobalMaxPool", [y("GlobalMaxPool", "x")]),
    # Resize: as PyTorch and Keras exports write it, and the opset defaults
    case("Resize-nearest-asymmetric-floor", *resize(scales=[1, 1, 2, 2], mode="nearest",
                                                    coordinate_transformation_mode="asymmetric", nearest_mode="floor")),
    case("Resize-nearest-default-up", *resize(scales=[1, 1, 2, 3])),
    case("Resize-nearest-default-down", *resize(scales=[1, 1, 0.5, 0.5])),
    case("Resize-nearest-half-pixel-ceil", *resize(scales=[1, 1, 0.5, 1.5], nearest_mode="round_prefer_ceil")),
    case("Resize-nearest-sizes-opset11", *resize(11, sizes=[1, 3, 17, 23], mode="nearest",
                                                 coordinate_transformation_mode="asymmetric", nearest_mode="floor")),
    case("Resize-nearest-axes-opset19", *resize(19, sizes=[16, 5], axes=[2, 3], mode="nearest",
                                                coordinate_transformation_mode="asymmetric", nearest_mode="floor")),
    case("Resize-linear-half-pixel", *resize(scales=[1, 1, 2, 2], mode="linear")),
    case("Resize-linear-half-pixel-sizes", *resize(sizes=[1, 3, 11, 7], mode="linear")),
    case("Resize-linear-half-pixel-down", *resize(scales=[1, 1, 0.6, 0.5], mode="linear")),
    case("Resize-linear-align-corners", *resize(sizes=[1, 3, 15, 19], mode="linear",
                                                coordinate_transformation_mode="align_corners")),
    case("Resize-linear-pytorch-half-pixel", *resize(scales=[1, 1, 1.5, 2.5], mode="linear",
                                                     coordinate_transformation_mode="pytorch_half_pixel")),
    case("Resize-linear-opset11", *resize(11, scales=[1, 1, 2, 2], mode="linear")),
    case("Resize-linear-axes-opset18", *resize(18, scales=[2, 3], axes=[-2, -1], mode="linear")),
]


@pytest.mark.parametrize("nodes,consts,opset,shape", CASES)
def test_op_matches_onnxruntime(tmp_path, nodes, consts, opset, shape):
    x = (np.random.default_rng(0).standard_normal(shape) * 4).astype(F32)
    ref, out = both(save_graph(tmp_path / "m.onnx", nodes, shape, consts, opset), x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


REFUSED = [
    case("Resize mode cubic", *resize(scales=[1, 1, 2, 2], mode="cubic")),
    case("Resize linear coordinate_transformation_mode asymmetric",
         *resize(scales=[1, 1, 2, 2], mode="linear", coordinate_transformation_mode="asymmetric")),
    # asymmetric: source dst / 3 rounded half down; torch floors dst / 3 or (dst + 0.5) / 3
    case("Resize nearest asymmetric round_prefer_floor",
         *resize(scales=[1, 1, 3, 3], coordinate_transformation_mode="asymmetric")),
    case("Pad mode reflect on the batch or channel axis, or cropping", [y("Pad", "x", "p", mode="reflect")],
         {"p": a(0, 1, 1, 1, 0, 0, 1, 1)}),
    case("Pad mode wrap", [y("Pad", "x", "p", mode="wrap")], {"p": a(0, 0, 1, 1, 0, 0, 1, 1)}, opset=19),
    case("AveragePool dilations", [y("AveragePool", "x", kernel_shape=[2, 2], dilations=[2, 2])], opset=19),
    case("LRN an even size, 4", [y("LRN", "x", size=4)]),
]


@pytest.mark.parametrize("nodes,consts,opset,shape", REFUSED)
def test_variants_without_a_torch_equivalent_are_refused_by_name(request, tmp_path, nodes, consts, opset, shape):
    op, variant = request.node.callspec.id.split(" ", 1)
    m = OnnxTorch(save_graph(tmp_path / "m.onnx", nodes, shape, consts, opset))  # loads: the op is known
    with pytest.raises(NotImplementedError, match=f"does not run ONNX op {op} with {variant}"):
        m(torch.zeros(shape))


@pytest.mark.parametrize("op", ["Softsign", "Celu"])
def test_other_ops_are_refused_by_name_at_load(tmp_path, op):
    attrs = {}
    with pytest.raises(NotImplementedError, match=f"does not run ONNX op {op}$"):
        OnnxTorch(save_graph(tmp_path / "m.onnx", [y(op, "x", **attrs)], SHAPE))


# -- peers that fail softly -------------------------------------------------------------------------

def softsign_onnx(path) -> str:
    """x (1, 4, 9, 9) -> conv 3x3 + bias -> relu -> conv 1x1 -> Softsign: TVM and onnxruntime run
    it, the PyTorch peer refuses Softsign."""
    rng = np.random.default_rng(0)
    consts = {n: rng.standard_normal(s).astype(F32) for n, s in (("w1", (8, 4, 3, 3)), ("b1", (8,)),
                                                                   ("w2", (8, 8, 1, 1)))}
    nodes = [N("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             N("Relu", ["c1"], ["r1"]), N("Conv", ["r1", "w2"], ["c2"], kernel_shape=[1, 1]), y("Softsign", "c2")]
    return save_graph(path, nodes, (1, 4, 9, 9), consts, y_shape=[1, 8, 9, 9])


PYTORCH_SKIP = "NotImplementedError: the PyTorch peer does not run ONNX op Softsign"
NAMES = ["tvm-sparseconv plan", "tvm-sparseconv all dense", "onnxruntime", "pytorch"]


@pytest.fixture(scope="module")
def softsign_bench(tmp_path_factory):
    """The Softsign model, its input (saved), and bench_model's result on them with both peers."""
    if set(available_peers()) != {"onnxruntime", "pytorch"}:
        pytest.skip("needs both peers installed")
    d = tmp_path_factory.mktemp("softsign")
    path = softsign_onnx(d / "softsign.onnx")
    x = np.random.default_rng(1).standard_normal((1, 4, 9, 9)).astype(F32)
    np.save(d / "x.npy", x)
    # threads=0 (the library's default): every peer's own default
    return path, str(d / "x.npy"), bench.bench_model(load_model(path), x, algorithm="dense", repeat=2)


def test_bench_shows_a_peer_that_cannot_run_the_model_as_skipped(softsign_bench):
    *_, res = softsign_bench
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == NAMES
    assert rows["pytorch"] == {"name": "pytorch", "ms": None, "layers": "", "max_abs_error": None, "wrong": None,
                               "plan_speedup": None, "plan_speedup_range": None, "skipped": PYTORCH_SKIP}
    for name in NAMES[:3]:
        r = rows[name]
        assert r["skipped"] is None and r["ms"] > 0 and r["max_abs_error"] < 1e-4  # against onnxruntime
        assert r["wrong"] is False
    assert rows["onnxruntime"]["max_abs_error"] == 0.0
    assert res["speedup_vs_best"] == min(rows[n]["ms"] for n in NAMES[1:3]) / rows[NAMES[0]]["ms"]
    assert res["speedup_vs_peers"] == rows["onnxruntime"]["ms"] / rows[NAMES[0]]["ms"]  # PyTorch skipped


def test_results_markdown_has_a_dash_for_the_skipped_peer(softsign_bench, tmp_path, capsys):
    *_, res = softsign_bench
    (tmp_path / "bench.json").write_text(json.dumps(res))
    assert main(["results", str(tmp_path / "bench.json")]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
    header, row = ([c.strip() for c in l[2:-2].split(" | ")] for l in (lines[0], lines[1]))
    cells = dict(zip(header, row))
    assert cells["pytorch ms"] == "-"
    assert cells["over the best peer"] == f"{res['speedup_vs_peers']:.2f}x"
    assert all(float(cells[f"{n} ms"]) > 0 for n in NAMES[:3])


def test_cli_bench_table_prints_the_skipped_row(softsign_bench):
    path, x_path, _ = softsign_bench
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["bench", path, "--inputs", x_path, "--algorithm", "dense", "--repeat", "2"]) == 0
    lines = {l.split("  ")[0].strip(): l for l in buf.getvalue().splitlines() if l.startswith(tuple(NAMES))}
    assert list(lines) == NAMES
    assert lines["pytorch"].split(None, 1)[1] == f"skipped: {PYTORCH_SKIP}"
    assert "plan vs the best peer: " in buf.getvalue()  # onnxruntime ran
    for name in NAMES[:3]:
        ms = lines[name][len(name):].split()[0]
        assert float(ms) > 0


def test_bench_skips_a_peer_that_fails_in_a_later_round(softsign_bench, monkeypatch):
    """A peer that fails in any round is skipped; an earlier round's output is no reference (the
    plan is then checked against the baseline build). Scripted peers: onnxruntime runs in round
    1 and fails in round 2."""
    path, x_path, _ = softsign_bench
    calls = []

    def scripted(peer, onnx_path, x, threads, repeat):
        calls.append(peer)
        if len(calls) > 1:
            raise PeerError("crashed: SIGSEGV")
        return np.full((1, 8, 9, 9), 1e3, F32), 1.0  # far from the model's output

    monkeypatch.setattr(bench, "available_peers", lambda: ["onnxruntime"])
    monkeypatch.setattr(bench, "run_model_peer", scripted)
    res = bench.bench_model(load_model(path), np.load(x_path), algorithm="dense", repeat=2, rounds=3)
    assert calls == ["onnxruntime", "onnxruntime"]  # not asked again after it failed
    plan, base, peer = res["rows"]
    assert peer["ms"] is None and peer["skipped"] == "crashed: SIGSEGV"
    assert plan["max_abs_error"] < 1e-4 and base["max_abs_error"] == 0.0  # checked against the baseline
    assert res["speedup_vs_best"] == base["ms"] / plan["ms"]
    assert res["speedup_vs_peers"] is None  # no peer ran


def test_layer_peer_killed_by_a_signal_is_skipped(tmp_path, monkeypatch, capsys):
    """The peer's child process dies of SIGSEGV (the interpreter it starts is a script that kills
    itself): measure_peer returns a Record with the reason, run_layer carries on, the layer table
    says skipped."""
    crash = tmp_path / "python"
    crash.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crash.chmod(crash.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr("sys.executable", str(crash))
    spec = Conv2DSpec.from_shapes((1, 4, 6, 6), (8, 4, 3, 3), 1, 1)
    x, w = np.ones(spec.x_shape, F32), np.ones(spec.w_shape, F32)
    r = measure_peer("onnxruntime", spec, x, w, None, 1, threads=1)
    assert r.algorithm == "onnxruntime" and r.error == "crashed: SIGSEGV" and r.time_ms is None
    report = run_layer(spec, x, w, algorithms=(), peers=("onnxruntime", "pytorch"), threads=1)
    assert [(r["algorithm"], r["error"]) for r in report["results"]] == \
        [("onnxruntime", "crashed: SIGSEGV"), ("pytorch", "crashed: SIGSEGV")]
    print_layer_table(report)
    out = capsys.readouterr().out.splitlines()
    assert [l.split() for l in out[-2:]] == [["onnxruntime", "skipped:", "crashed:", "SIGSEGV"],
                                            ["pytorch", "skipped:", "crashed:", "SIGSEGV"]]
