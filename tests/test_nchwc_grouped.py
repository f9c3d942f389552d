"""The grouped channels kernel on channel blocks (docs/algorithms.md 15.1, 16): depthwise layers
and layers whose groups are whole vectors of output channels, reading and writing "nchw{lanes}c"
against NumPy float64, the knobs it refuses, its knob space,
and a depthwise layer between two blocked 1x1 dense layers in a model, against onnxruntime.

The channel counts come from the host's lanes L: 2L (whole blocks) and L + L/2 (a partial last
block: 24 on AVX-512, 12 on AVX2)."""
import itertools
import json

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import helper, numpy_helper

from tvm_sparseconv.algorithms import KnobError, get_algorithm
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.compile import build
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.cpu import cpu_of
from tvm_sparseconv.frontend import load_model
from tvm_sparseconv.layout import NCHW, channel_block, lanes_layout, layout_shape
from tvm_sparseconv.passes import LayerChoice, LayoutGraph
from tvm_sparseconv.plan import Plan, PlanLayer
from tvm_sparseconv.reference import dense_conv2d
from tvm_sparseconv.tune.layouts import pair_candidates, pairs, takes_blocks

from conftest import HOST, activation, assert_conv_close, isa_cases, save_onnx, weight
from test_grouped import EPILOGUES, layer_spec, nan_inf

