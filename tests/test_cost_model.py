"""The cost model (tune/cost_model.py), the predicted and rule plans (tune/predict.py), the model
search of the tuner and the leave-one-CPU-out scores (tune/evaluate.py), on the shipped logs and
small models; the shipped models' predicted plans against onnxruntime are the slow tests at the end."""
import gzip
import json
import math
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from tvm_sparseconv.algorithms import ALGORITHMS, DENSE, REGISTRY, get_algorithm
from tvm_sparseconv.algorithms.grouped import blocks_layouts
from tvm_sparseconv.cli import main
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.cpu import cpu_of
from tvm_sparseconv.frontend import load_model
from tvm_sparseconv.models import KNOWN_MODELS
from tvm_sparseconv.plan import Plan
from tvm_sparseconv.shipped import shipped_plan
from tvm_sparseconv.tune import cost_model as cm
from tvm_sparseconv.tune.log import TuningLog
from tvm_sparseconv.tune.cost_model import (Candidate, CostModel, CostModelError, Density, RefitModel, TrainingRun,
                                            load_cost_model, roofline_ms, shipped_runs)
from tvm_sparseconv.tune.evaluate import held_out_scores, offline
from tvm_sparseconv.tune.predict import (DEFAULT_FIRST, DEFAULT_LAST, KNOB_MARGIN, RULE_DENSITY, SPARSE_MAX_DENSITY,
                                         default_densities, model_plan, predict_plan, rule_choice, rule_plan)
from tvm_sparseconv.tune.space import MARGIN

from conftest import AVX2_TARGET, save_onnx, small_onnx

# a CPU no plan is shipped for: AVX2 code (it runs on AVX-512 and AVX2 hosts), on 2 cores unless
# plans for that key are shipped one day
FOREIGN = next(t for t in (AVX2_TARGET, {**AVX2_TARGET, "num-cores": 3})
               if not any(shipped_plan(m, t) for m in KNOWN_MODELS))


@pytest.fixture(scope="module")
def runs():
    return [TrainingRun.read(p) for p in shipped_runs()]


def test_shipped_model_lists_the_shipped_runs(runs):
    m = load_cost_model()
    assert [r["run"] for r in m.trained_on] == [r.name for r in runs]
    assert [r["sha256"] for r in m.trained_on] == [r.sha256 for r in runs]  # the logs as they are now
    # the CPUs and the AVX2 code path tuned on the Zen 5, every measured record of the logs
    assert {r.cpu.name for r in runs} == {"znver5", "znver4", "znver3", "rocketlake", "emeraldrapids", "haswell"}
    for r in runs:
        with open(f"{cm.SHIPPED}/{r.name.split('/', 1)[1]}/trials.jsonl") as f:
            ok = [json.loads(l) for l in f.read().splitlines()[1:] if l.strip()]
        timed = [rec for rec in ok if rec.get("time_ms")]
        assert len(r.rows) == sum(1 for rec in timed if rec["algorithm"] in REGISTRY)
        # the rest are the layouts phase's records (a transform's time: layouts.TRANSFORM), not candidates
        assert r.skipped == 0 and len(r.transforms) == sum(1 for rec in timed if rec["algorithm"] == "layout")
    per_mb = [ms / (b / 1e6) for r in runs for b, ms in r.transforms]
    assert per_mb and m.transform_ms_per_mb == pytest.approx(float(np.median(per_mb)))


def test_retrain_reproduces_the_shipped_model(runs, tmp_path):
    shipped = load_cost_model()
    cands = [c for r in runs for c, _, _ in r.rows]
    assert main(["cost-model", "train", "-o", str(tmp_path / "m.json.gz")]) == 0
    again = load_cost_model(tmp_path / "m.json.gz")
    np.testing.assert_array_equal(again.predict_ms(cands), shipped.predict_ms(cands))
    assert again.trained_on == shipped.trained_on and again.names == shipped.names
    # and its predictions are predictions: within 2x of the measured time on most of its own data
    ms = np.array([t for r in runs for _, t, _ in r.rows])
    assert np.mean(np.abs(np.log(shipped.predict_ms(cands) / ms)) < math.log(2)) > 0.9


