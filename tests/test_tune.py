"""The autotuner on a small real model (the first layers of the real ResNet-50)."""
import json
import os
import time
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

from tvm_sparseconv.algorithms import get_algorithm
from tvm_sparseconv.api import compile as tvms_compile
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.plan import Plan
from tvm_sparseconv.tune.log import TuningLog, TuningLogError
from tvm_sparseconv.tune.report import write_report
from tvm_sparseconv.tune.space import choose, contenders, settled
from tvm_sparseconv.tune.tuner import BUDGET_SHARES, TuneConfig, Tuner

from conftest import free_port

pytestmark = pytest.mark.slow


def run_tuner(m, xs, run_dir, log=lambda s: None, **cfg):
    cfg.setdefault("refine", False)  # tested on its own: it compiles the model 5 times
    cfg.setdefault("layouts", False)  # tested on its own: tests/test_nchwc_tune.py
    cfg.setdefault("search", "exhaustive")  # a known number of candidates per algorithm (the model
    # search: test_model_search_measures_top_k)
    cfg.setdefault("recheck_rounds", 2)  # the phase runs in every tune here; its rounds in test_recheck_*
    t = Tuner(m, xs, str(run_dir), config=TuneConfig(**cfg), model_name="r50_first3", log=log)
    return t, t.run()


def test_tune_produces_database_log_plan_that_compile_and_run(small_model, tmp_path):
    path, m, xs = small_model
    t, plan = run_tuner(m, xs, tmp_path / "run", trials=6, knob_trials=2,
                        algorithms=("direct", "dense", "halo", "cpo"))
    files = set(os.listdir(tmp_path / "run"))
    assert {"trials.jsonl", "plan.json", "profile.json", "report.md", "time_per_layer.png",
            "density_per_layer.png", "memory_per_algorithm.png", "database"} <= files
    assert os.path.getsize(tmp_path / "run" / "database" / "database_tuning_record.json") > 0
    # the selection picks the measured fastest, or a dense one / an algorithm's defaults that
    # the fastest does not beat by the margin (test_selection_margins)
    for l in plan.layers:  # by the times the selection saw: the recheck's medians where it ran
        recs = [r for r in t.trials.timed(l.note["workload"]) if r.get("time_ms")]
        assert best_time(recs) >= l.note["time_ms"] * 0.97 ** 2
    ex = tvms_compile(m, plan=str(tmp_path / "run" / "plan.json"), database=str(tmp_path / "run" / "database"))
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs[0])).numpy()
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: xs[0]})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)


def test_model_search_measures_top_k(small_model, tmp_path):
    """The default search: per workload the cost model's top_k, a dense one and explore others,
    far fewer than every algorithm's knobs; the plan it makes compiles and matches onnxruntime."""
    path, m, xs = small_model
    said = []
    t, plan = run_tuner(m, xs, tmp_path / "run", log=said.append, search="model", top_k=2, explore=1,
                        knob_trials=3, algorithms=("dense", "halo", "pixcsr", "hybrid"))
    per = {}
    for r in t.trials.records:
        per.setdefault(r["workload"], []).append(r)
    # the second pass's picks (top_k, a dense one, explore), and the first pass's two where the
    # model, corrected by their times, no longer picks them (Tuner.measure)
    assert per and all(len(rs) <= 2 + 1 + 1 + 2 for rs in per.values())
    assert all(any(r["algorithm"] == "dense" for r in rs) for rs in per.values())  # the margin has a dense time
    assert t.cost.prior is not None and len(t.cost.y) == sum(1 for r in t.trials.records if r.get("time_ms"))
    ex = tvms_compile(m, plan=plan)
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs[0])).numpy()
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: xs[0]})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)
    # resumed: the same picks, nothing measured again
    t2, _ = run_tuner(m, xs, tmp_path / "run", search="model", top_k=2, explore=1, knob_trials=3,
                      algorithms=("dense", "halo", "pixcsr", "hybrid"))
    assert len(t2.trials.records) == len(t.trials.records)


