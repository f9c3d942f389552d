"""A plan without tuning: per layer, the candidate the cost model predicts fastest.

``predict_plan`` takes each conv layer's input density from a profile of sample inputs (or,
without any, ``default_densities``), asks the cost model (cost_model.py) for the time of every
candidate a tune would measure on the layer (space.candidates: every registered hand-scheduled
algorithm that takes the layer, the first configs of its knob space), and picks among the
predictions by the tuner's own rules (space.choose: a sparse kernel only when it beats the best
dense one by the margin; non-default knobs only when they beat the defaults by KNOB_MARGIN).

Without a cost model (missing or corrupt file) or for a layer whose algorithms it has no data
on, the fixed rule decides (``rule_choice``): hybrid below density RULE_DENSITY, the dense kernel
at or above, a registered dense hand-scheduled algorithm where neither takes the layer (grouped
convs), TVM's conv2d where none does. The rule is also the evaluation's baseline (evaluate.py).
docs/cost-model.md documents both.
"""
from __future__ import annotations

import json

import numpy as np

from ..algorithms import ALGORITHMS, DENSE, REGISTRY, dense_fallback, get_algorithm
from ..cpu import cpu_of
from ..frontend import Model, load_model
from ..layout import NCHW
from ..passes import LayoutGraph
from ..plan import Plan, PlanLayer
from ..target import make_target, target_key
from .cost_model import Candidate, CostModel, CostModelError, Density, load_cost_model
from .layouts import assign, assignment_cost, blocked_notes, blocked_outputs, fastest_per_pair, layout_options
from .space import KNOB_TRIALS, MARGIN, candidates, choose, dense_alternative, supports

RULE_DENSITY = 0.5  # the fixed rule: hybrid below this input density, the dense kernel at or above
RULE_SPARSE, RULE_DENSE = "hybrid", "dense"
# default input density of a layer fed by a ReLU (graph.ConvSite.input_relu), without sample
# inputs: DEFAULT_FIRST at the model's first layer falling linearly to DEFAULT_LAST at its last
# (a least-squares line through the shipped profiles of VGG-16 and ResNet-50: 0.745 - 0.399 x
# depth); 1.0 for any other input (the image, a linear bottleneck's output)
DEFAULT_FIRST, DEFAULT_LAST = 0.75, 0.35
KNOB_MARGIN = 0.10  # non-default knobs must beat the defaults by this share: a prediction is rougher
                    # than a measurement, and the defaults carry what was measured in models
# above this input density the predicted plan takes no sparse algorithm: a sparse kernel skips
# only zeros, so there it saves at most 5 % of the dense work and still encodes the whole input.
# In every shipped log the fastest sparse candidate above density 0.89 was slower than the
# fastest dense one (1.2x or more above 0.95); a prediction otherwise is the cost model
# extrapolating (a YOLO-like net's 256->512 3x3 after a LeakyReLU, density 1.0: hybrid predicted
# 8 % faster on the Emerald Rapids, measured 1.4x slower). A tune still measures them.
SPARSE_MAX_DENSITY = 0.95


def default_densities(sites) -> list[Density]:
    """The documented default density of each conv layer's input (module docstring)."""
    n = len(sites)
    out = []
    for i, s in enumerate(sites):
        depth = i / (n - 1) if n > 1 else 0.0
        out.append(Density(DEFAULT_FIRST - (DEFAULT_FIRST - DEFAULT_LAST) * depth if s.input_relu else 1.0))
    return out


def rule_choice(spec, why_dense: str | None, density: float, target=None) -> tuple[str, dict]:
    """(algorithm, knobs) of the fixed rule for one layer: RULE_SPARSE (its default knobs) below
    RULE_DENSITY, RULE_DENSE at or above; where neither takes the layer, the first registered dense
    hand-scheduled algorithm that does; "direct" (TVM's conv2d) where none does."""
    for a in ((RULE_SPARSE,) if density < RULE_DENSITY else ()) + (RULE_DENSE,):
        if a in REGISTRY and supports(a, spec, why_dense):
            return a, get_algorithm(a).knobs(spec, None, target)
    a = dense_fallback(spec, why_dense)
    return a, (get_algorithm(a).knobs(spec, None, target) if a != "direct" else {})


