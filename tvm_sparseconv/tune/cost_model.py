"""An XGBoost model of a sparse kernel's time from its knobs, the layer shape and the density.

It ranks the candidates not yet measured so that a small budget measures the likely-fastest
ones; measurements on every layer so far train it (the target is log(ms / dense GMACs), so
layers of all sizes share one model).
"""
from __future__ import annotations

import math

import numpy as np

from ..conv import Conv2DSpec

MIN_TRAIN = 8


def features(algorithm: str, knobs: dict, spec: Conv2DSpec, density: float, vocab: dict) -> list[float]:
    """[algorithm id, shape..., density, then every knob seen so far in a fixed slot]."""
    f = [float(vocab.setdefault(("algo", algorithm), len(vocab))), spec.in_channels, spec.height, spec.width,
         spec.out_channels, spec.kernel_h, spec.kernel_w, spec.stride[0], spec.stride[1], density]
    slots = vocab.setdefault("_slots", {})
    row = {}
    for k, v in knobs.items():
        slot = slots.setdefault(k, len(slots))
        row[slot] = float(v) if isinstance(v, (int, float)) else float(vocab.setdefault(("val", k, v), len(vocab)))
    return f + [row.get(i, -1.0) for i in range(len(slots))]


class KnobCostModel:
    def __init__(self, seed: int = 0):
        self.vocab: dict = {}
        self.x: list = []
        self.y: list = []
        self.booster = None
        self.seed = seed

    def add(self, algorithm: str, knobs: dict, spec: Conv2DSpec, density: float, ms: float) -> None:
        self.x.append((algorithm, knobs, spec, density))
        self.y.append(math.log(ms / max(spec.macs * 1e-9, 1e-9)))
        self.booster = None

    def _matrix(self, rows):
        feats = [features(a, k, s, d, self.vocab) for a, k, s, d in rows]
        width = max(len(f) for f in feats)
        return np.array([f + [-1.0] * (width - len(f)) for f in feats], np.float32)

    def _fit(self):
        import xgboost as xgb

        x = self._matrix(self.x)
        self.width = x.shape[1]
        self.booster = xgb.train({"max_depth": 4, "eta": 0.3, "seed": self.seed, "verbosity": 0},
                                 xgb.DMatrix(x, label=np.array(self.y)), num_boost_round=40)

    def rank(self, algorithm: str, candidates: list[dict], spec: Conv2DSpec, density: float) -> list[int]:
        """Indices of ``candidates``, most promising first (in the given order until trained)."""
        if len(self.y) < MIN_TRAIN:
            return list(range(len(candidates)))
        import xgboost as xgb

        if self.booster is None:
            self._fit()
        x = self._matrix([(algorithm, k, spec, density) for k in candidates])
        if x.shape[1] < self.width:
            x = np.pad(x, ((0, 0), (0, self.width - x.shape[1])), constant_values=-1.0)
        pred = self.booster.predict(xgb.DMatrix(x[:, :self.width]))
        return list(np.argsort(pred))