def test_model_search_measures_every_workload_before_the_rest_of_any(small_model, tmp_path):
    """The measure phase's first pass gives each workload its best predicted candidate and a
    dense one before any workload gets a third: a budget cut then leaves none unmeasured."""
    path, m, xs = small_model
    t, _ = run_tuner(m, xs, tmp_path / "run", search="model", top_k=2, explore=1, knob_trials=3,
                     algorithms=("dense", "halo", "pixcsr", "hybrid"), recheck_rounds=0)
    recs = [r for r in t.trials.records if "workload" in r]
    order = [r["workload"] for r in recs]
    firsts = [order.index(w) for w in dict.fromkeys(order)]
    thirds = [i for i, w in enumerate(order) if order[:i + 1].count(w) == 3]
    assert len(firsts) > 1 and thirds and max(firsts) < min(thirds)
    first_pass = recs[:max(firsts) + 2]  # the last workload's first pick, then its dense one
    assert all(any(r["algorithm"] == "dense" for r in first_pass if r["workload"] == w) for w in dict.fromkeys(order))


def test_budget_spent_gives_each_phase_its_share_and_unmeasured_layers_dense(small_model, tmp_path):
    """--budget-minutes: a phase stops starting measurements at its share of the budget
    (BUDGET_SHARES); a layer left unmeasured takes the dense kernel's defaults, not TVM's
    untuned conv2d, and the plan still matches onnxruntime."""
    path, m, xs = small_model
    said = []
    t, plan = run_tuner(m, xs, tmp_path / "run", log=said.append, search="model", budget_minutes=1e-9,
                        layouts=True, algorithms=("dense", "halo", "pixcsr"))
    assert not [r for r in t.trials.records if "workload" in r and not r["workload"].startswith("transform-")]
    assert {l.algorithm for l in plan.layers} == {"dense"} and all(l.note["time_ms"] is None for l in plan.layers)
    ex = tvms_compile(m, plan=plan)
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs[0])).numpy()
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: xs[0]})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)
    t.cfg = replace(t.cfg, budget_minutes=10)
    t.start = time.monotonic() - 60 * 10 * (BUDGET_SHARES["measure"] + BUDGET_SHARES["recheck"]) / 2
    assert t.spent("measure") and not t.spent("recheck") and not t.spent("layouts")
    t.cfg = replace(t.cfg, budget_minutes=None)
    assert not t.spent("layouts")


def best_time(recs):
    return min(r["time_ms"] for r in recs)


def test_selection_margins():
    """An algorithm keeps its default knobs unless another config beats them by the margin."""
    spec = Conv2DSpec.from_shapes((1, 128, 56, 56), (32, 128, 1, 1))
    dflt = get_algorithm("dense").knobs(spec, None)
    other = {**dflt, "split": "m_outer" if dflt["split"] == "row_outer" else "row_outer"}
    halo = get_algorithm("halo").knobs(spec, None)

    def rec(a, knobs, ms):
        return {"algorithm": a, "knobs": knobs, "time_ms": ms}

    close = [rec("dense", dflt, 1.0), rec("dense", other, 0.98), rec("halo", {**halo, "block": 2}, 2.0)]
    assert settled(close, spec, 0.03, None) == [close[0], close[2]]  # no halo defaults measured: its fastest
    far = [rec("dense", dflt, 1.0), rec("dense", other, 0.96)]
    assert settled(far, spec, 0.03, None) == [far[1]]
    assert settled(close, spec, 0.0, None) == [close[1], close[2]]


