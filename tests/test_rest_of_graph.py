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

from test_peers import CASES, F32, SHAPE, save_graph

ort = pytest.importorskip("onnxruntime")

# what tvm_sparseconv refuses with a ModelError, by case: TVM's ONNX importer cannot read these
# Resize forms, and a scale that does not divide the input evenly would run wrong in TVM
# (frontend.refuse_inexact_resize)
REFUSED = {"Resize-nearest-sizes-opset11": "TVM cannot import", "Resize-nearest-axes-opset19": "TVM cannot import",
           "Resize-linear-axes-opset18": "TVM cannot import",
           "Resize-linear-half-pixel-down": "does not give a whole size"}
# one case per kind of op runs in the fast tier, the variants in the extended run
FAST = {"Sigmoid", "Softmax-axis1", "Concat-channels", "BatchNormalization", "MaxPool-pad1", "AveragePool-ceil",
        "GlobalAveragePool", "Resize-linear-half-pixel", "Resize-linear-half-pixel-down"}


def _marked(c):
    return c if c.id in FAST else pytest.param(*c.values, id=c.id, marks=(pytest.mark.slow, pytest.mark.extended))


# the cases whose input is the 4-D activation a conv makes (not opset 2: onnxruntime has no
# Relu kernel that old)
ACTIVATION_CASES = [_marked(c) for c in CASES if tuple(c.values[3]) == SHAPE and c.values[2] >= 6]


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