def densities_of(model: Model, images) -> tuple[list[Density], str]:
    """Each conv layer's input density profile and where it came from: a profile of ``images``
    (model inputs), or default_densities when there are none. The densities are the model's,
    not the CPU's: the profile runs on this machine, whatever CPU the plan is for."""
    if images is None or len(images) == 0:
        return default_densities(model.sites), "defaults (docs/cost-model.md)"
    from ..profile import profile

    layers, _, _ = profile(model, list(images), None)
    return ([Density(l.density_mean, l.density_std, l.zero_channel_share) for l in layers],
            f"profile of {len(images)} sample input{'s' * (len(images) != 1)}")


def _plan(model: Model, layers: list[PlanLayer], target, info: dict) -> Plan:
    s = str(target)
    return Plan(layers, json.loads(s) if s.startswith("{") else None,
                {"source": model.source, "input_shape": list(model.input_shape), **info}, cpu_of(target).to_dict())


def _rule_layer(s, d: Density, target) -> PlanLayer:
    a, knobs = rule_choice(s.spec, s.why_dense, d.mean, target)
    return PlanLayer(s.key, s.spec.to_dict(), a, knobs, {"density": d.mean, "by": "rule"})


def rule_plan(model: Model, target=None, densities: list[Density] | None = None,
              densities_from: str = "defaults (docs/cost-model.md)", why: str = "no cost model") -> Plan:
    """The fixed rule's plan (rule_choice per layer) at ``densities`` (default_densities when None);
    ``why`` the rule and not the cost model (recorded in the plan)."""
    target = make_target(target)
    dens = densities if densities is not None else default_densities(model.sites)
    return _plan(model, [_rule_layer(s, d, target) for s, d in zip(model.sites, dens)], target,
                 {"plan": "rule", "why": why, "densities": densities_from})


def uniform_plan(model: Model, algorithm: str, target=None, why: str = "") -> Plan:
    """Plan.uniform of ``algorithm`` (its default knobs, NCHW) with the model's info and the
    target's CPU, ``why`` not predicted (recorded in the plan)."""
    target = make_target(target)
    p = Plan.uniform(model.sites, algorithm, None, {})
    return _plan(model, p.layers, target, {"plan": f"all {algorithm}, default knobs", "why": why})


def _default_layer(s, d: Density, algorithm: str, target) -> PlanLayer:
    """Plan.uniform's choice for one layer under a forced ``algorithm``, with its default knobs."""
    a = _allowed(s, algorithm)[0]
    knobs = {} if get_algorithm(a).metaschedule else get_algorithm(a).knobs(s.spec, None, target)
    return PlanLayer(s.key, s.spec.to_dict(), a, knobs, {"density": d.mean, "by": "defaults"})


def _allowed(s, algorithm: str | None, density: float = 0.0) -> tuple[str, ...]:
    """The algorithms a layer may take: every registered one (the dense ones alone above an
    input ``density`` of SPARSE_MAX_DENSITY), or with a forced ``algorithm`` that one where it
    takes the layer, else its dense fallback (Plan.uniform's choice)."""
    if algorithm is None:
        return ALGORITHMS if density <= SPARSE_MAX_DENSITY else DENSE
    return (algorithm if supports(algorithm, s.spec, s.why_dense) else dense_fallback(s.spec, s.why_dense),)


