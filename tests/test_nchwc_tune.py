"""The tuner's choice of layouts (tune/layouts.py): the assignment against an exhaustive search
on synthetic times, the candidates per layout pair, and a tuning run on a small real model
whose plan is compiled and checked against onnxruntime."""
import itertools
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import tvm

from tvm_sparseconv.compile import build, lower
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.cpu import cpu_of
from tvm_sparseconv.layout import NCHW, lanes_layout
from tvm_sparseconv.passes import LayerChoice, LayoutGraph, layout_transforms
from tvm_sparseconv.plan import Plan
from tvm_sparseconv.tune.layouts import (TRANSFORM, assign, blocked_notes, blocks_knobs, fastest_per_pair,
                                         pair_candidates, pairs)
from tvm_sparseconv.tune.tuner import TuneConfig, Tuner

from conftest import HOST
from test_nchwc_rewrite import block_model  # noqa: F401 (a fixture)

BLOCKED = lanes_layout(HOST)
PAIRS = pairs(HOST)


def graph_of(m) -> LayoutGraph:
    return LayoutGraph(m.mod["main"], {s.key: LayerChoice("dense") for s in m.sites}, m.sites)


def exhaustive(graph, layer_ms, transform_ms) -> float:
    keys = list(layer_ms)
    best = np.inf
    for combo in itertools.product(*(list(layer_ms[k]) for k in keys)):
        a = dict(zip(keys, combo))
        best = min(best, sum(layer_ms[k][a[k]] for k in keys) + sum(transform_ms(*t) for t in graph.transforms(a)))
    return best


@pytest.mark.parametrize("case", ["blocks-pay", "transforms-dear", "only-as-a-chain", "random"])
def test_assignment_finds_the_least_cost(block_model, case):
    """Synthetic layer and transform times on the block model (4 layers, 256 assignments): the
    assignment costs what the exhaustive search's best costs."""
    m, _, _ = block_model
    graph = graph_of(m)
    keys = graph.keys
    rng = np.random.default_rng(len(case))
    size = lambda shape: float(np.prod(shape)) * 1e-4  # noqa: E731  (a transform's time grows with its tensor)
    if case == "blocks-pay":  # every layer twice as fast in blocks, transforms cheap
        layer_ms = {k: {p: 1.0 if p == (NCHW, NCHW) else 0.5 for p in PAIRS} for k in keys}
        transform = lambda shape, src, dst: 0.01  # noqa: E731
    elif case == "transforms-dear":  # blocks in and out 1 % faster, a transform dearer than all the gain
        layer_ms = {k: {(NCHW, NCHW): 1.0, (NCHW, BLOCKED): 1.1, (BLOCKED, NCHW): 1.1, (BLOCKED, BLOCKED): 0.99}
                    for k in keys}
        transform = lambda shape, src, dst: 1.0  # noqa: E731
    elif case == "only-as-a-chain":  # a layer pays in blocks only when both its neighbours are
        layer_ms = {k: {(NCHW, NCHW): 1.0, (NCHW, BLOCKED): 1.2, (BLOCKED, NCHW): 1.2, (BLOCKED, BLOCKED): 0.7}
                    for k in keys}
        transform = lambda shape, src, dst: 0.3  # noqa: E731
    else:
        layer_ms = {k: {p: float(rng.uniform(0.5, 1.5)) for p in PAIRS} for k in keys}
        transform = lambda shape, src, dst: size(shape)  # noqa: E731
    chosen, cost = assign(graph, layer_ms, transform)
    assert set(chosen) == set(keys)
    assert cost == pytest.approx(sum(layer_ms[k][chosen[k]] for k in keys)
                                 + sum(transform(*t) for t in graph.transforms(chosen)))
    assert cost == pytest.approx(exhaustive(graph, layer_ms, transform))
    if case == "blocks-pay":  # the first layer reads the input as it is, the last writes NCHW for the mean
        assert (NCHW, NCHW) not in chosen.values() and graph.transforms(chosen) == []
    if case == "transforms-dear":
        assert set(chosen.values()) == {(NCHW, NCHW)}


