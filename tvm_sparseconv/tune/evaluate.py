"""How good the cost model is, leaving one CPU out: it is trained on the other CPUs' logs only.

``offline``: on each held-out CPU's tuning logs, with no timing: per layer, whether the
candidate the predicted plan would pick (predict.py's rules, among the candidates the log
measured) is the measured fastest, and the sum of the measured times of the predicted picks
against the sum of the measured best (the regret), beside the fixed rule's. ``end_to_end``: on
this machine, the predicted plan, the tuned plan and the rule's plan of each model, compiled and
timed in interleaved rounds.
"""
from __future__ import annotations

import numpy as np

from .cost_model import PARAMS, ROUNDS, CostModel, TrainingRun
from .predict import KNOB_MARGIN, rule_choice
from .space import MARGIN, choose

TOP_K = (1, 3, 5)  # the offline table's recall@k: the measured best among the k predicted fastest


def _by_workload(run: TrainingRun) -> dict[str, list]:
    out: dict[str, list] = {}
    for c, ms, w in run.rows:
        out.setdefault(w, []).append((c, ms))
    return out


def held_out_scores(model: CostModel, runs: list[TrainingRun]) -> dict:
    """The offline scores of ``model`` on ``runs`` (logs of CPUs it was not trained on), per layer
    (a workload counts once per layer it stands for):

    layers        layers scored
    top1          share where the predicted plan's pick is the measured fastest candidate
    same_algo     share where it is of the measured fastest's algorithm
    recall@k      share where the measured fastest is among the k predicted fastest
    regret        sum of the measured ms of the picks / sum of the measured best - 1
    rule_regret   the same for the fixed rule (its algorithm's first measured config: the
                  defaults at the time of the tune, which measures them first)
    best_ms, model_ms, rule_ms   the sums
    """
    n = top1 = same = 0
    recall = {k: 0 for k in TOP_K}
    best_ms = model_ms = rule_ms = 0.0
    for run in runs:
        for w, cands in _by_workload(run).items():
            weight = run.layers.get(w, 1)
            cs = [c for c, _ in cands]
            ms = np.array([t for _, t in cands])
            pred = model.predict_ms(cs)
            known = ~np.isnan(pred)
            if not known.any():
                continue
            recs = [{"algorithm": c.algorithm, "knobs": c.knobs, "time_ms": float(p), "i": i}
                    for i, (c, p) in enumerate(zip(cs, pred)) if known[i]]
            best = int(np.argmin(ms))
            order = [int(i) for i in np.argsort(np.where(known, pred, np.inf), kind="stable")]
            rule_algo = rule_choice(cs[0].spec, None, cs[0].density.mean, cs[0].cpu)[0]
            rule = next((i for i, c in enumerate(cs) if c.algorithm == rule_algo), None)
            if rule is None:  # the log did not measure the rule's algorithm here
                continue
            # a model with no logs of this ISA leaves the plan to the rule (predict.model_plan)
            pick = choose(recs, cs[0].spec, MARGIN, cs[0].cpu, knob_margin=KNOB_MARGIN)[0]["i"] \
                if model.knows_isa(cs[0].cpu.isa) else rule
            n += weight
            top1 += weight * (pick == best)
            same += weight * (cs[pick].algorithm == cs[best].algorithm)
            for k in TOP_K:
                recall[k] += weight * (best in order[:k])
            best_ms += weight * ms[best]
            model_ms += weight * ms[pick]
            rule_ms += weight * ms[rule]
    if n == 0:
        return {"layers": 0}
    return {"layers": n, "top1": top1 / n, "same_algo": same / n, **{f"recall@{k}": recall[k] / n for k in TOP_K},
            "regret": model_ms / best_ms - 1, "rule_regret": rule_ms / best_ms - 1,
            "best_ms": best_ms, "model_ms": model_ms, "rule_ms": rule_ms}


def offline(runs: list[TrainingRun], params: dict | None = None, rounds: int = ROUNDS) -> list[dict]:
    """Leave one CPU out (TrainingRun.cpu_key), for every CPU with others to train on: one row per
    held-out CPU, {"cpu", "runs" (held out), "trained_on" (runs)} + held_out_scores."""
    rows = []
    cpus = list(dict.fromkeys(r.cpu_key for r in runs))
    for cpu in cpus:
        train = [r for r in runs if r.cpu_key != cpu]
        test = [r for r in runs if r.cpu_key == cpu]
        if not train:
            continue
        model = CostModel.train(train, params if params is not None else PARAMS, rounds)
        rows.append({"cpu": cpu, "runs": [r.name for r in test], "trained_on": [r.name for r in train],
                     **held_out_scores(model, test)})
    return rows


def end_to_end(models: list[str], runs: list[TrainingRun], target=None, images=None, tuned: dict | None = None,
               repeat: int = 10, rounds: int = 3, log=lambda s: None, inputs=None) -> dict:
    """On this machine, for each model of ``models`` (known names or .onnx paths): (a) the
    predicted plan of a cost model trained on the ``runs`` of the other CPUs than ``target``'s
    (cost_model.cpu_key), (b) the tuned plan for this CPU (``tuned[model]``, a plan file, else the
    shipped one; left out when there is none), (c) the fixed rule's plan; (a) and (c) at the
    densities of a profile of the sample inputs (``images``: names, preprocessed as the known
    model wants; ``inputs``: .npy model inputs; neither: the first two sample photos), all
    compiled and timed on the first in ``rounds`` interleaved rounds (bench.time_plans). Returns
    {"cpu", "cpu_description", "trained_on", "models": [{"model", "rows", "tuned_plan"}]}; a row's
    ``vs_tuned`` is its median over the tuned plan's."""
    from ..bench import time_plans
    from ..cpu import cpu_of
    from ..frontend import load_model
    from ..images import SAMPLE_IMAGES, load_inputs
    from ..models import known_preprocess, model_path
    from ..plan import Plan
    from ..shipped import shipped_plan
    from ..target import make_target
    from .cost_model import cpu_key
    from .predict import densities_of, model_plan, rule_plan

    target = make_target(target)
    cpu = cpu_of(target)
    train = [r for r in runs if r.cpu_key != cpu_key(cpu)]
    if not train:
        raise ValueError(f"every log given was measured on {cpu_key(cpu)}: leaving it out leaves nothing to train on")
    log(f"training on {len(train)} runs of other CPUs than {cpu_key(cpu)}")
    cost = CostModel.train(train)
    out = []
    for name in models:
        m = load_model(model_path(name))
        names = list(images or ([] if inputs else SAMPLE_IMAGES[:2]))
        samples = load_inputs(m, names, list(inputs or []), known_preprocess(name))
        densities, where = densities_of(m, samples)
        plans = {"predicted": model_plan(m, cost, target, densities, where)}
        shipped = shipped_plan(name, target)
        tuned_path, database = ((tuned or {}).get(name), None) if (tuned or {}).get(name) else (shipped or (None, None))
        if tuned_path:
            plans["tuned"] = Plan.load(tuned_path)
        else:
            log(f"{name}: no tuned plan for {cpu_key(cpu)} (none shipped, none given): its row is left out")
        plans["rule"] = rule_plan(m, target, densities, where)
        rows = time_plans(m, samples[0], plans, target, database, repeat, rounds, log)
        ref = next((r["ms"] for r in rows if r["name"] == "tuned"), None)
        for r in rows:
            r["vs_tuned"] = r["ms"] / ref if ref else None
        out.append({"model": name, "tuned_plan": tuned_path, "rows": rows})
    return {"cpu": cpu_key(cpu), "cpu_description": str(cpu), "trained_on": [r.name for r in train], "models": out}
