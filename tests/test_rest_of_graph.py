"""The ops around the convs, compiled by tvm-sparseconv's pipeline: each op of the PyTorch peer's
catalogue (test_peers.CASES, the common CNN ops and their attribute variants) placed after a
sparse conv (3x3 + ReLU, hybrid) and run through tvm_sparseconv.compile on TVM's VM, against
onnxruntime. The conv's output feeds the op, so the rest of the graph (ParallelizeRest's
schedules, dlight's) sees what a real model gives it: a ReLU'd activation with exact zeros.
What TVM cannot run right is refused with a ModelError (REFUSED)."""
import numpy as np
import onnx
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax

import tvm_sparseconv

from test_peers import CASES, F32, SHAPE, N, a, case, resize, save_graph, y

ort = pytest.importorskip("onnxruntime")

# forms the PyTorch peer does not run (so not in its CASES) that TVM's importer refuses or reads
# otherwise than onnxruntime computes them: tvm_sparseconv converts them to a form it reads right
# (old_opsets.as_opset13: every model below opset 11) or refuses them (frontend.prepare_resizes)
IMPORTER_CASES = [
    case("Upsample-nearest-opset7", [y("Upsample", "x", mode="nearest", scales=[1.0, 1.0, 2.0, 3.0])], opset=7),
    case("Upsample-nearest-opset9", [y("Upsample", "x", "s", mode="nearest")], {"s": a(1, 1, 1.5, 2.5, dtype=F32)},
         opset=9),
    case("Upsample-linear-opset9", [y("Upsample", "x", "s", mode="linear")], {"s": a(1, 1, 2, 2, dtype=F32)},
         opset=9),
    case("Resize-nearest-opset10-up", [y("Resize", "x", "s", mode="nearest")], {"s": a(1, 1, 1.5, 2.5, dtype=F32)},
         opset=10),
    case("Resize-nearest-opset10-down", [y("Resize", "x", "s", mode="nearest")],
         {"s": a(1, 1, 0.75, 0.6, dtype=F32)}, opset=10),
    case("Resize-linear-opset10", [y("Resize", "x", "s", mode="linear")], {"s": a(1, 1, 2, 1.5, dtype=F32)},
         opset=10),
    case("ImageScaler-opset8", [y("ImageScaler", "x", scale=0.5, bias=[1.0, -2.0, 3.0])], opset=8),
    case("BatchNormalization-spatial-opset7", [y("BatchNormalization", "x", "g", "b", "m", "v", spatial=1)],
         {"g": a(1.5, 0.5, 1, dtype=F32), "b": a(0.1, -1, 2, dtype=F32), "m": a(1, 0, -1, dtype=F32),
          "v": a(0.5, 2, 1, dtype=F32)}, opset=7),
    case("Gemm-opset7", [N("Flatten", ["x"], ["f"]), y("Gemm", "f", "w", "c", transB=1)],
         {"w": np.random.default_rng(2).standard_normal((5, int(np.prod(SHAPE)))).astype(F32),
          "c": a(1, 2, 3, 4, 5, dtype=F32)}, opset=7),
    case("Resize-linear-antialias-down", *resize(18, scales=[1, 1, 0.5, 0.5], mode="linear", antialias=1)),
    case("Resize-linear-antialias-up", *resize(18, scales=[1, 1, 2, 1.5], mode="linear", antialias=1)),
    case("Resize-linear-keep-aspect", *resize(18, sizes=[5, 5], axes=[2, 3], mode="linear",
                                              keep_aspect_ratio_policy="not_larger")),
    case("Resize-linear-tf-crop", [y("Resize", "x", "roi", "scales", mode="linear",
                                     coordinate_transformation_mode="tf_crop_and_resize")],
         {"roi": a(0, 0, 0.1, 0.2, 1, 1, 0.9, 0.8, dtype=F32), "scales": a(1, 1, 2, 2, dtype=F32)}),
]
# what tvm_sparseconv refuses with a ModelError, by case: a form TVM's importer cannot read; a
# scale that does not divide the input evenly, or an attribute TVM's importer ignores, would run
# wrong in TVM (frontend.prepare_resizes)
REFUSED = {"Resize-linear-half-pixel-down": "does not give a whole size",
           "Resize-linear-antialias-down": "with antialias", "Resize-linear-keep-aspect": "keep_aspect_ratio_policy",
           "Resize-linear-tf-crop": "tf_crop_and_resize"}
# one case per kind of op runs in the fast tier, the variants in the extended run
FAST = {"Sigmoid", "Softmax-axis1", "Slice-attr-opset9", "Concat-channels", "BatchNormalization", "MaxPool-pad1",
        "AveragePool-ceil", "GlobalAveragePool", "Resize-linear-half-pixel", "Resize-linear-half-pixel-down",
        "Resize-nearest-sizes-opset11", "Resize-linear-axes-opset18", *(c.id for c in IMPORTER_CASES)}


def _marked(c):
    return c if c.id in FAST else pytest.param(*c.values, id=c.id, marks=(pytest.mark.slow, pytest.mark.extended))


