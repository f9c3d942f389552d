"""Real images and model preprocessing.

Sample images ship inside scikit-image (``skimage:astronaut``, ``skimage:chelsea``,
``skimage:coffee``, ``skimage:rocket``, ``skimage:camera``...) and scikit-learn
(``sklearn:china``, ``sklearn:flower``); any other argument is an image file path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

SAMPLE_IMAGES = ("skimage:astronaut", "skimage:chelsea", "skimage:coffee", "skimage:rocket",
                 "sklearn:china", "sklearn:flower", "skimage:camera")


class ImageError(ValueError):
    """An image that cannot be read or does not fit the model."""


def load_image(name: str) -> np.ndarray:
    """H x W x 3 uint8 RGB from a sample name or a file path (grey images are repeated)."""
    if name.startswith("skimage:"):
        import skimage.data

        fn = getattr(skimage.data, name.split(":", 1)[1], None)
        if fn is None:
            raise ImageError(f"scikit-image has no sample image {name!r}")
        img = fn()
    elif name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        try:
            img = load_sample_image(name.split(":", 1)[1] + ".jpg")
        except Exception as e:
            raise ImageError(f"scikit-learn has no sample image {name!r}") from e
    else:
        if not os.path.isfile(name):
            raise ImageError(f"image file not found: {name}")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(name) as im:
                img = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{name} is not a readable image: {e}") from e
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ImageError(f"{name}: expected an RGB image, got shape {img.shape}")
    return np.ascontiguousarray(img[:, :, :3])


@dataclass(frozen=True)
class Preprocess:
    """Resize to the model's input, then ``(pixel * scale - mean) / std`` per channel.

    ``bgr`` reverses the channel order (Caffe models); ``layout`` is the model input's.
    """

    scale: float = 1.0 / 255.0
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    bgr: bool = False

    def __call__(self, img: np.ndarray, input_shape, layout: str) -> np.ndarray:
        from PIL import Image

        if len(input_shape) != 4:
            raise ImageError(f"the model input {tuple(input_shape)} is not an image batch")
        n, h, w, c = input_shape if layout == "NHWC" else (input_shape[0], *input_shape[2:], input_shape[1])
        if c != 3:
            raise ImageError(f"the model takes {c} channels; images give 3 (pass preprocessed --inputs)")
        im = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR), np.float32)
        if self.bgr:
            im = im[:, :, ::-1]
        im = (im * self.scale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        x = np.broadcast_to(im[None], (n, h, w, 3))
        if layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, np.float32)


def load_inputs(model, images=(), inputs=(), preprocess: Preprocess | None = None) -> list[np.ndarray]:
    """Model inputs from images (preprocessed) and/or .npy files (used as they are, shape checked)."""
    pre = preprocess or Preprocess()
    out = [pre(load_image(i), model.input_shape, model.layout) for i in images]
    for p in inputs:
        if not os.path.isfile(p):
            raise ImageError(f"input file not found: {p}")
        try:
            a = np.load(p)
        except Exception as e:
            raise ImageError(f"{p} is not a .npy array: {e}") from e
        if a.shape != tuple(model.input_shape):
            if a.shape == tuple(model.input_shape[1:]):
                a = a[None]
            else:
                raise ImageError(f"{p} has shape {a.shape}; the model takes {tuple(model.input_shape)}")
        out.append(np.ascontiguousarray(a, np.float32))
    if not out:
        raise ImageError("no sample inputs: give --images or --inputs")
    return out


def batch_input(samples: list[np.ndarray], batch: int) -> np.ndarray:
    """``batch`` images from the samples (each a model input; their first images, in turn)."""
    if not samples:
        raise ValueError("no sample inputs")
    firsts = [np.asarray(s, np.float32)[:1] for s in samples]
    return np.ascontiguousarray(np.concatenate([firsts[i % len(firsts)] for i in range(batch)]))
