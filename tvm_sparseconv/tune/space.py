"""What the tuner considers for a layer and how it picks among timed candidates.

Both the tuner (measured times) and the predicted plan (a cost model's times, predict.py) go
through here, so that a predicted plan picks among the candidates a tune would measure, by the
rules a tune would pick by.
"""
from __future__ import annotations

from ..algorithms import DENSE, METASCHEDULE, get_algorithm, knob_space, supports
from ..conv import Conv2DSpec
from ..layout import NCHW

KNOB_TRIALS = 6     # configs measured per (workload, hand-scheduled kernel) by an exhaustive tune
MARGIN = 0.03       # the share by which sparse must beat dense, and knobs their defaults (choose)
TOP_K, EXPLORE = 4, 1  # the model search: per workload, the best predicted and the random others measured
POOL_PER_TRIAL = 4  # a hand-scheduled kernel's pool: this many configs per measured one
RECHECK_BAND, RECHECK_MOST = 0.25, 6  # re-timed in rounds: up to this many within this share of the fastest


def in_nchw(algorithm: str, spec: Conv2DSpec, knobs: dict) -> bool:
    """The candidate reads and writes NCHW (Algorithm.layouts). The tiles are searched and chosen
    in NCHW; the tuner's layouts phase (layouts.py) weighs channel blocks with their transforms."""
    return get_algorithm(algorithm).layouts(spec, knobs) == (NCHW, NCHW)


def candidates(spec: Conv2DSpec, why_dense: str | None, algorithms, target, knob_trials: int,
               metaschedule: bool) -> list[tuple[str, list[dict]]]:
    """[(algorithm, its candidate knob dicts)] for one layer: every algorithm of ``algorithms``
    that takes it; a hand-scheduled kernel's first ``POOL_PER_TRIAL * knob_trials`` configs of
    its knob space in NCHW (in_nchw; the defaults first); a MetaSchedule algorithm ({} only)
    when ``metaschedule`` (a database exists: untuned TE loops are 10-100x slow)."""
    out = []
    for a in algorithms:
        if not supports(a, spec, why_dense):
            continue
        if a in METASCHEDULE:
            if metaschedule:
                out.append((a, [{}]))
        else:
            space = [k for k in knob_space(a, spec, target) if in_nchw(a, spec, k)]
            out.append((a, space[: max(1, knob_trials) * POOL_PER_TRIAL]))
    return out


def settled(recs: list[dict], spec, margin: float, target) -> list[dict]:
    """Per algorithm among the timed records of one workload, its fastest, or its defaults'
    unless another knob config beats them by ``margin``: a layer timed alone ranks configs
    within a few percent by noise, and the defaults encode what holds in a model (dense's gemm
    split: the same alone, up to 1.8x apart in ResNet-50)."""
    out = []
    for a in dict.fromkeys(r["algorithm"] for r in recs):
        mine = [r for r in recs if r["algorithm"] == a]
        best = min(mine, key=lambda r: r["time_ms"])
        defaults = get_algorithm(a).knobs(spec, None, target)
        base = next((r for r in mine if _completed(a, spec, r["knobs"], target) == defaults), None)
        if base is not None and best["time_ms"] > base["time_ms"] * (1 - margin):
            best = base
        out.append(best)
    return out


def _completed(algorithm: str, spec, knobs: dict, target) -> dict | None:
    """``knobs`` with the defaults of those it lacks (a log may hold knob dicts without dense's
    layout knobs), None if the algorithm refuses them."""
    try:
        return get_algorithm(algorithm).knobs(spec, knobs, target)
    except ValueError:
        return None


def contenders(recs: list[dict], spec, target, band: float = RECHECK_BAND, most: int = RECHECK_MOST) -> list[dict]:
    """The timed records in NCHW of one layer that the tuner re-times in interleaved rounds
    (Tuner.recheck) before it chooses: the ``most`` fastest within ``band`` of the fastest, then
    the fastest dense one and the defaults' record of each algorithm among them (``choose``
    weighs every candidate against both). Empty when that is fewer than two.

    The band is wide because a single time can be that far off: on a VM, the same layer was
    logged at 14 and at 27 ms a minute apart."""
    timed = sorted((r for r in recs if r.get("time_ms") and r["time_ms"] < float("inf")
                    and in_nchw(r["algorithm"], spec, r["knobs"])), key=lambda r: r["time_ms"])
    if not timed:
        return []
    out = [r for r in timed if r["time_ms"] <= timed[0]["time_ms"] * (1 + band)][:most]
    extra = [next((r for r in timed if r["algorithm"] in DENSE), None)]
    for a in dict.fromkeys(r["algorithm"] for r in out):
        defaults = get_algorithm(a).knobs(spec, None, target)
        extra.append(next((r for r in timed if r["algorithm"] == a
                           and _completed(a, spec, r["knobs"], target) == defaults), None))
    for r in extra:
        if r is not None and all(r is not o for o in out):
            out.append(r)
    return out if len(out) > 1 else []


def choose(recs: list[dict], spec, margin: float, target,
           knob_margin: float | None = None) -> tuple[dict | None, dict | None]:
    """(the chosen record, the fastest dense one) among the timed records ``recs`` of one layer
    ({"algorithm", "knobs", "time_ms"}) in NCHW (in_nchw): the fastest after ``settled`` with
    ``knob_margin`` (default: ``margin``), a sparse one only when it beats the fastest dense one
    by ``margin``. (None, None) when there is none."""
    recs = settled([r for r in recs if r.get("time_ms") and in_nchw(r["algorithm"], spec, r["knobs"])], spec,
                   margin if knob_margin is None else knob_margin, target)
    if not recs:
        return None, None
    best = min(recs, key=lambda r: r["time_ms"])
    dense = [r for r in recs if r["algorithm"] in DENSE]
    best_dense = min(dense, key=lambda r: r["time_ms"]) if dense else None
    if best_dense is not None and best["time_ms"] > best_dense["time_ms"] * (1 - margin):
        best = best_dense
    return best, best_dense


def dense_alternative(best: dict, best_dense: dict | None) -> dict | None:
    """The knobs (in NCHW) of the dense kernel to try in place of ``best`` when ``best`` (a
    record of ``choose``) is sparse: ``best_dense``'s when it is the dense kernel, else None.
    Kept in the plan layer's note as "dense_knobs": the tuner's refine tries them inside the
    model, and the predicted layouts in channel blocks."""
    if best_dense is None or best_dense["algorithm"] != "dense" or not get_algorithm(best["algorithm"]).sparse:
        return None
    return best_dense["knobs"]