def model_plan(model: Model, cost: CostModel, target=None, densities: list[Density] | None = None,
               densities_from: str = "defaults (docs/cost-model.md)", knob_trials: int = KNOB_TRIALS,
               algorithm: str | None = None) -> Plan:
    """The cost model's plan at ``densities`` (default_densities when None): per layer, among the
    candidates a tune would measure (space.candidates with ``knob_trials``) that the model has
    data on (no sparse one above an input density of SPARSE_MAX_DENSITY), the one space.choose
    picks by the predicted times, with a note of its predicted ms
    and the best dense one's; the rule where the model knows no candidate of the layer, and on
    every layer when its logs hold no CPU of the target's ISA (CostModel.knows_isa).

    With ``algorithm`` (what ``--algorithm`` asks for), the candidates are that algorithm's on
    every layer it takes and its dense fallback's elsewhere (as Plan.uniform places them), and
    the cost model picks only their knobs and layouts; the defaults stand where it has no data
    (an ISA or an algorithm it has no logs of, a MetaSchedule algorithm)."""
    target = make_target(target)
    cpu = cpu_of(target)
    if algorithm is not None:
        get_algorithm(algorithm)  # an unknown name is an error
    if not cost.knows_isa(cpu.isa):
        why = f"the cost model has no logs of an {cpu.isa} CPU"
        return (rule_plan(model, target, densities, densities_from, why) if algorithm is None
                else uniform_plan(model, algorithm, target, why))
    sites = model.sites
    dens = densities if densities is not None else default_densities(sites)
    pools, asks = [], []
    spaces: dict = {}  # identical layers share their candidates
    for s, d in zip(sites, dens):
        allowed = _allowed(s, algorithm, d.mean)
        key = (s.spec, s.why_dense, allowed)
        if key not in spaces:
            spaces[key] = [(a, k) for a, ks in candidates(s.spec, s.why_dense, allowed, target, knob_trials, False)
                           if cost.knows(a) for k in ks]
        pools.append(spaces[key])
        asks += [Candidate(a, k, s.spec, d, cpu, s.epilogue()) for a, k in spaces[key]]
    pred = cost.predict_ms(asks) if asks else np.zeros(0)
    layers, at = [], 0
    for s, d, pool in zip(sites, dens, pools):
        ms = pred[at:at + len(pool)]
        at += len(pool)
        recs = [{"algorithm": a, "knobs": k, "time_ms": float(t)} for (a, k), t in zip(pool, ms)]
        best, best_dense = choose(recs, s.spec, MARGIN, target, knob_margin=KNOB_MARGIN)
        if best is None:
            layers.append(_rule_layer(s, d, target) if algorithm is None else _default_layer(s, d, algorithm, target))
            continue
        note = {"density": d.mean, "by": "cost model", "predicted_ms": best["time_ms"],
                "predicted_dense_ms": best_dense["time_ms"] if best_dense else None}
        alternative = dense_alternative(best, best_dense)
        if alternative is not None:
            note["dense_knobs"] = alternative
        layers.append(PlanLayer(s.key, s.spec.to_dict(), best["algorithm"], best["knobs"], note))
    layouts = predicted_layouts(model, layers, cost, cpu, dens, algorithm is None)
    return _plan(model, layers, target, {"plan": "predicted" if algorithm is None else f"all {algorithm}, predicted knobs",
                                         "densities": densities_from, "layouts": layouts,
                                         "cost_model": cost.path or "in memory", "target_key": target_key(target)})