def test_recheck_contenders_and_the_times_the_selection_sees(tmp_path):
    """The candidates re-timed in rounds are those within the band of the fastest, the fastest
    dense one and their algorithms' defaults; their medians replace every single time logged
    before the recheck, and decide the choice."""
    spec = Conv2DSpec.from_shapes((1, 64, 28, 28), (64, 64, 3, 3))
    hd, dd = get_algorithm("hybrid").knobs(spec, None), get_algorithm("dense").knobs(spec, None)
    h2 = {**hd, "rows": 4 if hd["rows"] != 4 else 2}
    p2 = {**get_algorithm("pixcsr").knobs(spec, None), "rows": 1}

    def rec(a, knobs, ms):
        return {"workload": "w", "algorithm": a, "knobs": knobs, "time_ms": ms}

    recs = [rec("hybrid", h2, 1.0), rec("hybrid", hd, 1.2), rec("pixcsr", p2, 1.3), rec("dense", dd, 2.0),
            {**rec("halo", get_algorithm("halo").knobs(spec, None), None), "error": "LLVM ERROR"}]
    assert contenders(recs, spec, None) == recs[:2] + [recs[3]]  # pixcsr is past the band; halo failed
    assert contenders(recs, spec, None, band=0.5, most=1) == [recs[0], recs[3], recs[1]]
    assert contenders(recs[3:4], spec, None) == []  # one alone has nothing to be ranked against

    log = TuningLog(str(tmp_path / "t.jsonl"), {"model": "m", "target": "t"})
    for r in recs:
        log.append(r)
    assert choose(log.timed("w"), spec, 0.03, None)[0]["knobs"] == h2  # alone: 1.0 against 1.2 ms
    log.append({"recheck": "w", "rounds": 3, "candidates": [
        {"algorithm": "hybrid", "knobs": h2, "times_ms": [1.5, 1.4, 1.6]},
        {"algorithm": "hybrid", "knobs": hd, "times_ms": [1.3, 1.2, 1.25]},
        {"algorithm": "dense", "knobs": dd, "error": "wrong result"}]})
    log.append(rec("pixcsr", {**p2, "rows": 2}, 1.1))  # measured after the recheck (a resume with more budget)
    timed = TuningLog(log.path, {"model": "m", "target": "t"}).timed("w")  # read back from the file
    assert [(r["knobs"], r["time_ms"]) for r in timed] == [(h2, 1.5), (hd, 1.25), ({**p2, "rows": 2}, 1.1)]
    assert timed[0]["single_ms"] == 1.0 and timed[0]["rounds_ms"] == [1.5, 1.4, 1.6]
    back = TuningLog(log.path, {"model": "m", "target": "t"})
    assert [back.median_ms(r) for r in recs[:3]] == [1.5, 1.25, 1.3]  # pixcsr was not re-timed
    assert choose(timed, spec, 0.03, None)[0]["algorithm"] == "pixcsr"
    assert choose(timed[:2], spec, 0.03, None)[0]["knobs"] == hd  # in rounds, the defaults were faster
    # the layouts phase's recheck (its own rounds of pairs) is the later time of a candidate, but
    # the selection's times stay those of its own recheck: a resumed run selects as the first did
    log.append({"recheck": "w", "phase": "layouts", "rounds": 2, "candidates": [
        {"algorithm": "hybrid", "knobs": hd, "times_ms": [0.9, 0.7]}]})
    back = TuningLog(log.path, {"model": "m", "target": "t"})
    assert back.median_ms(recs[1]) == 0.8 and back.median_ms(recs[0]) == 1.5
    assert back.timed("w") == timed and set(back.layout_rechecks) == {"w"}
    failed = TuningLog(str(tmp_path / "f.jsonl"), {"model": "m", "target": "t"})
    failed.append(recs[0])
    failed.append({"recheck": "w", "rounds": 3, "candidates": [{"algorithm": "hybrid", "knobs": h2, "error": "x"}]})
    assert failed.timed("w") == [recs[0]]  # the job failed as a whole: the single times stand
    with open(failed.path, "a") as f:
        f.write(json.dumps({"recheck": "w", "candidates": [{"algorithm": "hybrid"}]}) + "\n")
    with pytest.raises(TuningLogError, match="line 4 is not a recheck record"):
        TuningLog(failed.path, {"model": "m", "target": "t"})
    other = TuningLog(str(tmp_path / "o.jsonl"), {"model": "m", "target": "t"})
    other.append({"recheck": "w", "phase": "refine", "rounds": 3, "candidates": []})
    with pytest.raises(TuningLogError, match="line 2 is not a recheck record"):
        TuningLog(other.path, {"model": "m", "target": "t"})