def test_pair_candidates_hold_a_valid_tile_for_every_pair():
    """The plan's tile in each pair where the kernel takes it, and each pair's defaults: the
    gemm tile of NCHW (vectors of pixels, m_tile 12) is no tile from blocks (channel vectors),
    where the defaults stand in."""
    spec = Conv2DSpec.from_shapes((1, 128, 28, 28), (32, 128, 1, 1))
    cpu = cpu_of(None)
    knobs = {"kernel": "gemm", "block": 2 * cpu.lanes, "m_tile": 12, "c_block": 0, "split": "row_outer",
             "pad": "inplace", "layout_in": NCHW, "layout_out": NCHW}
    cands = pair_candidates(spec, knobs, cpu)
    assert list(cands) == pairs(cpu)
    assert cands[(NCHW, NCHW)][0] == knobs
    assert cands[(NCHW, BLOCKED)][0] == {**knobs, "layout_out": BLOCKED}
    for pair in ((BLOCKED, NCHW), (BLOCKED, BLOCKED)):
        assert all(k["m_tile"] % 4 == 0 and k["kernel"] == "gemm" and (k["layout_in"], k["layout_out"]) == pair
                   for k in cands[pair]) and cands[pair]


def test_fastest_per_pair_lets_a_sparse_layer_go_dense_only_in_blocks():
    """A sparse layer keeps its own time in NCHW (dense's NCHW time, even if lower, is not taken:
    the selection chose there, with its margin); dense's pairs with blocks compete; a dense
    layer's pairs are its own."""
    b = BLOCKED
    dense = {(NCHW, NCHW): (0.5, {"kernel": "gemm"}), (b, b): (0.7, {"kernel": "gemm", "layout_in": b}),
             (NCHW, b): (1.5, {"kernel": "window"})}
    got = fastest_per_pair("pixcsr", {"rows": 2}, 0.9, {"dense": dense})
    assert got == {(NCHW, NCHW): (0.9, "pixcsr", {"rows": 2}), (b, b): (0.7, "dense", dense[(b, b)][1]),
                   (NCHW, b): (1.5, "dense", {"kernel": "window"})}
    assert fastest_per_pair("pixcsr", {}, None, {"dense": dense}).keys() == {(b, b), (NCHW, b)}
    assert fastest_per_pair("dense", {"kernel": "x"}, 9.0, {"dense": dense}) == \
        {pair: (ms, "dense", k) for pair, (ms, k) in dense.items()}


def test_blocks_knobs_are_the_layers_own_algorithm_in_blocks_on_both_sides():
    """What refine's "all blocks" build takes for a layer left in NCHW: its own algorithm's knobs
    in the pair with blocks on both sides, not a pair with NCHW on one side (faster or not), not
    another algorithm's."""
    b = BLOCKED
    per_pair = {(NCHW, NCHW): (1.0, "dense", {"a": 0}), (NCHW, b): (0.5, "dense", {"a": 1}),
                (b, NCHW): (0.6, "dense", {"a": 3}), (b, b): (0.9, "dense", {"a": 2})}
    assert blocks_knobs("dense", per_pair) == {"a": 2}
    assert blocks_knobs("pixcsr", {(NCHW, NCHW): (1.0, "pixcsr", {}), (b, b): (0.9, "dense", {"a": 2})}) is None
    assert blocks_knobs("dense", {pair: per_pair[pair] for pair in [(NCHW, NCHW), (NCHW, b)]}) is None