# the cases whose input is the 4-D activation a conv makes (not opset 2: onnxruntime has no
# Relu kernel that old)
ACTIVATION_CASES = [_marked(c) for c in [*CASES, *IMPORTER_CASES] if tuple(c.values[3]) == SHAPE and c.values[2] >= 6]


def after_conv(path, nodes, consts, opset) -> str:
    """in (SHAPE) -> Conv 3x3 pad 1 (3 -> 3 channels) + bias -> Relu -> x -> ``nodes`` -> y."""
    c = SHAPE[1]
    w = np.random.default_rng(1).standard_normal((c, c, 3, 3)).astype(F32)
    conv = [helper.make_node("Conv", ["in", "wc", "bc"], ["xc"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
            helper.make_node("Relu", ["xc"], ["x"])]
    save_graph(path, conv + list(nodes), SHAPE, {**(consts or {}), "wc": w, "bc": np.full(c, -0.5, F32)}, opset)
    m = onnx.load(str(path))
    m.graph.input[0].name = "in"
    onnx.save(m, str(path))
    return str(path)


@pytest.mark.parametrize("nodes,consts,opset,shape", ACTIVATION_CASES)
def test_op_after_a_sparse_conv_matches_onnxruntime(request, tmp_path, nodes, consts, opset, shape):
    path = after_conv(tmp_path / "m.onnx", nodes, consts, opset)
    x = (np.random.default_rng(0).standard_normal(SHAPE) * 2).astype(F32)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"in": x})[0]
    refused = REFUSED.get(request.node.callspec.id)
    if refused:
        with pytest.raises(tvm_sparseconv.ModelError, match=refused):
            tvm_sparseconv.load_model(path)
        return
    model = tvm_sparseconv.load_model(path)
    assert len(model.sites) >= 1
    vm = relax.VirtualMachine(tvm_sparseconv.compile(model, algorithm="hybrid"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    out = (out if hasattr(out, "numpy") else out[0]).numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _importer_case(name):
    return next(c.values[:3] for c in IMPORTER_CASES if c.id == name)


def test_an_upsample_conversion_that_changes_the_outputs_is_refused(tmp_path, monkeypatch):
    """onnxruntime refuses the Upsample forms ONNX's converter gets wrong (downscales), so the
    converter is made to get one wrong: its Resize linear where the Upsample was nearest."""
    from onnx import version_converter

    convert = version_converter.convert_version

    def wrong(model, opset):
        out = convert(model, opset)
        for n in out.graph.node:
            for attr in n.attribute:
                if n.op_type == "Resize" and attr.name == "mode":
                    attr.s = b"linear"
        return out

    monkeypatch.setattr(version_converter, "convert_version", wrong)
    path = after_conv(tmp_path / "m.onnx", *_importer_case("Upsample-nearest-opset9"))  # scales 1.5 and 2.5
    with pytest.raises(tvm_sparseconv.ModelError, match="Upsample, which TVM's importer cannot read right .* "
                                                        "changes the outputs"):
        tvm_sparseconv.load_model(path)


@pytest.mark.parametrize("name,refused", [("Resize-nearest-opset10-up", True), ("ImageScaler-opset8", True),
                                          ("BatchNormalization-spatial-opset7", False)])
def test_a_failed_conversion_refuses_only_forms_tvm_cannot_read(tmp_path, monkeypatch, name, refused):
    """Where ONNX's converter fails, a model holding a form TVM's importer cannot read right is
    refused, and any other is imported in its own opset, still right."""
    from onnx import version_converter

    def fails(model, opset):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(version_converter, "convert_version", fails)
    path = after_conv(tmp_path / "m.onnx", *_importer_case(name))
    if refused:
        with pytest.raises(tvm_sparseconv.ModelError, match="cannot read right .* fails \\(no adapter\\)"):
            tvm_sparseconv.load_model(path)
        return
    x = (np.random.default_rng(0).standard_normal(SHAPE) * 2).astype(F32)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"in": x})[0]
    model = tvm_sparseconv.load_model(path)
    assert onnx.load(model.onnx_path).opset_import[0].version == 7
    vm = relax.VirtualMachine(tvm_sparseconv.compile(model, algorithm="hybrid"), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_an_old_model_with_a_byte_input_is_converted_and_matches_onnxruntime(tmp_path):
    """The conversion's check feeds the input's own type: an opset-9 model reading image bytes
    (uint8 -> Cast -> conv + ReLU -> an attribute Slice, which TVM reads only converted)."""
    from onnx import TensorProto

    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(F32)
    nodes = [N("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), N("Conv", ["xf", "w"], ["c"], pads=[1, 1, 1, 1]),
             N("Relu", ["c"], ["r"]), N("Slice", ["r"], ["y"], starts=[1], ends=[7], axes=[2])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(SHAPE))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    path = str(tmp_path / "bytes.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)], ir_version=8), path)
    x = np.random.default_rng(0).integers(0, 256, SHAPE).astype(np.uint8)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    model = tvm_sparseconv.load_model(path)
    vm = relax.VirtualMachine(tvm_sparseconv.compile(model, algorithm="hybrid"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
