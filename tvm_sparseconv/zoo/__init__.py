"""Shipped models whose weights come as a PyTorch checkpoint.

The network is defined in plain torch in a module of this package (``NAME.py``: ``build(state_dict)
-> nn.Module`` in eval mode, ``INPUT_SHAPE``), loaded strictly from the checkpoint and exported
once to ONNX, so that everything downstream (frontend, profile, tune, compile, bench, the peers)
sees an ONNX file like the other shipped models'. The export is cached in :func:`cache_dir`
under a name keyed by the checkpoint's SHA-256 and :data:`EXPORT_VERSION`.

``imagenet_classes.txt``: the 1000 ImageNet-1k class names in torchvision's class order, one a
line, from pytorch/hub's ``imagenet_classes.txt`` (commit c7895df).
"""
from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

from ..cache import cache_dir
from ..frontend import ModelError

# bump when a network's definition or the export settings change: the cached files are then
# exported again instead of being reused
EXPORT_VERSION = 1
# the TorchScript exporter's opset: Softmax over one axis (13+), and what TVM's ONNX importer
# and onnxruntime both read
OPSET = 17


@lru_cache(maxsize=None)
def imagenet_labels() -> tuple:
    """The 1000 ImageNet class names, index i the name of class i."""
    names = (Path(__file__).parent / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()
    if len(names) != 1000:  # a truncated install would shift nothing but silently miss classes
        raise ModelError(f"imagenet_classes.txt holds {len(names)} names, not 1000; reinstall tvm-sparseconv")
    return tuple(names)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_onnx(checkpoint: str, network: str) -> str:
    """The ONNX file of ``network`` (a module of this package) with the weights of ``checkpoint``
    (a state dict saved by torch.save), exported on the first call and reused after.

    The file's input is ``input``, N x INPUT_SHAPE[1:] with a free batch dim N (as the other
    shipped models': frontend.load_model fixes it), its output ``probs``. The export is written
    to a temporary file in the cache directory and renamed into place, so a concurrent or
    interrupted export never leaves a partial file under the final name.
    """
    key = hashlib.sha256(f"{network}:{EXPORT_VERSION}:{_sha256(checkpoint)}".encode()).hexdigest()[:16]
    out = cache_dir() / f"{network}-{key}.onnx"
    if out.is_file():
        return str(out)
    try:
        import torch
    except ImportError as e:
        raise ModelError(f"exporting {network} to ONNX (once, into {cache_dir()}) needs torch: pip install "
                         "torch (the 'peers' and 'test' extras pin it)") from e
    net_module = importlib.import_module(f"{__name__}.{network}")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net = net_module.build(state)
    except Exception as e:
        # torch's message spans lines (one per kind of mismatch): one line for the CLI's error
        raise ModelError(f"{checkpoint} is not a {network} checkpoint: {' '.join(str(e).split())}") from e
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as e:
        raise ModelError(f"cannot write the ONNX export of {network} into {out.parent} ({e}); set XDG_CACHE_HOME "
                         "to a writable folder") from e
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter (dynamo=False) is deprecated in torch 2.9+; the dynamo one
            # needs onnxscript, which the project does not depend on
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(net, (torch.zeros(net_module.INPUT_SHAPE),), tmp, dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=["probs"],
                              dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(out)