def test_a_sparse_layer_left_in_nchw_is_offered_dense_in_blocks(block_model):
    """blocked_notes: a dense layer left in NCHW keeps its knobs in blocks for "all blocks"; a
    sparse one keeps dense's in blocks, which refine's "sparse layers dense" build takes (its
    NCHW dense knobs only without them)."""
    from tvm_sparseconv.tune.refine import with_dense

    b = BLOCKED
    assert blocked_notes("dense", {(NCHW, NCHW): (1.0, "dense", {}), (b, b): (0.9, "dense", {"a": 2})}) == \
        {"blocks_knobs": {"a": 2}}
    notes = blocked_notes("pixcsr", {(NCHW, NCHW): (1.0, "pixcsr", {"rows": 2}), (b, b): (0.9, "dense", {"a": 2})})
    assert notes == {"dense_blocks_knobs": {"a": 2}}
    assert blocked_notes("pixcsr", {(NCHW, NCHW): (1.0, "pixcsr", {"rows": 2})}) == {}
    m, _, _ = block_model
    plan = Plan.uniform(m.sites, "pixcsr")
    first, second = plan.layers[0].key, plan.layers[1].key
    plan.layers[0].note = {"dense_knobs": {"kernel": "window"}, **notes}
    plan.layers[1].note = {"dense_knobs": {"kernel": "window"}}
    got = {l.key: l for l in with_dense(plan, [first, second]).layers}
    assert got[first].algorithm == got[second].algorithm == "dense"
    assert got[first].knobs == {"a": 2} and got[second].knobs == {"kernel": "window"}
    assert got[first].note["sparse"]["algorithm"] == plan.layers[0].algorithm