def test_recheck_times_close_candidates_in_rounds_and_resumes(small_model, tmp_path):
    """A tune re-times each layer's close candidates in interleaved rounds in one worker job, logs
    every round, chooses by their medians, and a resumed run re-times nothing again."""
    _, m, xs = small_model
    cfg = dict(knob_trials=3, algorithms=("dense", "hybrid"), recheck_rounds=3)
    said = []
    t, plan = run_tuner(m, xs, tmp_path / "run", log=said.append, **cfg)
    assert t.trials.rechecks, "no layer had two candidates within the band"
    for wid, (_, rec) in t.trials.rechecks.items():
        assert rec["rounds"] == 3 and len(rec["candidates"]) >= 2
        assert all(len(c["times_ms"]) == 3 and min(c["times_ms"]) > 0 for c in rec["candidates"])
    for l in plan.layers:
        if l.note["workload"] in t.trials.rechecks:
            cands = t.trials.rechecks[l.note["workload"]][1]["candidates"]
            mine = next(c for c in cands if c["algorithm"] == l.algorithm and c["knobs"] == l.knobs)
            assert l.note["time_ms"] == pytest.approx(float(np.median(mine["times_ms"])))
    lines = (tmp_path / "run" / "trials.jsonl").read_text().count('"recheck"')
    t2, plan2 = run_tuner(m, xs, tmp_path / "run", **cfg)
    assert (tmp_path / "run" / "trials.jsonl").read_text().count('"recheck"') == lines
    assert plan2.to_dict() == plan.to_dict()


def test_time_in_rounds_keeps_going_past_a_failing_candidate():
    """A candidate that fails its build or check in the recheck job is reported as failed; the
    others are still timed in every round."""
    from tvm_sparseconv.conv import Epilogue
    from tvm_sparseconv.reference.dense import dense_conv2d
    from tvm_sparseconv.tune.jobs import time_in_rounds

    spec = Conv2DSpec.from_shapes((1, 16, 10, 10), (16, 16, 3, 3), padding=1)
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(spec.x_shape), 0).astype(np.float32)
    w = rng.standard_normal(spec.w_shape).astype(np.float32)
    ref = dense_conv2d(spec, x, w)
    out = time_in_rounds([("no-such-kernel", {}, None), ("pixcsr", {}, None), ("dense", {}, None)], spec, w, None,
                         Epilogue(), "llvm", x, ref, 1e-3, 1, "warm", 3, None)
    assert "no-such-kernel" in out[0]["error"]
    assert [len(o["times_ms"]) for o in out[1:]] == [3, 3] and min(out[1]["times_ms"] + out[2]["times_ms"]) > 0


