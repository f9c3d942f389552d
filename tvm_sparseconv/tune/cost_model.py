"""The cost model of the kernels: a candidate's time on a layer, without running it.

A candidate is an algorithm with its knobs on one conv layer, on an input of a given density
profile, built for a CPU (cpu.CPU). Its features (``features``) describe all four in terms that
carry across CPUs: shapes and knobs relative to the CPU's vector lanes and registers, the
layer's buffers relative to its caches. The target is the log of the time over a roofline of
the CPU (``roofline_ms``: the layer's multiply-accumulates at ``lanes`` x ``fma_units`` x
``cores`` per cycle, at a nominal 1 GHz), so that one model serves layers of every size and
CPUs of every width.

``CostModel.train`` fits XGBoost (fixed seed, one thread: the same logs give the same model) to
the measurements of tuning runs (``TrainingRun``: a run folder's trials.jsonl and
profile.json); the model ships as ``tvm_sparseconv/shipped/cost_model.json.gz`` with the list of
runs it came from (``tvm-sparseconv cost-model train`` remakes it). ``RefitModel`` is the tuner's
model inside one run: the shipped model as a prior, corrected by what the run has measured.
docs/cost-model.md describes the features, the data and the evaluation.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..algorithms import REGISTRY
from ..conv import Conv2DSpec, Epilogue
from ..cpu import CPU, cpu_of
from ..layout import NCHW
from ..shipped import SHIPPED
from .layouts import TRANSFORM
from .log import TuningLog, TuningLogError, write_atomically
from .workloads import spec_workload_id

MODEL_FORMAT = "tvm-sparseconv-cost-model"
MODEL_VERSION = 1
SHIPPED_MODEL = SHIPPED / "cost_model.json.gz"

# XGBoost's parameters for the shipped model. One thread and exact splits: training is
# deterministic, so retraining on the same logs reproduces the shipped predictions.
PARAMS = {"objective": "reg:squarederror", "max_depth": 4, "eta": 0.05, "min_child_weight": 5,
          "subsample": 1.0, "colsample_bytree": 1.0, "tree_method": "exact", "nthread": 1, "seed": 0,
          "verbosity": 0}
ROUNDS = 300


class CostModelError(ValueError):
    """A cost model file that is missing, corrupt, or of another format or version."""


@dataclass(frozen=True)
class Density:
    """A layer input's density profile (profile.LayerProfile): the share of non-zeros, its
    spread over the samples, the share of channels that are all zero in an image."""

    mean: float
    std: float = 0.0
    zero_channels: float = 0.0


@dataclass(frozen=True)
class Candidate:
    """What the model is asked about: ``algorithm`` with ``knobs`` (complete, as
    Algorithm.knobs returns them) on layer ``spec`` (NCHW/OIHW, conv.Conv2DSpec) with
    ``epilogue``, on an input of ``density``, built for ``cpu``."""

    algorithm: str
    knobs: dict
    spec: Conv2DSpec
    density: Density
    cpu: CPU
    epilogue: Epilogue = field(default_factory=Epilogue)


def roofline_ms(spec: Conv2DSpec, cpu: CPU) -> float:
    """The layer's dense multiply-accumulates at every FMA unit of every core busy, at 1 GHz:
    the scale the model's target is relative to (the CPUs' clocks are not in their
    description; the constant cancels when candidates are compared)."""
    return spec.macs / (cpu.lanes * cpu.fma_units * cpu.cores) / 1e6


def _log2(v: float) -> float:
    return math.log2(max(float(v), 1e-9))


def features(c: Candidate) -> dict[str, float]:
    """The candidate's named features. Categorical ones (the algorithm, string knob values) are
    one-hot, named ``name=value``; a knob the algorithm lacks is absent (missing to XGBoost)."""
    s, cpu, k = c.spec, c.cpu, c.knobs
    x_bytes, w_bytes = 4 * math.prod(s.x_shape), 4 * math.prod(s.w_shape)
    y_bytes = 4 * math.prod(s.y_shape)
    algo = REGISTRY.get(c.algorithm)
    f = {
        f"algo={c.algorithm}": 1.0,
        "sparse": float(bool(algo and algo.sparse)),
        # the layer
        "log_c": _log2(s.in_channels // s.groups), "log_m": _log2(s.out_channels), "log_groups": _log2(s.groups),
        "log_out_pixels": _log2(s.batch * s.out_h * s.out_w), "log_in_pixels": _log2(s.batch * s.height * s.width),
        "out_w": float(s.out_w), "kernel": float(s.kernel_h * s.kernel_w), "stride": float(max(s.stride)),
        "pointwise": float((s.kernel_h, s.kernel_w) == (1, 1)), "log_macs": _log2(s.macs),
        "relu": float(c.epilogue.relu), "clip": float(c.epilogue.clip is not None),
        # its input
        "density": c.density.mean, "density_std": c.density.std, "zero_channels": c.density.zero_channels,
        "log_nonzero_macs": _log2(s.macs * max(c.density.mean, 1e-3)),
        # the CPU, and the layer's buffers against its caches (L2 per core, the activations split
        # over the cores)
        "lanes": float(cpu.lanes), "registers": float(cpu.registers), "cores": float(cpu.cores),
        "fma_units": float(cpu.fma_units),
        "compress": float(cpu.compress), "log_l1d": _log2(cpu.l1d), "log_l2": _log2(cpu.l2),
        "log_l3": _log2(max(cpu.l3, 1)),
        "x_per_l2": _log2(x_bytes / cpu.cores / cpu.l2), "y_per_l2": _log2(y_bytes / cpu.cores / cpu.l2),
        "w_per_l2": _log2(w_bytes / cpu.l2), "w_per_l1": _log2(w_bytes / cpu.l1d),
        "x_per_l3": _log2(x_bytes / max(cpu.l3, cpu.l2 * cpu.cores)),
        "channel_vectors": s.out_channels / cpu.lanes,
    }
    for name, v in sorted(k.items()):
        if name.startswith("layout_") and isinstance(v, str) and v != NCHW:
            # "blocked", not "nchw16c": the tuner's blocks are the CPU's vector width (layouts.pairs),
            # and what a log learnt of them must carry to a CPU of another width
            f[f"knob.{name}=blocked"] = 1.0
        elif isinstance(v, str):
            f[f"knob.{name}={v}"] = 1.0
        elif isinstance(v, (bool, int, float, np.integer, np.floating)):
            f[f"knob.{name}"] = float(v)
    # the knobs against the CPU: vectors per tile row, share of the registers a tile fills,
    # padding wasted on M and on the output row
    m_tile = k.get("m_tile")
    if isinstance(m_tile, (int, np.integer)) and m_tile > 0:
        f["tile_vectors"] = m_tile / cpu.lanes
        f["m_tiles"] = float(-(-s.out_channels // m_tile))
        f["m_waste"] = -(-s.out_channels // m_tile) * m_tile / s.out_channels
        pixels = k.get("block", k.get("pixels"))
        if isinstance(pixels, (int, np.integer)) and pixels > 0:
            f["tile_registers"] = pixels * m_tile / cpu.lanes / cpu.registers
            f["block_waste"] = -(-s.out_w // pixels) * pixels / s.out_w
    if algo is not None:
        try:
            # completed first: a knob a record lacks is at its default (a log may hold knob dicts
            # without dense's layout knobs)
            f["default_knobs"] = float(algo.knobs(s, None, cpu) == algo.knobs(s, dict(k), cpu))
        except ValueError:  # the layer is one the algorithm refuses: no defaults to compare with
            pass
    return f


def _matrix(rows: list[dict], names: list[str]) -> np.ndarray:
    """Rows of named features -> a float32 matrix in the order of ``names``: an absent one-hot
    is 0, an absent number missing (NaN)."""
    out = np.full((len(rows), len(names)), np.nan, np.float32)
    onehot = np.array(["=" in n for n in names])
    out[:, onehot] = 0.0
    col = {n: i for i, n in enumerate(names)}
    for i, r in enumerate(rows):
        for n, v in r.items():
            j = col.get(n)
            if j is not None:
                out[i, j] = v
    return out


def _target(ms: float, c: Candidate) -> float:
    return math.log(ms / roofline_ms(c.spec, c.cpu))


# -- training data ----------------------------------------------------------------------------

def _sha256(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@dataclass
class TrainingRun:
    """One tuning run as training data: ``rows`` (candidate, measured ms, workload id) of every
    record of its trials.jsonl that ran, each layer's spec, epilogue and density spread from its
    profile.json. ``name`` says where it came from (``shipped/<target key>/<model>`` for a
    shipped run), ``cpu`` the CPU it was measured on (the log's header, or its target's
    description for logs that predate the header's ``cpu``)."""

    name: str
    cpu: CPU
    model: str
    rows: list
    layers: dict  # workload id -> how many of the model's layers it stands for
    sha256: str
    skipped: int = 0  # records of algorithms this package does not have
    transforms: list = field(default_factory=list)  # (bytes, ms) of each layout transform it timed

    @classmethod
    def read(cls, path) -> "TrainingRun":
        """A run folder (or its trials.jsonl) with profile.json beside it."""
        path = Path(path)
        folder = path.parent if path.name == "trials.jsonl" else path
        log_path, prof_path = folder / "trials.jsonl", folder / "profile.json"
        for p in (log_path, prof_path):
            if not p.is_file():
                raise FileNotFoundError(f"{folder} is not a tuning run folder: {p.name} is missing")
        log = TuningLog.read(str(log_path))
        try:
            with open(prof_path) as f:
                layers = json.load(f)["layers"]
        except (ValueError, KeyError, TypeError) as e:
            raise TuningLogError(f"{prof_path} is not a tuner's profile.json ({e!r})") from None
        head = log.header
        cpu = CPU.from_dict(head["cpu"]) if isinstance(head.get("cpu"), dict) else cpu_of(head["target"])
        by_workload: dict[str, list[dict]] = {}
        for l in layers:
            spec = Conv2DSpec.from_dict(l["spec"])
            wid = spec_workload_id(spec, l["bias"], l["relu"], l.get("clip"), l.get("gate"), l.get("slope"))
            by_workload.setdefault(wid, []).append(l)
        rows, skipped, transforms = [], 0, []
        for r in log.records:
            if not r.get("time_ms"):
                continue
            if r["algorithm"] == TRANSFORM:  # workload "transform-NxCxHxW"
                shape = [int(v) for v in r["workload"].split("-", 1)[1].split("x")]
                transforms.append((4 * math.prod(shape), float(r["time_ms"])))
                continue
            if r["algorithm"] not in REGISTRY:
                skipped += 1
                continue
            ls = by_workload.get(r["workload"])
            if ls is None:
                raise TuningLogError(f"{log_path}: workload {r['workload']} is not a layer of {prof_path}")
            l0 = ls[0]
            d = Density(float(r.get("density", np.mean([l["density_mean"] for l in ls]))),
                        float(np.mean([l["density_std"] for l in ls])),
                        float(np.mean([l["zero_channel_share"] for l in ls])))
            ep = Epilogue(bias=l0["bias"], relu=l0["relu"], clip=l0.get("clip"), gate=l0.get("gate"),
                          slope=l0.get("slope"))
            # a re-timed candidate's label is the median of its rounds (Tuner.recheck): the single
            # time of a candidate may be a slow minute's
            rows.append((Candidate(r["algorithm"], dict(r["knobs"]), Conv2DSpec.from_dict(l0["spec"]), d, cpu, ep),
                         float(log.median_ms(r)), r["workload"]))
        try:
            name = "shipped/" + folder.resolve().relative_to(SHIPPED).as_posix()
        except ValueError:
            name = str(folder)
        return cls(name, cpu, str(head.get("model")), rows, {w: len(ls) for w, ls in by_workload.items()},
                   _sha256(log_path, prof_path), skipped, transforms)

    @property
    def cpu_key(self) -> str:
        return cpu_key(self.cpu)

    def describe(self) -> dict:
        return {"run": self.name, "model": self.model, "cpu": self.cpu.to_dict(), "records": len(self.rows),
                "sha256": self.sha256}


def cpu_key(cpu: CPU) -> str:
    """What tells CPUs apart in a leave-one-CPU-out evaluation: the CPU's name, ISA and cores (the
    AVX2 code path tuned on an AVX-512 host is another CPU: its target names another mcpu)."""
    return f"{cpu.name} ({cpu.isa}, {cpu.cores} cores)"


def shipped_runs() -> list[str]:
    """The shipped run folders (tvm_sparseconv/shipped/<target key>/<model>/ with trials.jsonl and
    profile.json), in a fixed order: the default training data."""
    return sorted(str(p.parent) for p in SHIPPED.glob("*/*/trials.jsonl") if (p.parent / "profile.json").is_file())


# -- the model --------------------------------------------------------------------------------

class CostModel:
    """A trained XGBoost booster over ``names`` (the feature columns), with the runs it was
    trained on (``trained_on``: TrainingRun.describe of each)."""

    def __init__(self, booster, names: list[str], trained_on: list[dict], params: dict, rounds: int,
                 transform_ms_per_mb: float | None = None):
        self.booster, self.names, self.trained_on = booster, list(names), list(trained_on)
        self.params, self.rounds = dict(params), int(rounds)
        self.transform_ms_per_mb = transform_ms_per_mb
        self.path: str | None = None

    @classmethod
    def train(cls, runs: list[TrainingRun], params: dict | None = None, rounds: int = ROUNDS) -> "CostModel":
        import xgboost as xgb

        rows = [(c, ms) for run in runs for c, ms, _ in run.rows]
        if not rows:
            raise ValueError("no measured candidates to train on (every log empty or failed)")
        feats = [features(c) for c, _ in rows]
        names = sorted({n for f in feats for n in f})
        y = np.array([_target(ms, c) for c, ms in rows])
        params = dict(PARAMS if params is None else params)
        booster = xgb.train(params, xgb.DMatrix(_matrix(feats, names), label=y, feature_names=names),
                            num_boost_round=rounds)
        per_mb = [ms / (b / 1e6) for run in runs for b, ms in run.transforms]
        return cls(booster, names, [r.describe() for r in runs], params, rounds,
                   float(np.median(per_mb)) if per_mb else None)

    def knows(self, algorithm: str) -> bool:
        """The training data held measurements of ``algorithm``."""
        return f"algo={algorithm}" in self.names

    def knows_isa(self, isa: str) -> bool:
        """The training data held logs of a CPU of this ISA (cpu.CPU.isa). Left out, the model
        ranked the candidates worse than the fixed rule (docs/cost-model.md: AVX2 held out,
        30.7 % regret against the rule's 20.5 %), so predict.model_plan follows the rule then."""
        return any((t.get("cpu") or {}).get("isa") == isa for t in self.trained_on)

    def transform_ms(self, nchw_shape) -> float | None:
        """Predicted ms of a layout transform of a tensor of ``nchw_shape``: its bytes at the
        median ms per MB of the transforms the logs timed (a memory-bound copy: the kernels'
        features do not apply); None when the logs timed none."""
        if self.transform_ms_per_mb is None:
            return None
        return 4 * math.prod(int(v) for v in nchw_shape) / 1e6 * self.transform_ms_per_mb

    def log_ratio(self, cands: list[Candidate]) -> np.ndarray:
        """The model's raw output per candidate: predicted log(ms / roofline_ms)."""
        import xgboost as xgb

        if not cands:
            return np.zeros(0)
        x = _matrix([features(c) for c in cands], self.names)
        return self.booster.predict(xgb.DMatrix(x, feature_names=self.names)).astype(np.float64)

    def predict_ms(self, cands: list[Candidate]) -> np.ndarray:
        """Predicted ms per candidate; NaN for an algorithm the model has no data on (knows)."""
        out = np.exp(self.log_ratio(cands)) * np.array([roofline_ms(c.spec, c.cpu) for c in cands])
        out[[not self.knows(c.algorithm) for c in cands]] = np.nan
        return out

    # -- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        import xgboost as xgb

        return {"format": MODEL_FORMAT, "version": MODEL_VERSION, "xgboost": xgb.__version__,
                "target": "log(ms / roofline_ms)", "params": self.params, "rounds": self.rounds,
                "features": self.names, "trained_on": self.trained_on, "transform_ms_per_mb": self.transform_ms_per_mb,
                "booster": json.loads(bytes(self.booster.save_raw("json")))}

    def save(self, path: str) -> None:
        """JSON, gzipped when ``path`` ends in .gz (with no time stamp: the same model, the same
        bytes)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        data = json.dumps(self.to_dict(), separators=(",", ":")).encode()
        if str(path).endswith(".gz"):
            data = gzip.compress(data, compresslevel=9, mtime=0)
        write_atomically(path, lambda f: f.write(data), binary=True)
        self.path = path

    @classmethod
    def load(cls, path) -> "CostModel":
        import xgboost as xgb

        path = str(path)
        if not os.path.isfile(path):
            raise CostModelError(f"cost model not found: {path}")
        try:
            with open(path, "rb") as f:
                data = f.read()
            d = json.loads(gzip.decompress(data) if path.endswith(".gz") else data)
        except (ValueError, UnicodeDecodeError, OSError, EOFError) as e:  # gzip's errors are OSError/EOFError
            raise CostModelError(f"{path} is not a cost model (unreadable: {e})") from None
        if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
            raise CostModelError(f"{path} is not a tvm-sparseconv cost model")
        if d.get("version") != MODEL_VERSION:
            raise CostModelError(f"{path} has cost model version {d.get('version')}; this reads {MODEL_VERSION}")
        try:
            names = [str(n) for n in d["features"]]
            booster = xgb.Booster()
            booster.load_model(bytearray(json.dumps(d["booster"]).encode()))
            if booster.num_features() != len(names):
                raise ValueError(f"the booster has {booster.num_features()} features, the file names {len(names)}")
            booster.set_param({"nthread": 1})
            per_mb = d.get("transform_ms_per_mb")
            m = cls(booster, names, d.get("trained_on") or [], d.get("params") or {}, d.get("rounds") or 0,
                    None if per_mb is None else float(per_mb))
        except (KeyError, TypeError, ValueError, xgb.core.XGBoostError) as e:
            raise CostModelError(f"{path} is a corrupt cost model ({str(e).strip().splitlines()[0][:200]})") from None
        m.path = path
        return m


def load_cost_model(path=None) -> CostModel:
    """The cost model at ``path`` (None: the shipped one); CostModelError when it is missing or
    corrupt."""
    return CostModel.load(SHIPPED_MODEL if path is None else path)


# -- inside one tuning run --------------------------------------------------------------------

MIN_TRAIN = 8  # measurements before the run's own correction is fitted


class RefitModel:
    """The tuner's model within one run: the ``prior`` (a CostModel, or None) plus a small
    XGBoost model of its error fitted to this run's measurements (``add``), refitted as they
    come. Without a prior, the run's own model alone, once it has MIN_TRAIN measurements."""

    def __init__(self, prior: CostModel | None = None, seed: int = 0):
        self.prior, self.seed = prior, seed
        self.cands: list[Candidate] = []
        self.y: list[float] = []
        self.booster = None
        self.names: list[str] = []

    def knows(self, algorithm: str) -> bool:
        """The prior has data on ``algorithm``, or this run has measured it."""
        return (self.prior is not None and self.prior.knows(algorithm)) or any(
            c.algorithm == algorithm for c in self.cands)

    def add(self, c: Candidate, ms: float) -> None:
        self.cands.append(c)
        self.y.append(_target(ms, c))
        self.booster = None

    def _base(self, cands: list[Candidate]) -> np.ndarray:
        return self.prior.log_ratio(cands) if self.prior is not None else np.zeros(len(cands))

    def _fit(self) -> None:
        import xgboost as xgb

        feats = [features(c) for c in self.cands]
        self.names = sorted({n for f in feats for n in f} | set(self.prior.names if self.prior else ()))
        dm = xgb.DMatrix(_matrix(feats, self.names), label=np.array(self.y), feature_names=self.names,
                         base_margin=self._base(self.cands))
        self.booster = xgb.train({"max_depth": 3, "eta": 0.3, "seed": self.seed, "nthread": 1, "verbosity": 0},
                                 dm, num_boost_round=20 if self.prior is not None else 40)

    def log_ratio(self, cands: list[Candidate]) -> np.ndarray | None:
        """Predicted log(ms / roofline_ms) per candidate; None with neither a prior nor MIN_TRAIN
        measurements."""
        import xgboost as xgb

        if len(self.y) < MIN_TRAIN:
            return self._base(cands) if self.prior is not None else None
        if self.booster is None:
            self._fit()
        dm = xgb.DMatrix(_matrix([features(c) for c in cands], self.names), feature_names=self.names,
                         base_margin=self._base(cands))
        return self.booster.predict(dm).astype(np.float64)

    def rank(self, cands: list[Candidate]) -> list[int]:
        """Indices of ``cands``, most promising first (in the given order while nothing predicts)."""
        pred = self.log_ratio(cands)
        if pred is None:
            return list(range(len(cands)))
        pred = pred + np.log([roofline_ms(c.spec, c.cpu) for c in cands])
        return [int(i) for i in np.argsort(pred, kind="stable")]