@pytest.mark.slow
def test_layouts_phase_offers_dense_blocks_to_sparse_layers(block_model, tmp_path):
    """A tune with a sparse algorithm that the selection prefers (margin -10: sparse unless 11x
    slower): the layouts phase times dense in each pair with blocks on every sparse workload;
    a sparse layer it moved to dense is in blocks with its algorithm in the note, refine's
    NCHW build puts it back, and the plan compiles and matches onnxruntime."""
    from tvm_sparseconv.tune.refine import in_nchw

    m, x, ref = block_model
    run = tmp_path / "run"
    cfg = TuneConfig(knob_trials=1, algorithms=("dense", "pixcsr"), refine=False, repeat=2, margin=-10.0,
                     recheck_rounds=2)
    tuner = Tuner(m, [x], str(run), config=cfg, model_name="block")
    plan = tuner.run()
    records = tuner.trials.records
    # each layer's fastest candidate per pair and its own in NCHW were re-timed together in
    # rounds, and the layouts chose by their medians
    rechecked = tuner.trials.layout_rechecks
    for l in plan.layers:
        if "layout_ms" not in l.note:
            continue
        rec = rechecked[l.note["workload"]]
        assert rec["rounds"] == 2 and all(len(c["times_ms"]) == 2 for c in rec["candidates"])
        own = next(c for c in rec["candidates"] if c["algorithm"] == l.algorithm and c["knobs"] == l.knobs)
        assert l.note["time_ms"] == pytest.approx(float(np.median(own["times_ms"])))
        pair = f'{l.knobs.get("layout_in", NCHW)}->{l.knobs.get("layout_out", NCHW)}'
        assert l.note["layout_ms"][pair] == l.note["time_ms"]
    sparse_wl = {r["workload"] for r in records if r["algorithm"] == "pixcsr" and r.get("time_ms")}
    assert sparse_wl
    for wl in sparse_wl:
        blocked = {(r["knobs"]["layout_in"], r["knobs"]["layout_out"]) for r in records
                   if r["workload"] == wl and r["algorithm"] == "dense" and r.get("time_ms")}
        assert {(NCHW, BLOCKED), (BLOCKED, NCHW), (BLOCKED, BLOCKED)} <= blocked
    for l in plan.layers:
        if "nchw_algorithm" in l.note:
            assert l.algorithm == "dense" and l.note["nchw_algorithm"] == "pixcsr"
            assert (l.knobs["layout_in"], l.knobs["layout_out"]) != (NCHW, NCHW)
        else:
            assert l.algorithm in ("dense", "pixcsr")
    assert {l.algorithm for l in in_nchw(plan).layers if "nchw_algorithm" in l.note} <= {"pixcsr"}
    out = build(m, plan, None).vm()["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose((out if hasattr(out, "numpy") else out[0]).numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_tuner_chooses_layouts_that_compile_and_match_onnxruntime(block_model, tmp_path):
    """A tune of the block model with the dense kernel alone: every dense workload timed in each
    layout pair, the transforms timed once per shape and direction, the plan's layouts the
    assignment of layouts.json, the transforms of its build the ones LayoutGraph counted, the
    output onnxruntime's; a second run measures nothing again."""
    m, x, ref = block_model
    run = tmp_path / "run"
    cfg = TuneConfig(knob_trials=1, algorithms=("dense",), refine=False, repeat=2, recheck_rounds=2)
    plan = Tuner(m, [x], str(run), config=cfg, model_name="block").run()
    lay = json.loads((run / "layouts.json").read_text())
    assert {k: tuple(v) for k, v in lay["layouts"].items()} == plan.layouts()
    with open(run / "trials.jsonl") as f:
        lines = f.read().splitlines()[1:]
    records = [r for line in lines for r in [json.loads(line)] if "workload" in r]  # no marker or recheck
    timed_pairs = {(r["workload"], r["knobs"]["layout_in"], r["knobs"]["layout_out"]) for r in records
                   if r["algorithm"] == "dense" and r.get("time_ms")}
    workloads = {r["workload"] for r in records if r["algorithm"] == "dense"}
    assert {(w, *p) for w in workloads for p in PAIRS} <= timed_pairs
    assert any(r["algorithm"] == TRANSFORM and r.get("time_ms") for r in records)
    mod, _ = lower(m, plan, None)
    graph = LayoutGraph(m.mod["main"], plan.choices(m.sites), m.sites)
    assert sorted(f"{a}->{b}" for _, a, b in graph.transforms(plan.layouts())) == \
        sorted(t for _, _, t in layout_transforms(mod))
    assert len(lay["transforms"]) == len(layout_transforms(mod))
    out = build(m, plan, None).vm()["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose((out if hasattr(out, "numpy") else out[0]).numpy(), ref, rtol=1e-4, atol=1e-5)
    assert "## Layouts" in (run / "report.md").read_text()
    n = len(lines)
    Tuner(m, [x], str(run), config=cfg, model_name="block").run()
    with open(run / "trials.jsonl") as f:
        assert len(f.read().splitlines()[1:]) == n  # every measurement found again


@pytest.mark.slow
@pytest.mark.parametrize("start", ["blocks", "nchw"])
def test_refine_checks_the_layouts_end_to_end(block_model, start):
    """A plan whose layers the layouts phase put in blocks (their NCHW knobs in the note), or
    left in NCHW though they could take blocks (their blocked knobs in the note): refine builds
    it in the other layouts too ("all nchw", "all blocks") and times it end to end with the
    split variants; the plan it returns is the chosen build's, in_nchw undoes either, and the
    plan in the other layouts matches onnxruntime."""
    from tvm_sparseconv.tune.refine import BLOCKS_BUILD, NCHW_BUILD, apply_report, in_nchw, refine_plan

    m, x, ref = block_model
    blocks, nchw = {(BLOCKED, BLOCKED)}, {(NCHW, NCHW)}
    knobs = {"layout_in": BLOCKED, "layout_out": BLOCKED}
    plan = Plan.uniform(m.sites, "dense")
    for l in plan.layers:
        l.note, l.knobs = ({"nchw_knobs": {}}, knobs) if start == "blocks" else ({"blocks_knobs": knobs}, {})
    other, own = (NCHW_BUILD, blocks) if start == "blocks" else (BLOCKS_BUILD, nchw)
    others = nchw if start == "blocks" else blocks
    refined, report = refine_plan(m, plan, x, None, rounds=1, runs=2)
    assert other in {b["name"] for b in report["builds"]}
    assert set(refined.layouts().values()) == (others if report["chosen"] == other else own)
    moved = apply_report(plan, {**report, "chosen": other, "splits": {}})
    assert set(moved.layouts().values()) == others
    assert not any("blocks_knobs" in l.note for l in moved.layers)
    assert set(in_nchw(moved).layouts().values()) == nchw
    out = build(m, moved, None).vm()["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose((out if hasattr(out, "numpy") else out[0]).numpy(), ref, rtol=1e-4, atol=1e-5)