def test_resume_repeats_no_finished_measurement(small_model, tmp_path):
    path, m, xs = small_model
    cfg = dict(knob_trials=2, algorithms=("dense", "halo"))
    t1, p1 = run_tuner(m, xs, tmp_path / "run", refine=True, **cfg)
    n1 = len(t1.trials.records)
    # an interrupted run: the last measurement cut short mid-line
    with open(tmp_path / "run" / "trials.jsonl", "a") as f:
        f.write('{"workload": "x", "algo')
    said = []
    t2, p2 = run_tuner(m, xs, tmp_path / "run", log=said.append, refine=True, **cfg)
    assert len(t2.trials.records) == n1  # nothing measured again, the cut line dropped, with a warning
    assert any(s.endswith("trials.jsonl: its last line was cut short by an interrupt; dropped (23 bytes)")
               for s in said)
    assert any("reusing refine.json" in s for s in said) and p2.to_dict() == p1.to_dict()  # nor refined again
    # refine built the plan the cost model predicts at the profiled densities beside the plan's
    # variants, unless it was the plan
    pred = t1._predicted()
    assert [l.key for l in pred.layers] == [s.key for s in m.sites]
    rep = json.load(open(tmp_path / "run" / "refine.json"))
    assert ("predicted" in [b["name"] for b in rep["builds"]]) == (
        [[l.key, l.algorithm, l.knobs] for l in pred.layers] != rep["base"])
    assert "## Refine" in (tmp_path / "run" / "report.md").read_text()
    (tmp_path / "run" / "refine.json").write_text('{"builds": [')  # cut short
    assert "refine.json is unreadable" in open(write_report(str(tmp_path / "run"))).read()
    t3, _ = run_tuner(m, xs, tmp_path / "run", knob_trials=3, algorithms=("dense", "halo"))
    keys = [(r["workload"], r["algorithm"], json.dumps(r["knobs"], sort_keys=True)) for r in t3.trials.records]
    assert len(keys) == len(set(keys)) > n1  # only the new candidates were measured


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_cache_mode_is_recorded_and_not_mixed(small_model, tmp_path, cache):
    _, m, xs = small_model
    t, plan = run_tuner(m, xs, tmp_path / "run", knob_trials=1, algorithms=("dense", "pixcsr"), cache=cache)
    assert t.trials.header["cache"] == cache
    assert all(r["time_ms"] > 0 for r in t.trials.records)  # every candidate ran and passed the check
    assert {l.algorithm for l in plan.layers} <= {"dense", "pixcsr"}
    with pytest.raises(TuningLogError, match=f"made for cache '{cache}', not 'fresh': resume with --cache {cache}"):
        run_tuner(m, xs, tmp_path / "run", knob_trials=1, algorithms=("dense", "pixcsr"))


def test_refine_times_each_split_inside_the_model(small_model, tmp_path):
    from tvm_sparseconv.cli import main
    from tvm_sparseconv.compile import resolve_plan
    from tvm_sparseconv.compile import Build, build
    from tvm_sparseconv.tune.refine import in_model_ms

    path, m, xs = small_model
    np.save(tmp_path / "x.npy", xs[0])
    resolve_plan(m, None, "dense").save(str(tmp_path / "dense.json"))
    out = tmp_path / "refined.json"
    assert main(["refine", path, "--inputs", str(tmp_path / "x.npy"), "--plan", str(tmp_path / "dense.json"),
                 "--rounds", "1", "-o", str(out)]) == 0
    report = json.loads((tmp_path / "refined.json.refine.json").read_text())
    names = [b["name"] for b in report["builds"]]
    # a given plan is built beside the cost model's prediction (here, other knobs than dense's defaults)
    assert names == ["plan", "all m_outer", "all row_outer", "all row_band", "predicted", "mix"]
    assert report["chosen"] in names
    keys = {"conv000", "conv001", "conv002"}
    for b in report["builds"]:
        assert set(b["layer_ms"]) == keys and all(0 < v < 100 for v in b["layer_ms"].values())
    assert set(report["mix"]) == keys
    # the mix takes each layer's fastest split, by the interleaved per-layer times
    by = {b["name"]: b["layer_ms"] for b in report["builds"]}
    for k, s in report["mix"].items():
        assert by[f"all {s}"][k] == min(by[f"all {t}"][k] for t in ("m_outer", "row_outer", "row_band"))
    refined = Plan.load(str(out))
    if report["chosen"] != "predicted":
        assert {l.key: l.knobs["split"] for l in refined.layers} == report["splits"]
    ex = tvms_compile(m, plan=refined)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(xs[0])).numpy()
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: xs[0]})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)
    # each layer's calls, found by the kernels' attributes; calls that do not add up to the
    # layers a kernel names are an error, not a misattribution
    b = build(m, refined, None)
    t = in_model_ms(b, tvm.runtime.tensor(xs[0]), runs=2)
    assert set(t["layers"]) == keys and t["calls"] > sum(t["layers"].values())  # + the model's other ops
    name, (layers, algo) = next(iter(b.kernels.items()))
    wrong = Build(b.module, b.applied, {**b.kernels, name: (layers * 2, algo)})
    with pytest.raises(RuntimeError, match=f"{name} was called {2 * len(layers)} times in 2 inferences; "
                                           f"{2 * len(layers)} layers call it"):
        in_model_ms(wrong, tvm.runtime.tensor(xs[0]), runs=2)