GROUPED = get_algorithm("grouped")
BLOCKED = lanes_layout(HOST)
L = HOST.lanes
CHANNELS = (2 * L, L + L // 2)  # whole blocks, a partial last block
PAIRS = [(BLOCKED, BLOCKED), (NCHW, BLOCKED), (BLOCKED, NCHW)]


def past(c: int, cb: int) -> int:
    """Lanes of the last block of c channels in blocks of cb that hold no channel."""
    return -c % cb


def check_blocked(spec, knobs, epilogue, target=None, densities=(0.0, 0.5, 1.0)):
    """Build grouped with ``knobs`` and ``epilogue`` (test_grouped.EPILOGUES), run it on each
    density and on an input with NaN and +-Inf (and a residual with both), compare with
    dense_conv2d in float64. The lanes past C of a blocked x and past M of a blocked residual
    are NaN (a writer may leave anything there: layout.py), and must not reach an output; the
    lanes past M of a blocked y must be zeros, though y was NaN before the run."""
    ep = EPILOGUES[epilogue]
    w = weight(spec)
    bias = np.linspace(-1, 1, spec.out_channels).astype(np.float32) if ep.get("bias") else None
    layer = CompiledLayer("grouped", spec, w, bias, ep.get("relu", False), target=target, knobs=knobs,
                          residual=ep.get("residual", False), clip=ep.get("clip"))
    res = None
    if ep.get("residual"):
        res = np.random.default_rng(7).standard_normal(spec.y_shape).astype(np.float32)
        res.flat[[2, res.size // 2]] = np.nan, np.inf
    for x in [activation(spec, d, seed=i) for i, d in enumerate(densities)] + [nan_inf(spec)]:
        layer.poison()
        layer.set_input(x, res)
        for name, layout, c in (("x", layer.layout_in, spec.in_channels), ("res", layer.layout_out,
                                                                            spec.out_channels)):
            cb = channel_block(layout)
            if cb and past(c, cb) and name in layer.buffers and (name == "x" or res is not None):
                raw = layer.buffers[name].numpy()
                raw[:, -1, ..., cb - past(c, cb):] = np.nan
                layer.buffers[name].copyfrom(raw)
        layer.run()
        ref = dense_conv2d(spec, x, w, bias, ep.get("relu", False), residual=res, clip=ep.get("clip"))
        y = layer.output()
        unwritten = np.isnan(y) & ~np.isnan(ref)
        assert not unwritten.any(), f"{int(unwritten.sum())} output elements never written ({layer.knobs})"
        assert_conv_close(y, ref, spec)
        raw = layer.buffers["y"].numpy()
        assert raw.shape == layout_shape(spec.y_shape, layer.layout_out)
        cb = channel_block(layer.layout_out)
        if cb and past(spec.out_channels, cb):
            assert not raw[:, -1, ..., cb - past(spec.out_channels, cb):].any(), "lanes past M are not zeros"
    return layer


# 3x3 and 5x5, stride 1 and 2, SAME padding on 9 x 11 (asymmetric at stride 2 and for 5x5 at
# stride 2), whole and partial blocks; the epilogues in turn
GRID = list(itertools.product(((3, 3), (5, 5)), (1, 2), CHANNELS))


@pytest.mark.parametrize("case", range(len(GRID)),
                         ids=[f"k{k[0]}x{k[1]}-s{s}-c{c}" for k, s, c in GRID])
def test_blocked_in_and_out(case):
    kernel, stride, c = GRID[case]
    epilogue = list(EPILOGUES)[case % len(EPILOGUES)]
    layer = check_blocked(layer_spec("dw", c, (9, 11), kernel, stride),
                          {"vector": "channels", "layout_in": BLOCKED, "layout_out": BLOCKED}, epilogue)
    assert (layer.layout_in, layer.layout_out) == (BLOCKED, BLOCKED)


@pytest.mark.parametrize("lin,lout", PAIRS[1:], ids=[f"{a}-{b}" for a, b in PAIRS[1:]])
@pytest.mark.parametrize("c", CHANNELS)
def test_one_side_blocked(c, lin, lout):
    """Blocks on one side: the packing or the store as for NCHW, the other side blocked; batch 2,
    padding on two sides only; a blocked y from tiles of 2 rows x 4 pixels and tasks of 3 rows
    (tails in both: its store is new, NCHW's transposed one is test_grouped's)."""
    spec = layer_spec("dw", c, (10, 9), (3, 3), 1, batch=2, padding=(0, 2, 1, 0))
    tiles = {"tile_rows": 2, "block": 4, "rows": 3} if lout != NCHW else {}
    knobs = {"vector": "channels", "layout_in": lin, "layout_out": lout, **tiles}
    check_blocked(spec, knobs, "bias-residual-relu6", densities=(0.5,))


@pytest.mark.slow  # 18 builds: every pair x every epilogue (the default run a covering sample)
@pytest.mark.cover("epilogue", "lin", "lout")
@pytest.mark.parametrize("lin,lout", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_every_epilogue_and_pair(epilogue, lin, lout):
    """A 5x5 depthwise layer at stride 2 and dilation 2, asymmetric padding, a partial block."""
    c = L + L // 2
    spec = Conv2DSpec.from_shapes((1, c, 13, 12), (c, 1, 5, 5), 2, (1, 2, 3, 0), 2, c)
    check_blocked(spec, {"vector": "channels", "layout_in": lin, "layout_out": lout}, epilogue,
                  densities=(0.0, 0.5, 1.0))


# groups whose every block of L output channels lies in one group: the group's input rows packed
# once as scalars, from NCHW rows or from blocks (by L x L transposes where the group is whole
# blocks and W >= L, the last column tile overlapping; else element by element: W = 9 < 16 lanes,
# and groups of 8 input channels on AVX-512)
SHARED = [("g16", 48, (9, 20), 2), ("g16", 32, (7, 9), 1), ("g8x2", 16, (9, 20), 1)]


@pytest.mark.parametrize("lin,lout", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
@pytest.mark.parametrize("kind,c,hw,stride", SHARED, ids=[f"{k}-c{c}-w{hw[1]}-s{s}" for k, c, hw, s in SHARED])
def test_groups_of_whole_blocks(kind, c, hw, stride, lin, lout):
    spec = layer_spec(kind, c, hw, (3, 3), stride, batch=2)
    check_blocked(spec, {"vector": "channels", "layout_in": lin, "layout_out": lout}, "bias-residual-relu6",
                  densities=(0.0, 0.5))


@pytest.mark.parametrize("isa,target,runs", [c[:3] for c in isa_cases()], ids=[c[0] for c in isa_cases()])
def test_other_isas(isa, target, runs):
    """Blocks of another ISA's lanes (c_block, the default, is its vector): a depthwise layer and
    one with groups of 16 channels."""
    lanes = cpu_of(target).lanes
    layout = lanes_layout(cpu_of(target))
    knobs = {"vector": "channels", "layout_in": layout, "layout_out": layout}
    for spec in (layer_spec("dw", 3 * lanes // 2, (9, 11), (3, 3), 2), layer_spec("g16", 32, (9, 11), (3, 3), 2)):
        if not runs:
            CompiledLayer("grouped", spec, weight(spec), target=target, knobs=knobs)
            continue
        layer = check_blocked(spec, knobs, "bias-residual-relu6", target, densities=(0.5,))
        assert layer.knobs["c_block"] == lanes
    if not runs:
        pytest.skip(f"built for {isa} without running it: this host ({HOST.name}) has no {isa}")


@pytest.mark.parametrize("kind,knobs,what", [
    ("dw", {"vector": "width", "layout_out": BLOCKED}, "vector='channels'"),
    ("dw2", {"layout_in": BLOCKED}, "depthwise layers without a channel multiplier"),
    ("half", {"layout_out": BLOCKED}, "depthwise layers without a channel multiplier"),
    ("g16", {"layout_out": BLOCKED, "c_block": 32}, "c_block divides the output channels per group"),
    ("dw", {"layout_in": BLOCKED, "c_block": 2 * L}, f"needs c_block={L}"),
    ("dw", {"layout_out": f"nchw{2 * L}c"}, f"needs c_block={2 * L}"),
    ("dw", {"layout_in": "nhwc"}, "layout_in"),
])
def test_refused_layout_knobs(kind, knobs, what):
    spec = layer_spec(kind, 2 * L, (6, 6), (3, 3), 1)
    with pytest.raises(KnobError, match=what):
        GROUPED.constants(spec, weight(spec), None, GROUPED.knobs(spec, knobs))


@pytest.mark.parametrize("target", [{"kind": "llvm", "mcpu": "skylake-avx512"}, {"kind": "llvm", "mcpu": "haswell"}],
                         ids=["avx512", "avx2"])
def test_knob_space_has_the_blocked_variants(target):
    """Defaults in NCHW (plans without layout knobs read as before); the space of a depthwise
    layer and of one with groups of 16 channels holds every layout pair of the channels kernel in
    blocks of the target's lanes with c_block one vector, after every NCHW candidate (the tuner's
    selection measures a prefix of those); a layer with a multiplier or groups of 2 channels
    holds NCHW only."""
    cpu = cpu_of(target)
    b = lanes_layout(cpu)
    for spec in (layer_spec("dw", 96, (28, 28), (3, 3), 1), layer_spec("g16", 96, (28, 28), (3, 3), 1)):
        assert GROUPED.layouts(spec, GROUPED.knobs(spec, None, cpu)) == (NCHW, NCHW)
        space = GROUPED.knob_space(spec, cpu)
        pairs = {(k["layout_in"], k["layout_out"]) for k in space}
        assert pairs == {(i, o) for i in (NCHW, b) for o in (NCHW, b)}
        assert all(k["vector"] == "channels" and k["c_block"] == cpu.lanes for k in space if k["layout_in"] != NCHW)
        in_nchw = [GROUPED.layouts(spec, k) == (NCHW, NCHW) for k in space]
        assert in_nchw == sorted(in_nchw, reverse=True)
    for kind in ("dw2", "half"):
        spec = layer_spec(kind, 96, (28, 28), (3, 3), 1)
        assert {(k["layout_in"], k["layout_out"]) for k in GROUPED.knob_space(spec, cpu)} == {(NCHW, NCHW)}


def test_pair_candidates_of_the_layouts_phase():
    """The tuner's layouts phase (tune/layouts.py) times a depthwise layer in each pair: the
    plan's channels tile in each, and from a width tile (which takes no blocks) the pair's
    defaults; a layer with a multiplier has no pair with blocks, so the phase leaves it alone."""
    spec = layer_spec("dw", 3 * L, (14, 14), (3, 3), 1)
    channels = GROUPED.knobs(spec, {"block": 7, "tile_rows": 2})
    cands = pair_candidates(spec, channels, HOST, "grouped")
    assert list(cands) == pairs(HOST) and takes_blocks(cands)
    for (lin, lout), ks in cands.items():
        assert ks[0] == {**channels, "layout_in": lin, "layout_out": lout}
    width = GROUPED.knobs(spec, {"vector": "width"})
    cands = pair_candidates(spec, width, HOST, "grouped")
    assert cands[(NCHW, NCHW)] == [width]
    for pair in pairs(HOST)[1:]:
        want = GROUPED.knobs(spec, {"layout_in": pair[0], "layout_out": pair[1]})
        assert cands[pair] == [want] and want["vector"] == "channels"
    dw2 = layer_spec("dw2", L, (14, 14), (3, 3), 1)
    assert not takes_blocks(pair_candidates(dw2, GROUPED.knobs(dw2), HOST, "grouped"))
    assert not takes_blocks(pair_candidates(dw2, {}, HOST, "direct"))


# -- in a model -------------------------------------------------------------------------------------

def mobile_onnx(path, c: int) -> str:
    """x (1, 8, 9, 9) -> 1x1 8->c + bias -> ReLU -> depthwise 3x3 + bias -> clip(0, 6) -> depthwise
    3x3 stride 1 + its input (the residual) -> 1x1 c->8: MobileNet-V2's inverted residual, with
    c a partial number of blocks."""
    rng = np.random.default_rng(0)
    arrays = {"w1": (c, 8, 1, 1), "b1": (c,), "w2": (c, 1, 3, 3), "b2": (c,), "w3": (c, 1, 3, 3), "w4": (8, c, 1, 1)}
    init = [numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype("float32"), n) for n, s in arrays.items()]
    init += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c),
             helper.make_node("Add", ["c3", "r2"], ["a3"]),
             helper.make_node("Conv", ["a3", "w4"], ["y"], kernel_shape=[1, 1])]
    return save_onnx(path, "mobile", nodes, [1, 8, 9, 9], [1, 8, 9, 9], init)


def test_depthwise_keeps_the_blocks_between_dense_layers(tmp_path):
    """dense 1x1 (NCHW in, blocks out), two grouped depthwise layers on blocks (the second fusing
    the residual, read in blocks), dense 1x1 (blocks in, NCHW out): no transform anywhere, as
    LayoutGraph counts too; the model matches onnxruntime. With the depthwise layers in NCHW the
    rewrite needs a transform on each side of them (what the blocked layers save)."""
    c = L + L // 2
    path = mobile_onnx(tmp_path / "mobile.onnx", c)
    m = load_model(path)
    x = np.random.default_rng(3).standard_normal((1, 8, 9, 9)).astype(np.float32)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    algos = ["dense", "grouped", "grouped", "dense"]
    blocked = [(NCHW, BLOCKED), (BLOCKED, BLOCKED), (BLOCKED, BLOCKED), (BLOCKED, NCHW)]

    def plan_of(layouts):
        return Plan([PlanLayer(s.key, s.spec.to_dict(), a, {"layout_in": i, "layout_out": o})
                     for s, a, (i, o) in zip(m.sites, algos, layouts)])

    b = build(m, plan_of(blocked), None)
    assert list(b.applied.values()) == algos
    assert b.transforms == []  # layout_transforms of the rewritten module
    y = b.vm()["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose((y if hasattr(y, "numpy") else y[0]).numpy(), want, rtol=1e-4, atol=1e-4)

    graph = LayoutGraph(m.mod["main"], {s.key: LayerChoice(a) for s, a in zip(m.sites, algos)}, m.sites)
    assert graph.transforms({s.key: p for s, p in zip(m.sites, blocked)}) == []
    nchw_dw = [(NCHW, BLOCKED), (NCHW, NCHW), (NCHW, NCHW), (BLOCKED, NCHW)]
    moves = [(src, dst) for _, src, dst in graph.transforms({s.key: p for s, p in zip(m.sites, nchw_dw)})]
    assert moves == [(BLOCKED, NCHW), (NCHW, BLOCKED)], moves


LAYOUTS_ALGOS = ["dense", "grouped", "grouped", "dense"]  # the mobile model's layers, as the layouts tests plan them


def layouts_tuner(tmp_path, **config):
    """(model path, model, sample, a Tuner on tmp_path/run (profiled; transforms 0.2 ms each,
    not measured), the model's plan of LAYOUTS_ALGOS with their default knobs in NCHW): the
    layouts phase on the mobile model with synthetic times."""
    from tvm_sparseconv.tune.tuner import TuneConfig, Tuner

    path = mobile_onnx(tmp_path / "mobile.onnx", L + L // 2)
    m = load_model(path)
    x = np.random.default_rng(3).standard_normal((1, 8, 9, 9)).astype(np.float32)
    tuner = Tuner(m, [x], str(tmp_path / "run"), config=TuneConfig(search="exhaustive", **config))
    tuner.profile()
    tuner._transform_ms = lambda shape, src, dst, cache: cache.setdefault((tuple(shape), src, dst), 0.2)
    plan = Plan([PlanLayer(s.key, s.spec.to_dict(), a, get_algorithm(a).knobs(s.spec, None, HOST))
                 for s, a in zip(m.sites, LAYOUTS_ALGOS)])
    return path, m, x, tuner, plan


def test_layouts_phase_puts_the_depthwise_layers_in_blocks(tmp_path):
    """The tuner's layouts phase on the model above with synthetic layer and transform times (no
    measurement: Tuner._measure_one, _in_rounds and _transform_ms replaced): every pair of the
    dense and the grouped workloads is considered, the assignment puts the depthwise layers in
    blocks with their neighbours (2 transforms, at the edges), the plan's grouped knobs are valid
    blocked channels tiles with their NCHW knobs in the note, and the plan compiles and matches
    onnxruntime."""
    path, m, x, tuner, plan = layouts_tuner(tmp_path)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    timed = []

    def ms(knobs):  # a blocked side saves a quarter of the time
        return 1.0 - 0.25 * (knobs["layout_in"] != NCHW) - 0.25 * (knobs["layout_out"] != NCHW)

    def synthetic(w, a, knobs, ref):
        timed.append((a, knobs["layout_in"], knobs["layout_out"]))
        return {"workload": w.id, "algorithm": a, "knobs": knobs, "time_ms": ms(knobs)}

    tuner._measure_one = synthetic
    tuner._in_rounds = lambda w, cands: [{"times_ms": [ms(k)] * 3} for _, k in cands]  # the recheck's rounds
    out = tuner.layouts(plan)
    assert {(a, i, o) for a in ("dense", "grouped") for i, o in pairs(HOST)} <= set(timed)
    assert list(out.layouts().values()) == [(BLOCKED, BLOCKED)] * 4
    for l in out.layers:
        if l.algorithm == "grouped":
            assert l.knobs["vector"] == "channels" and l.knobs["c_block"] == L and "nchw_knobs" in l.note
    lay = json.loads((tmp_path / "run" / "layouts.json").read_text())
    assert [(t["src"], t["dst"]) for t in lay["transforms"]] == [(NCHW, BLOCKED), (BLOCKED, NCHW)]
    b = build(m, out, None)
    assert [t for _, _, t in b.transforms] == [f"nchw->{BLOCKED}", f"{BLOCKED}->nchw"]
    y = b.vm()["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose((y if hasattr(y, "numpy") else y[0]).numpy(), want, rtol=1e-4, atol=1e-4)


def test_a_resumed_layouts_phase_chooses_as_the_first_run(tmp_path):
    """The layouts phase picks each pair's fastest candidate by the times it had before its own
    recheck, in a resumed run too (which reads that recheck back): where the recheck made the
    re-timed candidate slower than another of its pair, the resumed run's plan is still the
    first run's (else refine's kept builds, made for the first plan, are thrown away). Synthetic
    times: each candidate's single time grows with the order it was timed in; the recheck
    triples them."""
    singles = {}

    def synthetic(w, a, knobs, ref):
        base = 1.0 - 0.25 * (knobs["layout_in"] != NCHW) - 0.25 * (knobs["layout_out"] != NCHW)
        ms = singles.setdefault((w.id, a, json.dumps(knobs, sort_keys=True)), base * (1 + 0.01 * len(singles)))
        return {"workload": w.id, "algorithm": a, "knobs": knobs, "time_ms": ms}

    def run():
        _, _, _, tuner, plan = layouts_tuner(tmp_path, recheck_rounds=3)
        tuner._measure_one = synthetic
        tuner._in_rounds = lambda w, cands: [
            {"times_ms": [3 * singles.get((w.id, a, json.dumps(k, sort_keys=True)), 1.0)] * 3} for a, k in cands]
        return tuner, tuner.layouts(plan)

    first_tuner, first = run()
    assert first_tuner.trials.layout_rechecks  # the recheck ran and is in the log
    per_pair = sum(1 for r in first_tuner.trials.records if r["algorithm"] in LAYOUTS_ALGOS) > 2 * len(pairs(HOST))
    assert per_pair  # some pair had more than one candidate: the recheck could reorder them
    _, again = run()
    assert [(l.algorithm, l.knobs) for l in again.layers] == [(l.algorithm, l.knobs) for l in first.layers]
