"""The common CNN architectures of examples/architectures.py (plain torch, seeded random weights),
exported to ONNX at 1 x 3 x 64 x 96 (height and width differ: no swap of the two passes),
compiled with the plan the cost model predicts, against onnxruntime: what a user's model brings beyond the three shipped ones (SiLU and hard-swish,
squeeze-and-excitation, channel shuffle, long concats, 7x7 depthwise with LayerNorm and GELU,
grouped convs of 16 and of 4 channels, dilated convs, bilinear and nearest upsampling, 1x7 and
7x1 convs, transposed convs, LeakyReLU, two outputs, reflection pads, instance norms, tanh, a
pixel shuffle, LocalResponseNorm, Mish, GroupNorm, PReLU, ELU, a global max pool, concats of
partial channel blocks, multi-resolution exchanges, pyramid pooling, fused MBConvs, split
attention, shared-weight detection heads) compiles and runs right, every output."""
import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

import tvm_sparseconv  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "architectures", os.path.join(os.path.dirname(__file__), "..", "examples", "architectures.py"))
architectures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(architectures)


def outputs(model, x: np.ndarray, **compile_args) -> list[np.ndarray]:
    """Every output of ``model`` compiled with ``compile_args`` (tvm_sparseconv.compile's), run on x."""
    vm = relax.VirtualMachine(tvm_sparseconv.compile(model, **compile_args), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


@pytest.mark.slow
@pytest.mark.parametrize("name,opset", [*((n, 17) for n in sorted(architectures.NETS)),
                                        ("retinanet-ish", 11), ("yolo-ish", 9)])
def test_predicted_plan_matches_onnxruntime(name, opset, tmp_path):
    """Every net at opset 17; RetinaNet at 11 (Resize with empty scales beside sizes) and YOLO at
    9 (Upsample), forms TVM's importer does not read as onnxruntime does (frontend.py)."""
    path = architectures.export(name, str(tmp_path / f"{name}.onnx"), size=(64, 96), opset=opset)
    model = tvm_sparseconv.load_model(path)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 96)).astype(np.float32)
    ys = outputs(model, x, plan=tvm_sparseconv.predict_plan(model))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    refs = sess.run(None, {sess.get_inputs()[0].name: x})
    assert [y.shape for y in ys] == [r.shape for r in refs]
    for y, ref in zip(ys, refs):
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
