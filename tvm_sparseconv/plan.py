"""The plan: which algorithm (and knobs) each conv layer of a model uses. Versioned JSON.

{"format": "tvm-sparseconv-plan", "version": 2, "target": {...}, "cpu": {...}, "model": {...},
 "layers": [{"key": "conv000", "spec": {...}, "algorithm": "halo", "knobs": {...}}, ...]}

"cpu" is the description (cpu.CPU) of the CPU the plan was made for: lanes, registers,
caches, cores. Layers are matched by key and checked against their shapes and attributes (at any
batch: a plan tuned at batch 1 applies at batch 8); a plan made for another model fails with an
error naming the first layer that differs.

A layer's activation layouts are knobs of its algorithm (dense, grouped: "layout_in", "layout_out",
"nchw" or "nchw{cb}c", layout.py); ``Plan.layouts`` reads them. Version 2 is version 1 with
those knobs: a version-1 plan loads, every layer in NCHW. Layouts that do not chain (a layer
reads blocks its producer does not write) are not refused: the model rewrite inserts the
transform (passes/rewrite_conv2d.py, layout_transforms lists them).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace

from .algorithms import ALGORITHMS, dense_fallback, get_algorithm, supports
from .conv import Conv2DSpec
from .graph import ConvSite
from .passes import LayerChoice

PLAN_FORMAT = "tvm-sparseconv-plan"
PLAN_VERSION = 2
READS_VERSIONS = (1, 2)  # version 1: no layout knobs (every layer NCHW)


class PlanError(ValueError):
    """A plan file that is corrupt, of another version, or made for another model."""


@dataclass
class PlanLayer:
    key: str
    spec: dict
    algorithm: str
    knobs: dict = field(default_factory=dict)
    note: dict = field(default_factory=dict)  # e.g. measured density and times, for people


@dataclass
class Plan:
    layers: list[PlanLayer]
    target: dict | None = None
    model: dict = field(default_factory=dict)
    cpu: dict | None = None  # CPU.to_dict() of the CPU it was made for

    # -- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "target": self.target, "cpu": self.cpu,
                "model": self.model, "layers": [asdict(l) for l in self.layers]}

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)  # never leave a half-written plan

    @classmethod
    def load(cls, path: str) -> "Plan":
        if not os.path.isfile(path):
            raise PlanError(f"plan file not found: {path}")
        try:
            with open(path) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{path} is not a plan (invalid JSON: {e})") from e
        return cls.from_dict(d, path)

    @classmethod
    def from_dict(cls, d, where: str = "plan") -> "Plan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"{where} is not a tvm-sparseconv plan (format is {d.get('format') if isinstance(d, dict) else type(d).__name__!r})")
        if d.get("version") not in READS_VERSIONS:
            raise PlanError(f"{where} has plan version {d.get('version')}; this tvm-sparseconv reads versions "
                            f"{', '.join(map(str, READS_VERSIONS))}")
        layers = []
        for i, l in enumerate(d.get("layers") or []):
            try:
                pl = PlanLayer(str(l["key"]), dict(l["spec"]), str(l["algorithm"]), dict(l.get("knobs") or {}),
                               dict(l.get("note") or {}))
                Conv2DSpec.from_dict(pl.spec)
            except (KeyError, TypeError, ValueError) as e:
                raise PlanError(f"{where}: layer entry {i} is malformed: {e!r}") from e
            if pl.algorithm not in ALGORITHMS:
                raise PlanError(f"{where}: layer {pl.key} names unknown algorithm {pl.algorithm!r}")
            layers.append(pl)
        cpu = d.get("cpu")
        if cpu is not None and not isinstance(cpu, dict):
            raise PlanError(f"{where}: 'cpu' must be an object, got {type(cpu).__name__}")
        return cls(layers, d.get("target"), dict(d.get("model") or {}), cpu)

    # -- making and applying --------------------------------------------------------------
    @classmethod
    def uniform(cls, sites: list[ConvSite], algorithm: str, target=None, model: dict | None = None) -> "Plan":
        """``algorithm`` on every layer that it supports; elsewhere algorithms.dense_fallback (the
        hand-scheduled dense kernel that takes the layer: grouped for a depthwise conv under
        ``algorithm="dense"``; TVM's conv2d where none does)."""
        get_algorithm(algorithm)  # an unknown name is an error, even with no layer to take
        layers = [PlanLayer(s.key, s.spec.to_dict(), algorithm if supports(algorithm, s.spec, s.why_dense)
                            else dense_fallback(s.spec, s.why_dense)) for s in sites]
        return cls(layers, target, model or {})

    def with_batch(self, batch: int) -> "Plan":
        """The same choices for the model run on ``batch`` images at once: every layer's spec
        (and the model's input shape, when recorded) with that batch, the knobs as they are
        (each is still checked against its layer when the plan is applied)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise PlanError(f"batch must be a positive int, got {batch!r}")
        layers = [PlanLayer(l.key, {**l.spec, "batch": batch}, l.algorithm, dict(l.knobs), dict(l.note))
                  for l in self.layers]
        model = dict(self.model)
        if model.get("input_shape"):
            model["input_shape"] = [batch, *model["input_shape"][1:]]
        return Plan(layers, self.target, model, self.cpu)

    def other_cpu(self, cpu) -> str | None:
        """Why the plan was not made for ``cpu`` (cpu.CPU): it records another CPU name, ISA,
        vector width or core count; None when it records none. Its knobs and layouts compute
        the same on any CPU, but they were chosen for that one (a Zen 4 plan's 16-lane channel
        blocks with AVX2 code ran ResNet-50-half at 0.57x the all-dense build)."""
        made = self.cpu or {}
        keys = ("name", "isa", "lanes", "cores")
        if not made or all(made.get(k) == getattr(cpu, k) for k in keys):
            return None
        return (f"the plan was made for {made.get('name')} ({made.get('isa')}, {made.get('lanes')} lanes, "
                f"{made.get('cores')} cores), the target is {cpu}: its knobs and layouts were chosen for that "
                f"CPU (tvm-sparseconv tune makes a plan for this one; no plan: the cost model's)")

    def layouts(self) -> dict[str, tuple[str, str]]:
        """{layer key: (layout of its input, of its output and residual)} as the knobs say;
        ("nchw", "nchw") for a layer without layout knobs."""
        return {l.key: get_algorithm(l.algorithm).layouts(Conv2DSpec.from_dict(l.spec), l.knobs) for l in self.layers}

    def choices(self, sites: list[ConvSite]) -> dict[str, LayerChoice]:
        """Check the plan against the model's layers (at any batch); key -> LayerChoice."""
        by_key = {s.key: s for s in sites}
        for pl in self.layers:
            s = by_key.get(pl.key)
            if s is None:
                raise PlanError(f"the plan's layer {pl.key} does not exist in this model ({len(sites)} conv layers)")
            # a plan applies at any batch: the knobs do not depend on it (each is still checked
            # against its layer when the plan is applied)
            if replace(Conv2DSpec.from_dict(pl.spec), batch=s.spec.batch) != s.spec:
                raise PlanError(f"layer {pl.key} differs from the plan: the model has {s.spec}, the plan "
                                f"{Conv2DSpec.from_dict(pl.spec)} (a plan for another model?)")
        return {pl.key: LayerChoice(pl.algorithm, pl.knobs) for pl in self.layers}