def test_missing_or_corrupt_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(CostModelError, match="cost model not found: .*nowhere.json.gz"):
        load_cost_model(tmp_path / "nowhere.json.gz")
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(b"\x1f\x8b not gzip at all")
    with pytest.raises(CostModelError, match="bad.json.gz is not a cost model"):
        load_cost_model(bad)
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(cm.SHIPPED_MODEL.read_bytes()[:5000])  # a download cut short
    with pytest.raises(CostModelError, match="cut.json.gz is not a cost model"):
        load_cost_model(cut)
    d = json.loads(gzip.decompress(cm.SHIPPED_MODEL.read_bytes()))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**d, "format": "something-else"}))
    with pytest.raises(CostModelError, match="is not a tvm-sparseconv cost model"):
        load_cost_model(other)
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**d, "version": 99}))
    with pytest.raises(CostModelError, match="has cost model version 99"):
        load_cost_model(newer)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**d, "features": d["features"][:-3]}))
    with pytest.raises(CostModelError, match="is a corrupt cost model"):
        load_cost_model(broken)
    nobooster = tmp_path / "nobooster.json"
    nobooster.write_text(json.dumps({k: v for k, v in d.items() if k != "booster"}))
    with pytest.raises(CostModelError, match="is a corrupt cost model"):
        load_cost_model(nobooster)


def _model_with_clip_pool_and_linear_conv(path) -> str:
    """x (1, 8, 16, 16) -> conv 3x3 + bias -> clip(0, 6) -> max pool -> conv 3x3 (linear) ->
    conv 1x1 + bias -> relu -> conv 3x3 (groups 2): the inputs of the four convs are the image,
    after a ReLU6 and a pool, a linear conv's output, and after a ReLU."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype("float32"), n)
            for n, s in (("w1", (16, 8, 3, 3)), ("b1", (16,)), ("w2", (16, 16, 3, 3)), ("w3", (32, 16, 1, 1)),
                         ("b3", (32,)), ("w4", (32, 16, 3, 3)))]
    init += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Conv", ["c2", "w3", "b3"], ["c3"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("Conv", ["r3", "w4"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3], group=2)]
    return save_onnx(path, "mixed", nodes, [1, 8, 16, 16], [1, 32, 8, 8], init)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path = _model_with_clip_pool_and_linear_conv(tmp_path_factory.mktemp("mixed") / "mixed.onnx")
    return path, load_model(path)


def test_default_densities_follow_the_relus(mixed):
    _, m = mixed
    assert [s.input_relu for s in m.sites] == [False, True, False, True]
    d = [x.mean for x in default_densities(m.sites)]
    n = len(m.sites)
    expected = [1.0, DEFAULT_FIRST - (DEFAULT_FIRST - DEFAULT_LAST) * 1 / (n - 1), 1.0, DEFAULT_LAST]
    np.testing.assert_allclose(d, expected)


def test_the_rule(mixed):
    _, m = mixed
    cpu = cpu_of(FOREIGN)
    plain = m.sites[0].spec
    hybrid = get_algorithm("hybrid").knobs(plain, None, cpu)
    assert rule_choice(plain, None, RULE_DENSITY - 0.01, FOREIGN) == ("hybrid", hybrid)
    assert rule_choice(plain, None, RULE_DENSITY, FOREIGN) == ("dense", get_algorithm("dense").knobs(plain, None, cpu))
    assert rule_choice(plain, "not a constant weight", 0.1, FOREIGN) == ("direct", {})
    grouped = m.sites[3].spec
    assert grouped.groups == 2
    a, knobs = rule_choice(grouped, None, 0.1, FOREIGN)
    # a dense hand-scheduled algorithm of the registry that takes grouped layers, else TVM's conv2d
    takers = [n for n in ALGORITHMS if REGISTRY[n].groups and not REGISTRY[n].sparse and not REGISTRY[n].metaschedule]
    assert a == (takers[0] if takers else "direct")
    get_algorithm(a).check(grouped)
    plan = rule_plan(m, FOREIGN, [Density(0.2), Density(0.7), Density(0.4), Density(0.9)])
    assert [l.algorithm for l in plan.layers][:3] == ["hybrid", "dense", "hybrid"]


def test_predicted_plan_without_a_model_file_falls_back_to_the_rule(mixed, tmp_path):
    _, m = mixed
    said = []
    plan = predict_plan(m, FOREIGN, cost_model=str(tmp_path / "missing.json.gz"), log=said.append)
    assert len(said) == 1 and "cost model not found" in said[0] and "fixed rule" in said[0]
    assert plan.to_dict()["layers"] == rule_plan(m, FOREIGN).to_dict()["layers"]
    with pytest.raises(CostModelError, match="cost model not found"):
        predict_plan(m, FOREIGN, cost_model=str(tmp_path / "missing.json.gz"), fallback=False)


def _assert_valid(plan: Plan, m, target):
    """Every layer's algorithm takes its layer, with knobs it accepts (the constants build), and a
    layer the rewrite cannot touch keeps TVM's conv2d."""
    cpu = cpu_of(target)
    plan.choices(m.sites)
    for l, s in zip(plan.layers, m.sites):
        a = get_algorithm(l.algorithm)
        a.check(s.spec)
        if s.why_dense:
            assert l.algorithm == "direct"
        full = a.knobs(s.spec, l.knobs, cpu)
        assert full == l.knobs  # complete, every knob known
        if not a.metaschedule:
            a.constants(s.spec, np.zeros(s.spec.w_shape, np.float32), None, full)


