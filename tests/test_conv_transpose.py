"""passes/conv_transpose_as_conv: a transposed conv as convs and a depth-to-space, against NumPy
float64 (the scatter that defines it) over strides, kernels, paddings, output paddings and
groups, with NaN and Inf; the ones it does not take left to TVM; a U-Net-like ONNX model against
onnxruntime, and the PyTorch peer's ConvTranspose against onnxruntime."""
import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax

from tvm_sparseconv.compile import build
from tvm_sparseconv.frontend import load_model
from tvm_sparseconv.layout import lanes_layout
from tvm_sparseconv.onnx_torch import OnnxTorch
from tvm_sparseconv.passes.conv_transpose_as_conv import ConvTransposeAsConv
from tvm_sparseconv.plan import Plan
from tvm_sparseconv.target import make_target

from conftest import HOST, save_onnx

BLOCKED_LAYOUT = lanes_layout(HOST)


def scatter(x: np.ndarray, w: np.ndarray, strides, padding, output_padding, groups) -> np.ndarray:
    """ONNX ConvTranspose in float64: every input pixel adds x * w (C x O/g x kh x kw, IOHW) to
    the kh x kw window at (i*s, j*s) of the full output, then the padding is cropped."""
    (n, c, h, wd), (_, og, kh, kw), (sh, sw) = x.shape, w.shape, strides
    oh = (h - 1) * sh - padding[0] - padding[2] + kh + output_padding[0]
    ow = (wd - 1) * sw - padding[1] - padding[3] + kw + output_padding[1]
    full = np.zeros((n, og * groups, (h - 1) * sh + kh + output_padding[0], (wd - 1) * sw + kw + output_padding[1]))
    cg = c // groups
    with np.errstate(invalid="ignore"):  # Inf * w and Inf - Inf are what they are
        for g in range(groups):
            xg, wg = x[:, g * cg:(g + 1) * cg].astype(np.float64), w[g * cg:(g + 1) * cg].astype(np.float64)
            for i in range(h):
                for j in range(wd):
                    full[:, g * og:(g + 1) * og, i * sh:i * sh + kh, j * sw:j * sw + kw] += \
                        np.einsum("nc,cokl->nokl", xg[:, :, i, j], wg)
    return full[:, :, padding[0]:padding[0] + oh, padding[1]:padding[1] + ow]


def transposed(x_shape, w: np.ndarray, relu: bool = True, **attrs) -> tvm.IRModule:
    """main(x) = relu(conv2d_transpose(x, w, **attrs)), or without the relu."""
    bb = relax.BlockBuilder()
    v = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [v]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d_transpose(v, relax.const(w), **attrs))
            out = bb.emit_output(relax.op.nn.relu(y) if relu else y)
        bb.emit_func_output(out)
    return bb.get()


def run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target=make_target(None)), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def ops_of(mod: tvm.IRModule) -> list[str]:
    return [b.value.op.name for blk in mod["main"].body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]


# (kernel, strides, padding (top, left, bottom, right), output_padding, groups, convs made)
CASES = [
    ((2, 2), (2, 2), (0, 0, 0, 0), (0, 0), 1, 1),  # U-Net's up-conv: one 1x1 conv
    ((4, 4), (2, 2), (1, 1, 1, 1), (0, 0), 1, 1),  # DCGAN / FCN: one 2x2 conv
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, 4),  # k not a multiple of s: a conv per phase
    ((3, 3), (1, 1), (1, 1, 1, 1), (0, 0), 1, 1),  # stride 1: the flipped kernel
    ((5, 3), (3, 2), (2, 0, 1, 1), (1, 0), 2, 6),
    ((3, 3), (2, 2), (0, 0, 0, 0), (0, 0), 4, 4),  # groups of 2 channels
    ((3, 3), (2, 2), (2, 2, 2, 2), (1, 1), 1, 4),  # begin padding k - 1
    ((5, 5), (3, 3), (4, 1, 0, 2), (2, 0), 2, 9),
    ((4, 4), (2, 2), (3, 3, 3, 3), (0, 0), 1, 1),
]