def _measured_otherwise(monkeypatch, refine, name: str, change) -> None:
    """refine's in-model times as measured, but ``change(times)`` applied to the build ``name``'s
    (each build is known by its name as build_many yields it)."""
    names, measured, build_many = {}, refine.in_model_ms, refine.build_many

    def remember(model, plans, *a, **k):
        for n, b, s in build_many(model, plans, *a, **k):
            names[id(b)] = n
            yield n, b, s

    def times(b, x, runs=20):
        t = measured(b, x, runs)
        if names.get(id(b)) == name:
            change(t)
        return t

    monkeypatch.setattr(refine, "build_many", remember)
    monkeypatch.setattr(refine, "in_model_ms", times)


def test_refine_times_only_the_builds_that_may_win_end_to_end(small_model, monkeypatch):
    """A build whose calls inside the model sum to more than ROUND_SLACK over the fastest one's
    in the laps is not timed in the end-to-end rounds: it is reported, with no end-to-end time.
    The plan and ``others`` are always timed, and the mix (timed in one lap of its own) sets no
    bar. The sums are the measured ones, with some made slower or faster."""
    from tvm_sparseconv.compile import resolve_plan
    from tvm_sparseconv.tune import refine

    path, m, xs = small_model
    # 100x: on a VM whose speed moves, the measured sums of builds this alike were seen 3x apart
    slower = lambda t: t.update(calls=t["calls"] * 100)
    _measured_otherwise(monkeypatch, refine, "all row_band", slower)
    _measured_otherwise(monkeypatch, refine, "predicted", slower)
    # the mix far ahead (1 us): it is timed in one lap of 2 runs (the others: the median of 3
    # laps), and at half its measured sum it was once still behind the bar
    _measured_otherwise(monkeypatch, refine, "mix", lambda t: t.update(calls=1e-3))
    said = []
    _, report = refine.refine_plan(m, resolve_plan(m, None, "dense"), xs[0], None, rounds=1, runs=2,
                                   log=said.append, others={"predicted": resolve_plan(m, None, "pixcsr")})
    by = {b["name"]: b for b in report["builds"]}
    assert by["all row_band"]["ms"] is None and "all row_band" not in report["round_ms"]
    assert by["plan"]["ms"] > 0 and by["predicted"]["ms"] > 0 and by["mix"]["ms"] > 0
    fastest = min(b["calls_ms"] for b in report["builds"] if b["name"] != "mix")
    assert by["predicted"]["calls_ms"] > fastest * (1 + refine.ROUND_SLACK) > by["mix"]["calls_ms"]
    for name, b in by.items():  # the rest: timed end to end exactly when close enough
        assert (b["ms"] is None) == (name not in ("plan", "predicted")
                                     and b["calls_ms"] > fastest * (1 + refine.ROUND_SLACK))
    assert any("left out of the rounds" in s and "all row_band" in s and "predicted" not in s for s in said)


def test_refine_makes_a_sparse_layer_dense_where_dense_is_faster_inside_the_model(small_model, monkeypatch):
    """A sparse layer with dense knobs in its note: refine builds the plan with it dense too, the
    mix takes dense for it when dense was faster inside the model (here its measured time in that
    build made 1 us), and a report choosing the mix makes it dense, its sparse choice kept in
    the note; the result matches onnxruntime."""
    from tvm_sparseconv.compile import resolve_plan
    from tvm_sparseconv.tune import refine

    path, m, xs = small_model
    plan = resolve_plan(m, None, "dense")
    layer = plan.layers[2]  # conv002, the 3x3 at 56x56
    layer.algorithm, layer.knobs, layer.note = "pixcsr", {}, {"dense_knobs": {"split": "row_outer"}}
    _measured_otherwise(monkeypatch, refine, refine.DENSE_BUILD,
                        lambda t: t["layers"].update(conv002=1e-3))  # far below the sparse time
    _, report = refine.refine_plan(m, plan, xs[0], None, rounds=1, runs=2)
    names = [b["name"] for b in report["builds"]]
    assert refine.DENSE_BUILD in names and "mix" in names
    assert report["mix_dense"] == ["conv002"] and set(report["mix"]) == {"conv000", "conv001"}
    mixed = refine.apply_report(plan, {**report, "chosen": "mix", "splits": report["mix"],
                                       "dense": report["mix_dense"]})
    l = mixed.layers[2]
    assert (l.algorithm, l.knobs["split"]) == ("dense", "row_outer")
    assert l.note["sparse"] == {"algorithm": "pixcsr", "knobs": {}}
    y = relax.VirtualMachine(tvms_compile(m, plan=mixed), tvm.cpu())["main"](tvm.runtime.tensor(xs[0])).numpy()
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: xs[0]})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)
    # a plan refine reads back from an older tuner, without dense knobs: no such build
    layer.note = {}
    _, report = refine.refine_plan(m, plan, xs[0], None, rounds=1, runs=2)
    assert refine.DENSE_BUILD not in [b["name"] for b in report["builds"]] and report["dense"] == []