def test_a_retimed_candidate_trains_on_the_median_of_its_rounds(tmp_path):
    """A tuning run whose log re-timed a candidate (Tuner.recheck) gives the cost model that
    candidate's median as its time, the others their single times."""
    import shutil

    src = shipped_runs()[0]
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = TrainingRun.read(str(run))
    log = TuningLog.read(str(run / "trials.jsonl"))
    first = next(r for r in log.records if r.get("time_ms") and r["algorithm"] in REGISTRY)
    log.append({"recheck": first["workload"], "rounds": 3, "candidates": [
        {"algorithm": first["algorithm"], "knobs": first["knobs"], "times_ms": [7.0, 9.0, 8.0]}]})
    after = TrainingRun.read(str(run))
    changed = [(a[1], b[1]) for a, b in zip(before.rows, after.rows) if a[1] != b[1]]
    assert len(after.rows) == len(before.rows) and changed == [(first["time_ms"], 8.0)]


def test_compile_without_a_plan_takes_the_predicted_one(mixed, monkeypatch):
    """tvm_sparseconv.compile(model) with neither plan nor algorithm builds the plan predicted
    for the target (not TVM's conv2d), and matches onnxruntime."""
    import tvm_sparseconv
    import tvm_sparseconv.api as api

    path, m = mixed
    asked = []
    monkeypatch.setattr(api, "predict_plan", lambda *a, **k: asked.append(a) or predict_plan(*a, **k))
    x = np.maximum(np.random.default_rng(2).standard_normal((1, 8, 16, 16)), 0).astype(np.float32)
    y = relax.VirtualMachine(tvm_sparseconv.compile(path), tvm.cpu())["main"](tvm.runtime.tensor(x))
    assert len(asked) == 1 and [s.spec for s in asked[0][0].sites] == [s.spec for s in m.sites]
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose((y if hasattr(y, "numpy") else y[0]).numpy(), ref, rtol=1e-4,
                               atol=1e-5 * float(np.abs(ref).max()))


def test_the_relax_pipeline_without_a_plan_takes_the_predicted_one(mixed, monkeypatch):
    """tvm.compile(mod, relax_pipeline="tvm_sparseconv") on a Relax module of one's own rewrites
    its convs with the plan predicted for the target, as compile(model) does, and matches
    onnxruntime."""
    import tvm_sparseconv.api as api
    from tvm_sparseconv.target import make_target

    path, m = mixed
    asked = []
    monkeypatch.setattr(api, "predict_plan", lambda *a, **k: asked.append(a) or predict_plan(*a, **k))
    ex = tvm.compile(m.mod, target=make_target(None), relax_pipeline="tvm_sparseconv", tir_pipeline="tvm_sparseconv")
    x = np.maximum(np.random.default_rng(3).standard_normal((1, 8, 16, 16)), 0).astype(np.float32)
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    assert len(asked) == 1 and [s.spec for s in asked[0][0].sites] == [s.spec for s in m.sites]
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose((y if hasattr(y, "numpy") else y[0]).numpy(), ref, rtol=1e-4,
                               atol=1e-5 * float(np.abs(ref).max()))


def test_predicted_plan_on_a_cpu_without_a_shipped_plan(mixed, tmp_path):
    path, m = mixed
    plan = predict_plan(m, FOREIGN)
    plan.save(str(tmp_path / "p.json"))
    plan = Plan.load(str(tmp_path / "p.json"))
    assert plan.model["plan"] == "predicted" and plan.cpu == cpu_of(FOREIGN).to_dict()
    _assert_valid(plan, m, FOREIGN)
    cost = load_cost_model()
    for l, s in zip(plan.layers, m.sites):
        if l.note["by"] == "cost model":  # the pick has the lowest prediction, but for the margins
            assert cost.knows(l.algorithm)
            assert l.note["predicted_ms"] <= l.note["predicted_dense_ms"] * (1 - MARGIN) or l.algorithm in DENSE
        else:  # no candidate the model knows: the grouped conv
            assert s.spec.groups > 1


