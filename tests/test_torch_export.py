"""Models as torch gives them to a user, against torch itself: torch.export programs (the Python
API's other way in, beside ONNX) and ONNX files from torch.onnx.export's default (dynamo)
exporter, whose graphs differ from the TorchScript exporter's that examples/architectures.py
uses; and adaptive_max_pool2d, which TVM's torch.export importer lacks
(frontend._adaptive_max_pool2d), checked with the average pools over the same bins."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tvm_sparseconv  # noqa: E402
from tvm_sparseconv.frontend import ModelError  # noqa: E402

from test_architectures import architectures, outputs  # noqa: E402

# the default run's sample: a global max pool (adaptive_max_pool2d), hard-swish with SE
SAMPLE = ("xception-ish", "mobilenet-v3ish")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n if n in SAMPLE else pytest.param(n, marks=pytest.mark.extended)
                                  for n in sorted(architectures.NETS)])
@pytest.mark.parametrize("way", ["torch.export", "dynamo onnx"])
def test_architecture_from_torch_matches_torch(name, way, tmp_path):
    torch.manual_seed(0)
    net = architectures.NETS[name]().eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = net(x)
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    if way == "torch.export":
        m = tvm_sparseconv.load_model(torch.export.export(net, (x,)))
    else:
        pytest.importorskip("onnxscript")
        path = str(tmp_path / f"{name}.onnx")
        torch.onnx.export(net, (x,), path, input_names=["x"], dynamo=True)
        m = tvm_sparseconv.load_model(path)
    ys = outputs(m, x.numpy(), plan=tvm_sparseconv.predict_plan(m))
    assert [y.shape for y in ys] == [tuple(r.shape) for r in refs]
    for y, r in zip(ys, refs):
        r = r.numpy()
        np.testing.assert_allclose(y, r, rtol=1e-4, atol=1e-4 * np.abs(r).max())


class Pooled(torch.nn.Module):
    """conv 3x3 -> ReLU -> AdaptiveMaxPool2d(size) (AdaptiveAvgPool2d with ``kind`` "avg"); with
    ``indices`` the output also reads the max pool's indices."""

    def __init__(self, size, indices=False, kind="max"):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = (torch.nn.AdaptiveAvgPool2d(size) if kind == "avg"
                     else torch.nn.AdaptiveMaxPool2d(size, return_indices=indices))

    def forward(self, x):
        y = self.pool(torch.relu(self.conv(x)))
        return y[0] + y[1].float() if isinstance(y, tuple) else y


# 1 x 1 (a max over the map), bins that tile the map, bins that overlap (7 -> 3: rows 0-3, 2-5,
# 4-7) or differ per axis, and None (that axis kept); the average pools (TVM's own import) alike
@pytest.mark.parametrize("size,hw", [(1, 7), ((2, 2), 8), ((3, 3), 7), ((3, 2), 10), ((None, 3), 7)])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_adaptive_pools_match_torch(size, hw, kind):
    torch.manual_seed(0)
    net = Pooled(size, kind=kind).eval()
    x = torch.randn(1, 3, hw, hw)
    ref = net(x).detach().numpy()
    (y,) = outputs(tvm_sparseconv.load_model(torch.export.export(net, (x,))), x.numpy(), algorithm="dense")
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_adaptive_max_pool2d_indices_are_refused():
    """Its indices, where read, would need the argmax TVM has no op for: a clear error, not the
    placeholder TVM's importer gives max_pool2d_with_indices."""
    net = Pooled(2, indices=True).eval()
    with pytest.raises(ModelError, match="indices are used"):
        tvm_sparseconv.load_model(torch.export.export(net, (torch.randn(1, 3, 8, 8),)))