@pytest.mark.parametrize("kernel,strides,padding,output_padding,groups,convs", CASES)
def test_a_transposed_conv_as_convs_matches_the_scatter(kernel, strides, padding, output_padding, groups, convs):
    rng = np.random.default_rng(sum(kernel) + 7 * groups)
    x = rng.standard_normal((2, 8, 5, 6)).astype(np.float32)
    w = rng.standard_normal((8, 12 // groups, *kernel)).astype(np.float32)
    attrs = dict(strides=strides, padding=padding, output_padding=output_padding, groups=groups)
    mod = ConvTransposeAsConv(transposed(x.shape, w, **attrs))
    ops = ops_of(mod)
    assert "relax.nn.conv2d_transpose" not in ops and ops.count("relax.nn.conv2d") == convs, ops
    ref = np.maximum(scatter(x, w, strides, padding, output_padding, groups), 0)
    np.testing.assert_allclose(run(mod, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,strides,padding,output_padding", [((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
                                                                   ((4, 4), (2, 2), (1, 1, 1, 1), (0, 0))])
def test_nan_and_inf_land_where_the_scatter_puts_them(kernel, strides, padding, output_padding):
    """A NaN pixel and a -Inf pixel reach only the outputs whose windows hold them: a phase's
    conv has no zero taps, which would multiply them into outputs they do not reach."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    x[0, 1, 2, 3], x[0, 2, 4, 1] = np.nan, -np.inf
    w = rng.standard_normal((4, 3, *kernel)).astype(np.float32)
    attrs = dict(strides=strides, padding=padding, output_padding=output_padding)
    y = run(ConvTransposeAsConv(transposed(x.shape, w, relu=False, **attrs)), x)
    ref = scatter(x, w, strides, padding, output_padding, 1)
    assert np.isnan(ref).any() and np.isinf(ref).any()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,attrs", [
    ((3, 3), dict(strides=(2, 2), dilation=(2, 2))),  # dilated
    ((1, 1), dict(strides=(2, 2))),  # k < s: a phase with no tap
    ((3, 3), dict(strides=(2, 2), padding=(3, 3, 0, 0))),  # begin padding past k - 1
])
def test_the_transposed_convs_it_does_not_take_stay_as_they_are(kernel, attrs):
    w = np.random.default_rng(0).standard_normal((4, 6, *kernel)).astype(np.float32)
    mod = transposed((1, 4, 5, 5), w, **attrs)
    tvm.ir.assert_structural_equal(ConvTransposeAsConv(mod), mod)


def unet_onnx(path, batch=1):
    """x (batch, 3, 16, 16) -> conv 3x3 -> 16 + ReLU (the skip) -> max pool 2 -> conv 3x3 -> 32 +
    ReLU -> ConvTranspose 2x2/2 + bias -> 16 (U-Net's up-conv), concat with the skip -> conv 3x3 ->
    16 + ReLU -> ConvTranspose 3x3/2, pads 1, output_padding 1 -> 4 -> sigmoid: y (batch, 4, 32, 32)."""
    rng = np.random.default_rng(2)
    shapes = {"w1": (16, 3, 3, 3), "w2": (32, 16, 3, 3), "wu": (32, 16, 2, 2), "bu": (16,), "w3": (16, 32, 3, 3),
              "wt": (16, 4, 3, 3)}
    init = [numpy_helper.from_array((0.3 * rng.standard_normal(s)).astype("float32"), n) for n, s in shapes.items()]
    conv = lambda x, w, y: helper.make_node("Conv", [x, w], [y], kernel_shape=[3, 3], pads=[1] * 4)  # noqa: E731
    nodes = [conv("x", "w1", "c1"), helper.make_node("Relu", ["c1"], ["s"]),
             helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             conv("p", "w2", "c2"), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("ConvTranspose", ["r2", "wu", "bu"], ["u"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Concat", ["u", "s"], ["cat"], axis=1),
             conv("cat", "w3", "c3"), helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("ConvTranspose", ["r3", "wt"], ["t"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1], output_padding=[1, 1]),
             helper.make_node("Sigmoid", ["t"], ["y"])]
    return save_onnx(path, "unet", nodes, [batch, 3, 16, 16], [batch, 4, 32, 32], init)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("layout", ["nchw", "blocked"])
def test_a_unet_with_up_convs_matches_onnxruntime(tmp_path, batch, layout):
    """The up-convs are layers of the plan (3 convs + 1 + 4 phases of the 3x3/2), built in NCHW
    or with every layer in channel blocks, and the model matches onnxruntime."""
    path = unet_onnx(tmp_path / "unet.onnx", batch)
    m = load_model(path)
    assert len(m.sites) == 8
    plan = Plan.uniform(m.sites, "dense")
    if layout == "blocked":
        for l in plan.layers:
            l.knobs = {"layout_in": BLOCKED_LAYOUT, "layout_out": BLOCKED_LAYOUT}
    x = np.random.default_rng(3).standard_normal((batch, 3, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y = build(m, plan, None).vm()["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_the_pytorch_peer_runs_transposed_convs_as_onnxruntime(tmp_path):
    path = unet_onnx(tmp_path / "unet.onnx")
    x = np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    import torch

    np.testing.assert_allclose(OnnxTorch(path)(torch.from_numpy(x)).numpy(), ref, rtol=1e-4, atol=1e-5)


def test_a_torch_export_transposed_conv_is_planned_and_matches_torch():
    """torch.export's conv_transpose2d imports as the same Relax op: rewritten to a conv per
    phase (3x3, stride 2), planned with the conv before it, and it matches torch."""
    torch = pytest.importorskip("torch")

    class Up(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.t = torch.nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)

        def forward(self, x):
            return torch.relu(self.t(torch.relu(self.c(x))))

    torch.manual_seed(0)
    net, x = Up().eval(), torch.randn(1, 3, 12, 12)
    m = load_model(torch.export.export(net, (x,)))
    assert len(m.sites) == 1 + 4
    y = build(m, Plan.uniform(m.sites, "dense"), None).vm()["main"](tvm.runtime.tensor(x.numpy())).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(y, net(x).numpy(), rtol=1e-4, atol=1e-5)