def test_refine_builds_all_blocks_with_the_sparse_layers_dense_in_blocks(small_model):
    """A plan with a sparse layer in NCHW between dense layers the layouts phase left in NCHW:
    refine also builds "all blocks" with the sparse layer on dense in blocks ("all dense in
    blocks"), and a report choosing it gives every layer dense in blocks, which matches
    onnxruntime."""
    from tvm_sparseconv.compile import resolve_plan
    from tvm_sparseconv.cpu import cpu_of
    from tvm_sparseconv.layout import NCHW, lanes_layout
    from tvm_sparseconv.tune import refine

    path, m, xs = small_model
    blocks = lanes_layout(cpu_of(None))
    plan = resolve_plan(m, None, "dense")
    for l, lin in zip(plan.layers, (NCHW, blocks, blocks)):  # the first reads the image in NCHW
        l.note = {"blocks_knobs": {**l.knobs, "layout_in": lin, "layout_out": blocks}}
    sparse = plan.layers[1]  # conv001, the 1x1 at 56x56
    # pixcsr holds no blocks: only dense's knobs, in NCHW and in blocks
    sparse.note = {"dense_knobs": dict(sparse.knobs), "dense_blocks_knobs": sparse.note["blocks_knobs"]}
    sparse.algorithm, sparse.knobs = "pixcsr", {}
    _, report = refine.refine_plan(m, plan, xs[0], None, rounds=1, runs=2)
    names = [b["name"] for b in report["builds"]]
    assert {refine.BLOCKS_BUILD, refine.DENSE_BUILD, refine.DENSE_BLOCKS_BUILD} <= set(names)
    built = refine.apply_report(plan, {**report, "chosen": refine.DENSE_BLOCKS_BUILD, "dense": ["conv001"],
                                       "splits": {}})
    assert [(l.algorithm, l.knobs["layout_out"]) for l in built.layers] == [("dense", blocks)] * 3
    assert built.layers[1].note["sparse"] == {"algorithm": "pixcsr", "knobs": {}}
    y = relax.VirtualMachine(tvms_compile(m, plan=built), tvm.cpu())["main"](tvm.runtime.tensor(xs[0])).numpy()
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: xs[0]})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)
    # without a sparse layer there is no such build
    plan.layers[1].algorithm, plan.layers[1].knobs = "dense", dict(plan.layers[1].note["dense_knobs"])
    plan.layers[1].note = {"blocks_knobs": plan.layers[1].note["dense_blocks_knobs"]}
    _, report = refine.refine_plan(m, plan, xs[0], None, rounds=1, runs=2)
    assert refine.DENSE_BLOCKS_BUILD not in [b["name"] for b in report["builds"]]