def predicted_layouts(model: Model, layers: list[PlanLayer], cost: CostModel, cpu, densities: list[Density],
                      change_algorithm: bool = True) -> str:
    """The tuner's layouts phase (tune/layouts.py) on predicted times: each layer whose
    algorithm takes channel blocks, and dense in blocks for a sparse layer (from its note's
    "dense_knobs"), gets each (layout_in, layout_out) pair's candidates predicted
    (layouts.layout_options, layouts.fastest_per_pair), each transform
    CostModel.transform_ms, and layouts.assign chooses for the whole model. ``layers`` are
    changed in place (a blocked layer's NCHW knobs kept in its note, as the tuner keeps them)
    to that assignment when it is predicted faster than all NCHW by MARGIN; but a tie goes to
    blocks: every layer writing blocks on its own algorithm (layouts.blocked_outputs) when that
    is predicted within MARGIN of the choice. A layer left in NCHW keeps its knobs in blocks in
    its note for refine's builds in blocks (layouts.blocked_notes). Without
    ``change_algorithm`` (a forced algorithm), a layer keeps its algorithm (no dense in blocks
    for a sparse one). Returns what was done, for the plan's info."""
    if cost.transform_ms_per_mb is None:
        return "nchw (the cost model's logs timed no layout transform)"
    sites = {s.key: s for s in model.sites}
    dens = {s.key: d for s, d in zip(model.sites, densities)}
    cands, asks = {}, []  # layer key -> [(algorithm, pair, knobs)]
    for l in layers:
        s = sites[l.key]
        known = cost.knows if change_algorithm else (lambda a, own=l.algorithm: a == own and cost.knows(a))
        options = layout_options(s.spec, s.why_dense, l.algorithm, l.knobs, l.note.get("dense_knobs", {}), cpu, known)
        if options:
            cands[l.key] = [(a, pair, k) for a, pairs in options.items() for pair, ks in pairs.items() for k in ks]
            asks += [Candidate(a, k, s.spec, dens[l.key], cpu, s.epilogue()) for a, _, k in cands[l.key]]
    if not cands:
        return "nchw (no layer takes channel blocks)"
    by_key = {l.key: l for l in layers}
    pred, at, pick = cost.predict_ms(asks), 0, {}
    for key, pool in cands.items():
        timed: dict = {}  # algorithm -> {pair: (ms, knobs)}
        for (a, pair, k), ms in zip(pool, pred[at:at + len(pool)]):
            if np.isfinite(ms) and ms < timed.setdefault(a, {}).get(pair, (np.inf,))[0]:
                timed[a][pair] = (float(ms), k)
        at += len(pool)
        l = by_key[key]
        pick[key] = fastest_per_pair(l.algorithm, l.knobs, l.note.get("predicted_ms"), timed)
    layer_ms = {k: {pair: v[0] for pair, v in pk.items()} for k, pk in pick.items()}
    plan = Plan(layers, None, {}, cpu.to_dict())
    graph = LayoutGraph(model.mod["main"], plan.choices(model.sites), model.sites)
    transform_ms = lambda shape, src, dst: cost.transform_ms(shape)
    least, least_ms = assign(graph, layer_ms, transform_ms)
    nchw = assignment_cost(graph, layer_ms, transform_ms)
    chosen, total, how = (least, least_ms, "the least predicted") if least_ms < (1 - MARGIN) * nchw else ({}, nchw, "")
    # A tie goes to blocks: inside a model the blocked kernels gained on NCHW what the predicted
    # times (of kernels timed alone) do not show (VGG-16 and a YOLO-like net on the Emerald
    # Rapids: all blocks 5-15 % faster end to end where it was predicted within 3 %)
    blocks = assign(graph, blocked_outputs({l.key: l.algorithm for l in layers if l.key in pick}, pick),
                    transform_ms)[0]
    blocks_ms = assignment_cost(graph, layer_ms, transform_ms, blocks)
    if blocks and blocks != chosen and blocks_ms < (1 + MARGIN) * total:
        chosen, total, how = blocks, blocks_ms, "a tie: all blocks"
    blocked = [k for k, pair in chosen.items() if pair != (NCHW, NCHW)]
    for l in layers:  # refine builds those left in NCHW in blocks too (refine.in_blocks, refine.with_dense)
        if l.key in pick and l.key not in blocked:
            l.note = {**l.note, **blocked_notes(l.algorithm, pick[l.key])}
    if not blocked:
        return f"nchw (channel blocks predicted {min(least_ms, blocks_ms):.3f} ms against {nchw:.3f} ms)"
    for l in layers:
        if l.key in blocked:
            ms, algorithm, knobs = pick[l.key][chosen[l.key]]
            l.note = {**l.note, "nchw_knobs": l.knobs, "predicted_ms": ms}
            if algorithm != l.algorithm:
                l.note["nchw_algorithm"] = l.algorithm
            l.algorithm, l.knobs = algorithm, knobs
    return (f"{len(blocked)} of {len(pick)} layers in channel blocks ({how}), {len(graph.transforms(chosen))} "
            f"transforms (predicted {total:.3f} ms against {nchw:.3f} ms all NCHW)")


def predict_plan(model, target=None, images=None, cost_model=None, fallback: bool = True,
                 log=lambda s: None, algorithm: str | None = None) -> Plan:
    """A plan for ``model`` (a Model, or what load_model takes) on ``target`` (None: this CPU)
    without measuring any kernel: model_plan, or rule_plan without a cost model.

    ``images``: model inputs (arrays of the model's input shape, as images.load_inputs makes
    them) to profile the densities on; None: default_densities. ``cost_model``: a CostModel or
    the path of one (None: the shipped model). When the model file is missing or corrupt, the
    CostModelError is told to ``log`` and the plan is the fixed rule's, unless ``fallback`` is
    False: then it is raised.

    ``algorithm``: the plan of ``--algorithm``: that algorithm on every layer it takes (its dense
    fallback elsewhere) with the knobs and layouts the cost model predicts (model_plan); without
    a cost model, its default knobs (Plan.uniform). A dense algorithm's time does not depend on
    the input, so ``images`` are profiled only for a sparse one."""
    m = model if isinstance(model, Model) else load_model(model)
    target = make_target(target)
    try:
        cost = cost_model if isinstance(cost_model, CostModel) else load_cost_model(cost_model)
    except CostModelError as e:
        if not fallback:
            raise
        log(f"{e}; the plan follows the fixed rule instead: {RULE_SPARSE} below input density {RULE_DENSITY}, "
            f"{RULE_DENSE} above (docs/cost-model.md)" if algorithm is None else
            f"{e}; {algorithm} takes its default knobs")
        cost = None
    if algorithm is not None and cost is None:
        return uniform_plan(m, algorithm, target, "no cost model")
    if algorithm is not None and not get_algorithm(algorithm).sparse:
        images = None
    densities, where = densities_of(m, images)
    if cost is None:
        return rule_plan(m, target, densities, where)
    return model_plan(m, cost, target, densities, where, algorithm=algorithm)