@pytest.mark.parametrize("algorithm", ["dense", "hybrid", "direct"])
def test_forced_algorithm_takes_predicted_knobs(mixed, algorithm, monkeypatch):
    """predict_plan(algorithm=A), the plan of --algorithm A: the algorithms of Plan.uniform (A where
    it takes the layer, its dense fallback elsewhere), each with knobs predicted no slower than
    their defaults and no layer moved to another algorithm by the layouts; a MetaSchedule A keeps
    its own (no knobs); without a cost model, the defaults, with the error said."""
    _, m = mixed
    plan = predict_plan(m, FOREIGN, algorithm=algorithm)
    assert [l.algorithm for l in plan.layers] == [l.algorithm for l in Plan.uniform(m.sites, algorithm).layers]
    assert plan.model["plan"] == f"all {algorithm}, predicted knobs"
    _assert_valid(plan, m, FOREIGN)
    assert not any("nchw_algorithm" in l.note for l in plan.layers)
    cost, cpu = load_cost_model(), cpu_of(FOREIGN)
    for l, s, d in zip(plan.layers, m.sites, default_densities(m.sites)):
        a = get_algorithm(l.algorithm)
        if a.metaschedule:
            assert l.knobs == {}
            continue
        assert l.note["by"] == "cost model"
        picked = l.note.get("nchw_knobs", l.knobs)  # the tile chosen in NCHW, before the layouts
        t = cost.predict_ms([Candidate(l.algorithm, k, s.spec, d, cpu, s.epilogue())
                             for k in (picked, a.knobs(s.spec, None, cpu))])
        assert t[0] <= t[1] + 1e-12
    said = []
    monkeypatch.setattr(cm, "SHIPPED_MODEL", "/nonexistent/cost_model.json.gz")
    plain = predict_plan(m, FOREIGN, algorithm=algorithm, log=said.append)
    assert plain.model["plan"] == f"all {algorithm}, default knobs" and len(said) == 1 and "default knobs" in said[0]
    assert [(l.algorithm, l.knobs) for l in plain.layers] == \
        [(l.algorithm, l.knobs) for l in Plan.uniform(m.sites, algorithm).layers]


def test_predictions_pick_the_lowest_among_the_candidates():
    """On a ResNet-like 3x3 layer, the predicted plan's pick is the candidate with the lowest
    prediction unless a default or dense one is within the margins."""
    from tvm_sparseconv.tune.space import candidates, choose

    cost = load_cost_model()
    cpu = cpu_of(FOREIGN)
    spec = Conv2DSpec.from_shapes((1, 256, 28, 28), (256, 256, 3, 3), 1, 1)
    pool = [(a, k) for a, ks in candidates(spec, None, ALGORITHMS, FOREIGN, 6, False) if cost.knows(a) for k in ks]
    for d in (0.1, 0.95):
        pred = cost.predict_ms([Candidate(a, k, spec, Density(d), cpu) for a, k in pool])
        lowest = float(pred.min())
        best, _ = choose([{"algorithm": a, "knobs": k, "time_ms": float(t)} for (a, k), t in zip(pool, pred)],
                         spec, MARGIN, FOREIGN, knob_margin=KNOB_MARGIN)
        assert best["time_ms"] * (1 - KNOB_MARGIN) * (1 - MARGIN) <= lowest + 1e-12
    # sparser input, lower predicted time for the sparse kernels: what the data says
    h = [(a, k) for a, k in pool if a == "hybrid"][0]
    t = cost.predict_ms([Candidate(*h, spec, Density(d), cpu) for d in (0.1, 0.9)])
    assert t[0] < t[1]


class _Oracle:
    """A 'model' that predicts the measured times (sign=1) or their reverse order (sign=-1)."""

    def __init__(self, runs, sign):
        self.t = {(id(c)): ms for r in runs for c, ms, _ in r.rows}
        self.sign = sign

    def predict_ms(self, cands):
        return np.array([self.t[id(c)] ** self.sign for c in cands])

    def knows_isa(self, isa):
        return True