def test_refine_builds_other_plans_beside_the_plan_and_takes_one_it_chooses(small_model, tmp_path):
    """refine's ``others`` (the tuner's predicted plan) are built and timed beside the plan's
    variants; a report choosing one gives that plan, also when read back from the file, and
    another ``others`` refines afresh."""
    from tvm_sparseconv.compile import resolve_plan
    from tvm_sparseconv.tune import refine

    path, m, xs = small_model
    plan, other = resolve_plan(m, None, "dense"), resolve_plan(m, None, "pixcsr")
    save = str(tmp_path / "refine.json")
    _, report = refine.refine_plan(m, plan, xs[0], None, rounds=2, runs=2, save_to=save, others={"predicted": other})
    by = {b["name"]: b for b in report["builds"]}
    assert by["predicted"]["calls_ms"] > 0 and set(by["predicted"]["layer_ms"]) == {l.key for l in other.layers}
    chose = {**report, "chosen": "predicted", "splits": {}, "dense": []}
    got = refine.apply_report(plan, chose, {"predicted": other})
    assert [(l.algorithm, l.knobs) for l in got.layers] == [(l.algorithm, l.knobs) for l in other.layers]
    said = []
    again, _ = refine.refine_plan(m, plan, xs[0], None, rounds=2, runs=2, save_to=save, log=said.append,
                                  others={"predicted": other})
    assert any("done in an earlier run" in s for s in said)
    assert [(l.algorithm, l.knobs) for l in again.layers] == [
        (l.algorithm, l.knobs) for l in refine.apply_report(plan, report, {"predicted": other}).layers]
    said.clear()
    refine.refine_plan(m, plan, xs[0], None, rounds=1, runs=2, save_to=save, log=said.append)
    assert any("made for another plan" in s for s in said)


def test_corrupt_or_foreign_log_is_refused(tmp_path):
    p = tmp_path / "trials.jsonl"
    p.write_text("not json\n")
    with pytest.raises(TuningLogError, match="not a tvm-sparseconv tuning log"):
        TuningLog(str(p), {"model": "m", "target": "t"})
    log = TuningLog(str(tmp_path / "ok.jsonl"), {"model": "m", "target": "t"})
    log.append({"workload": "w", "algorithm": "halo", "knobs": {}, "time_ms": 1.0})
    with pytest.raises(TuningLogError, match="made for model"):
        TuningLog(str(tmp_path / "ok.jsonl"), {"model": "other", "target": "t"})
    # a log timed warm (or from before the cache key) is not resumed cold
    assert TuningLog(str(tmp_path / "ok.jsonl"), {"model": "m", "target": "t", "cache": "warm"}).records
    with pytest.raises(TuningLogError, match="made for cache 'warm', not 'cold'"):
        TuningLog(str(tmp_path / "ok.jsonl"), {"model": "m", "target": "t", "cache": "cold"})
    with open(tmp_path / "ok.jsonl", "a") as f:
        f.write("garbage in the middle\n")
        f.write(json.dumps({"workload": "w", "algorithm": "dense", "knobs": {}}) + "\n")
    with pytest.raises(TuningLogError, match="line 3 is corrupt"):
        TuningLog(str(tmp_path / "ok.jsonl"), {"model": "m", "target": "t"})
    with pytest.raises(FileNotFoundError, match="missing"):
        write_report(str(tmp_path))


def test_rpc_tracker_and_two_servers_on_loopback(small_model, tmp_path):
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    path, m, xs = small_model
    # ports the OS says are free (each bound before the next is asked for): fixed ones would
    # collide with another run on this machine
    port = free_port()
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 1, silent=True)
    servers = []
    try:
        for _ in range(2):
            port = free_port()
            servers.append(Server("127.0.0.1", port=port, port_end=port + 1,
                                  tracker_addr=("127.0.0.1", tracker.port), key="tvms-test", silent=True))
        time.sleep(1.0)
        t, plan = run_tuner(m, xs, tmp_path / "run", knob_trials=1, algorithms=("dense", "halo"),
                            rpc=("127.0.0.1", tracker.port, "tvms-test"))
        assert t.trials.header["cache"] == "cold"  # fresh inputs need this process: RPC times cold
        recs = [r for r in t.trials.records if r.get("time_ms")]
        assert len(recs) == 2 * len({r["workload"] for r in recs}) > 0
    finally:
        for s in servers:
            s.terminate()
        tracker.terminate()