def test_offline_scores_measure_what_they_say(runs):
    znver = [r for r in runs if r.cpu.name == "znver5"]
    perfect = held_out_scores(_Oracle(znver, 1), znver)
    assert perfect["recall@1"] == 1.0
    # every layer whose log measured the fixed rule's algorithm (a tune with --top-k may not have)
    scored = 0
    for r in znver:
        by_w = {}
        for c, _, w in r.rows:
            by_w.setdefault(w, []).append(c)
        scored += sum(r.layers[w] for w, cs in by_w.items()
                      if rule_choice(cs[0].spec, None, cs[0].density.mean, cs[0].cpu)[0] in {c.algorithm for c in cs})
    assert perfect["layers"] == scored > 0
    # the margins keep a default or dense pick within them of the best
    assert 0 <= perfect["regret"] <= 1 / ((1 - KNOB_MARGIN) * (1 - MARGIN)) - 1
    worst = held_out_scores(_Oracle(znver, -1), znver)
    assert worst["recall@1"] == 0.0 and worst["regret"] > perfect["regret"]
    # the rule's regret does not depend on the model
    assert worst["rule_regret"] == perfect["rule_regret"] > 0
    rows = offline(runs)
    assert sorted(r["cpu"] for r in rows) == sorted({r.cpu_key for r in runs})
    for r in rows:
        assert all(t not in r["trained_on"] for t in r["runs"])  # never trained on the held-out CPU
        assert 0 <= r["top1"] <= r["recall@3"] <= r["recall@5"] <= 1 and r["regret"] >= 0


def test_refit_learns_this_run(runs):
    """Measurements of this run correct the prior: a prior trained on one CPU, refitted on some of
    the other's measurements, predicts those better than alone."""
    rocket = [r for r in runs if r.cpu.name == "rocketlake"]
    znver_vgg = [r for r in runs if r.cpu.name == "znver5" and r.model == "vgg16-tumor"][0]
    prior = CostModel.train(rocket)
    refit = RefitModel(prior)
    cands = [c for c, _, _ in znver_vgg.rows]
    ms = np.array([t for _, t, _ in znver_vgg.rows])
    for c, t in zip(cands, ms):
        refit.add(c, t)
    err = lambda pred: np.mean(np.abs(pred - np.log(ms / [roofline_ms(c.spec, c.cpu) for c in cands])))  # noqa: E731
    assert err(refit.log_ratio(cands)) < 0.8 * err(prior.log_ratio(cands))
    assert refit.knows("hybrid") and not RefitModel(None).knows("hybrid")
    assert RefitModel(None).rank(cands[:3]) == [0, 1, 2]  # nothing to rank by yet: as given


def test_model_search_picks(tmp_path, monkeypatch):
    """The tuner's model search: the top_k by prediction, a dense one, every unknown algorithm's
    defaults, explore random others; the same picks again (a resumed run repeats nothing)."""
    from tvm_sparseconv.tune.tuner import TuneConfig, Tuner
    from tvm_sparseconv.tune.workloads import Workload

    m = load_model(small_onnx(tmp_path / "small.onnx"))
    cfg = TuneConfig(top_k=3, explore=2, knob_trials=2, refine=False)
    t = Tuner(m, [], str(tmp_path / "run"), FOREIGN, cfg)
    assert t.cfg.search == "model" and t.cost.prior is not None
    spec = Conv2DSpec.from_shapes((1, 64, 28, 28), (64, 64, 3, 3), 1, 1)
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(spec.x_shape), 0.6).astype(np.float32) - 0.6
    w = Workload("w", spec, True, ["conv000"], rng.standard_normal(spec.w_shape).astype(np.float32), None, x,
                 float(np.count_nonzero(x) / x.size), [float(np.count_nonzero(x) / x.size)])
    cands = t.candidates(w)
    picks = t.picks(w, cands)
    assert picks == t.picks(w, cands)
    pool = [(a, k) for a, ks in cands for k in ks]
    known = [p for p in pool if t.cost.knows(p[0])]
    pred = t.cost.log_ratio([t._candidate(w, *p) for p in known])
    ranked = [known[i] for i in np.argsort(pred, kind="stable")]
    assert picks[:3] == ranked[:3]
    assert any(a in DENSE for a, _ in picks)
    for a, ks in cands:
        if not t.cost.knows(a):
            assert (a, ks[0]) in picks
    extra = 1 if not any(a in DENSE for a, _ in ranked[:3]) else 0
    unknown = sum(not t.cost.knows(a) for a, _ in cands)
    assert len(picks) == min(len(pool), 3 + extra + unknown + 2)
    assert len({json.dumps(p, sort_keys=True) for p in picks}) == len(picks)
    # without a usable model file the search is the exhaustive one, said once
    said = []
    shutil.copy(cm.SHIPPED_MODEL, tmp_path / "copy.json.gz")
    t2 = Tuner(m, [], str(tmp_path / "run2"), FOREIGN, TuneConfig(cost_model=str(tmp_path / "copy.json.gz")))
    assert t2.cfg.search == "model"
    with pytest.raises(CostModelError):
        Tuner(m, [], str(tmp_path / "run3"), FOREIGN, TuneConfig(cost_model=str(tmp_path / "none.json.gz")))
    monkeypatch.setattr(cm, "SHIPPED_MODEL", tmp_path / "none.json.gz")
    t4 = Tuner(m, [], str(tmp_path / "run4"), FOREIGN, TuneConfig(), log=said.append)
    assert t4.cfg.search == "exhaustive" and any("cost model not found" in s for s in said)


def test_compile_with_an_unreadable_cost_model_named_is_an_error(mixed, tmp_path, capsys):
    path, _ = mixed
    (tmp_path / "bad.json.gz").write_bytes(b"junk")
    rc = main(["compile", path, "--target", json.dumps(FOREIGN), "--cost-model", str(tmp_path / "bad.json.gz"),
               "-o", str(tmp_path / "m.so")])
    assert rc == 2 and "bad.json.gz is not a cost model" in capsys.readouterr().err
    assert not (tmp_path / "m.so").exists()


# -- slow: predicted plans compiled and run against onnxruntime ------------------------------

def _ort_conv_input_densities(path, x) -> list[float]:
    """Exact non-zero shares of every Conv input, by onnxruntime (independent of TVM)."""
    g = onnx.load(path)
    names = [n.input[0] for n in g.graph.node if n.op_type == "Conv"]
    have = {o.name for o in g.graph.output}
    for nm in dict.fromkeys(names):
        if nm not in have:
            g.graph.output.append(helper.make_tensor_value_info(nm, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {g.graph.input[0].name: x})))
    return [np.count_nonzero(outs[nm]) / outs[nm].size for nm in names]


def _run_exported(lib, x):
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


@pytest.mark.slow
def test_compile_command_predicts_from_the_inputs_given(mixed, tmp_path, capsys, monkeypatch):
    """compile on a CPU without a shipped plan: the densities of the --inputs given (as onnxruntime
    counts them), one line saying so, the library matching onnxruntime, and so with --algorithm
    dense; without a cost model, the fixed rule, with the error said."""
    path, m = mixed
    x = np.maximum(np.random.default_rng(1).standard_normal((1, 8, 16, 16)), 0).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    tol = 1e-5 * float(np.abs(ref).max())  # float32 sums of up to 144 terms, in another order
    lib = tmp_path / "m.so"
    assert main(["compile", path, "--target", json.dumps(FOREIGN), "--inputs", str(tmp_path / "x.npy"),
                 "-o", str(lib)]) == 0
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "predicted" in l]
    assert len(lines) == 1 and "profile of 1 sample input" in lines[0] and "tvm-sparseconv tune" in lines[0]
    np.testing.assert_allclose(_run_exported(lib, x), ref, rtol=1e-4, atol=tol)
    # --algorithm dense: all dense, with the knobs and layouts predicted for the target
    assert main(["compile", path, "--target", json.dumps(FOREIGN), "--algorithm", "dense",
                 "-o", str(tmp_path / "d.so")]) == 0
    err = capsys.readouterr().err
    assert "--algorithm dense: dense 3, grouped 1" in err and "knobs and layouts predicted by the cost model" in err
    np.testing.assert_allclose(_run_exported(tmp_path / "d.so", x), ref, rtol=1e-4, atol=tol)
    plan = predict_plan(m, FOREIGN, [x])
    np.testing.assert_allclose([l.note["density"] for l in plan.layers], _ort_conv_input_densities(path, x),
                               atol=1e-6)
    monkeypatch.setattr(cm, "SHIPPED_MODEL", tmp_path / "gone.json.gz")
    assert main(["compile", path, "--target", json.dumps(FOREIGN), "-o", str(tmp_path / "r.so")]) == 0
    err = capsys.readouterr().err
    assert "tvm-sparseconv: error: cost model not found" in err and "fixed rule" in err
    sidecar = json.loads((tmp_path / "r.so.json").read_text())
    expected = [rule_choice(s.spec, s.why_dense, d.mean, FOREIGN)[0]
                for s, d in zip(m.sites, default_densities(m.sites))]
    assert [sidecar["layers"][s.key] for s in m.sites] == expected
    np.testing.assert_allclose(_run_exported(tmp_path / "r.so", x), ref, rtol=1e-4, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16-tumor", "resnet50-nsfw", "mobilenet-v2"])
def test_predicted_plan_of_every_shipped_model(name, tmp_path):
    """The predicted plan (default densities) of each shipped model on a CPU with no shipped plan:
    valid, compiled, and its exported library matches onnxruntime on a real photo."""
    import tvm_sparseconv
    from tvm_sparseconv.compile import build_isolated
    from tvm_sparseconv.images import load_inputs
    from tvm_sparseconv.models import known_preprocess, model_path

    assert shipped_plan(name, FOREIGN) is None
    m = load_model(model_path(name))
    plan = tvm_sparseconv.predict_plan(m, FOREIGN)
    plan.save(str(tmp_path / "plan.json"))
    plan = Plan.load(str(tmp_path / "plan.json"))
    _assert_valid(plan, m, FOREIGN)
    assert {l.algorithm for l in plan.layers} - {"direct"}  # the kernels of the package, not TVM's alone
    x = load_inputs(m, ["skimage:chelsea"], preprocess=known_preprocess(name))[0]
    b = build_isolated(m, plan, FOREIGN, path=str(tmp_path / "m.so"))
    assert b.applied == {l.key: l.algorithm for l in plan.layers}
    y = _run_exported(tmp_path / "m.so", x)
    ref = ort.InferenceSession(m.onnx_path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(np.argmax(y, axis=-1), np.argmax(ref, axis=-1))


@pytest.mark.slow
def test_evaluate_end_to_end_runs_the_three_plans(mixed, runs, tmp_path, capsys):
    """cost-model evaluate --end-to-end on a small model: the predicted, tuned and rule plans, each
    compiled and run, their outputs agreeing (the times are not checked: they are the lead's)."""
    path, m = mixed
    x = np.maximum(np.random.default_rng(2).standard_normal((1, 8, 16, 16)), 0).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    from tvm_sparseconv.compile import resolve_plan

    resolve_plan(m, None, "dense", FOREIGN).save(str(tmp_path / "tuned.json"))
    rc = main(["cost-model", "evaluate", "--end-to-end", "--models", path, "--inputs", str(tmp_path / "x.npy"),
               "--tuned", f"{path}={tmp_path / 'tuned.json'}", "--target", json.dumps(FOREIGN), "--rounds", "1",
               "--repeat", "1", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert {r["cpu"] for r in res["offline"]} == {r.cpu_key for r in runs}
    e2e = res["end_to_end"]
    held_out = cm.cpu_key(cpu_of(FOREIGN))
    assert e2e["cpu"] == held_out and e2e["trained_on"] == [r.name for r in runs if r.cpu_key != held_out]
    (row,) = e2e["models"]
    assert [r["name"] for r in row["rows"]] == ["predicted", "tuned", "rule"]
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for r in row["rows"]:
        assert r["ms"] > 0 and r["max_abs_error"] <= 2e-5 * float(np.abs(ref).max())
    assert next(r for r in row["rows"] if r["name"] == "tuned")["vs_tuned"] == 1.0


def test_a_model_without_logs_of_the_targets_isa_leaves_the_plan_to_the_rule(runs, mixed):
    """Trained on AVX-512 CPUs only, the model ranked the AVX2 log's candidates worse than the
    fixed rule (docs/cost-model.md), so on an AVX2 target model_plan is the rule's plan, saying
    why, and the offline score of that CPU is the rule's."""
    avx512 = [r for r in runs if r.cpu.isa == "avx512"]
    avx2 = [r for r in runs if r.cpu.isa == "avx2"]
    model = CostModel.train(avx512)
    assert model.knows_isa("avx512") and not model.knows_isa("avx2")
    _, m = mixed
    plan = model_plan(m, model, AVX2_TARGET)
    want = rule_plan(m, AVX2_TARGET)
    assert plan.model["plan"] == "rule" and "no logs of an avx2 CPU" in plan.model["why"]
    assert [(l.algorithm, l.knobs) for l in plan.layers] == [(l.algorithm, l.knobs) for l in want.layers]
    scores = held_out_scores(model, avx2)
    assert scores["layers"] > 0 and scores["regret"] == scores["rule_regret"]
    # with logs of its ISA the model's own picks count
    assert CostModel.train(runs).knows_isa("avx2")


def _blocked(c: Candidate) -> bool:
    return any(c.knobs.get(k, "nchw") != "nchw" for k in ("layout_in", "layout_out"))


@pytest.mark.parametrize("blocked_speed", [0.5, 1.02, 2.0])
def test_predicted_layouts_follow_the_predictions_and_the_plan_runs(mixed, monkeypatch, blocked_speed, tmp_path):
    """The predicted plan's layouts phase: with blocked candidates predicted twice as fast, the
    layers that take them (dense; grouped in groups of whole vectors) go to channel blocks
    (their NCHW knobs in the note, as the tuner keeps them), and the plan compiles and matches
    onnxruntime; predicted 2 % slower, a tie (within MARGIN), each of them writes blocks;
    predicted twice as slow, every layer stays NCHW."""
    from tvm_sparseconv.compile import build

    path, m = mixed
    cost = load_cost_model()
    assert cost.transform_ms_per_mb > 0  # the shipped logs timed transforms
    real = CostModel.predict_ms
    tie = 1 < blocked_speed < 1 + MARGIN  # every candidate alike, blocked ones that much slower

    def predict_ms(self, cands):
        return (np.ones(len(cands)) if tie else real(self, cands)) * [blocked_speed if _blocked(c) else 1 for c in cands]

    monkeypatch.setattr(CostModel, "predict_ms", predict_ms)
    monkeypatch.setattr(CostModel, "transform_ms", lambda self, shape: 1e-6)
    plan = model_plan(m, cost, AVX2_TARGET)
    _assert_valid(plan, m, AVX2_TARGET)
    moved = [l for l in plan.layers if "nchw_knobs" in l.note]
    dense = [l for l in plan.layers if l.algorithm == "dense"]
    # dense layers, and a grouped one whose groups are whole vectors (32 channels in 2 groups:
    # 16 outputs a group, two AVX2 vectors)
    takers = [l for l in plan.layers if l in dense or (l.algorithm == "grouped" and blocks_layouts(
        Conv2DSpec.from_dict(l.spec), cpu_of(AVX2_TARGET).lanes))]
    offered = [l for l in plan.layers if "blocks_knobs" in l.note]  # for refine's "all blocks" build
    if blocked_speed > 1 + MARGIN:
        assert not moved and plan.model["layouts"].startswith("nchw (channel blocks predicted")
        assert offered == takers and all(get_algorithm(l.algorithm).layouts(
            Conv2DSpec.from_dict(l.spec), l.note["blocks_knobs"]) == ("nchw8c", "nchw8c") for l in offered)
        return
    assert not offered
    how = "a tie: all blocks" if tie else "the least predicted"
    assert dense and moved == takers and plan.model["layouts"].startswith(f"{len(takers)} of {len(takers)} layers in channel blocks ({how})")
    assert all(l.knobs["layout_out"] == "nchw8c" if tie else "nchw8c" in (l.knobs["layout_in"], l.knobs["layout_out"])
               for l in moved)
    x = np.maximum(np.random.default_rng(3).standard_normal((1, 8, 16, 16)), 0).astype(np.float32)
    if cpu_of(None).isa in ("avx2", "avx512"):  # AVX2 code runs on both kinds of host
        y = build(m, plan, AVX2_TARGET).vm()["main"](tvm.runtime.tensor(x)).numpy()
        ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=2e-5 * float(np.abs(ref).max()))  # sums of ~1000


def test_a_model_whose_logs_timed_no_transform_keeps_nchw(mixed, runs):
    _, m = mixed
    model = CostModel.train([r for r in runs if r.cpu.isa == "avx2"])
    model.transform_ms_per_mb = None  # as a model file from before the transforms were learnt
    plan = model_plan(m, model, AVX2_TARGET)
    assert plan.model["layouts"] == "nchw (the cost model's logs timed no layout transform)"
    assert not any("nchw_knobs" in l.note for l in plan.layers)


def test_no_sparse_algorithm_is_predicted_on_an_input_without_zeros(tmp_path, monkeypatch):
    """A sparse kernel skips only zeros: above SPARSE_MAX_DENSITY the predicted plan takes none of
    them, even when the cost model predicts one far faster (an extrapolation: no shipped log has
    a sparse win there); below it the prediction decides, and a forced sparse algorithm stays."""
    m = load_model(small_onnx(tmp_path / "small.onnx"))
    cost = load_cost_model()
    real = CostModel.predict_ms
    monkeypatch.setattr(CostModel, "predict_ms", lambda self, cands: real(self, cands) * np.array(
        [0.1 if get_algorithm(c.algorithm).sparse else 1.0 for c in cands]))
    n = len(m.sites)
    dense_in = model_plan(m, cost, AVX2_TARGET, [Density(1.0)] * n)
    assert all(not get_algorithm(l.algorithm).sparse for l in dense_in.layers)
    edge = model_plan(m, cost, AVX2_TARGET, [Density(SPARSE_MAX_DENSITY)] * n)
    sparse_in = model_plan(m, cost, AVX2_TARGET, [Density(0.5)] * n)
    for plan in (edge, sparse_in):
        assert all(get_algorithm(l.algorithm).sparse for l in plan.layers)
    forced = model_plan(m, cost, AVX2_TARGET, [Density(1.0)] * n, algorithm="hybrid")
    assert [l.algorithm for l in forced.layers] == ["hybrid"] * n
