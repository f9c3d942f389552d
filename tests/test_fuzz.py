"""`tvm-sparseconv fuzz`: the layer generator covers what it promises, a campaign checks every
candidate against the float64 reference, and wrong answers, crashes and out-of-bounds accesses
are reported as such, not hidden and not fatal.

The jobs below that run in the worker are module-level functions of this test module: the
spawned child imports it by name (tests/ is on the sys.path it inherits), as in test_worker.py.
"""
import json
import os

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from tvm_sparseconv import fuzz
from tvm_sparseconv.algorithms import ALGORITHMS, KnobError, get_algorithm, knob_space
from tvm_sparseconv.cli import main
from tvm_sparseconv.conv import Conv2DSpec

from conftest import accepts

SPECS = 300  # generated layers the coverage tests look at (no build: well under a second each)


@pytest.fixture(scope="module")
def generated():
    """(layer, activation) for the first SPECS layers of campaign 0."""
    out = []
    for k in range(SPECS):
        layer = fuzz.generate_layer(0, k)
        out.append((layer, layer.arrays()[0]))
    return out


def test_the_generator_covers_every_feature(generated):
    seen = {}
    for layer, x in generated:
        for f in fuzz.layer_features(layer, x):
            seen[f] = seen.get(f, 0) + 1
    missing = [f for f in fuzz.FEATURES if f not in seen]
    assert not missing, f"no layer of {SPECS} has {missing}"
    assert set(seen) <= set(fuzz.FEATURES)
    # and none is a fluke: every feature in at least 1 % of the layers
    assert min(seen.values()) >= SPECS // 100, sorted(seen.items(), key=lambda kv: kv[1])[:5]


def test_generated_layers_stay_within_the_ranges(generated):
    for layer, x in generated:
        s = layer.spec
        assert 1 <= s.batch <= 3 and 1 <= s.in_channels <= 40 and 1 <= s.out_channels <= 40
        assert 1 <= s.height <= 24 and 1 <= s.width <= 24
        assert 1 <= s.kernel_h <= 5 and 1 <= s.kernel_w <= 5
        assert set(s.stride) <= {1, 2, 3} and set(s.dilation) <= {1, 2}
        assert s.out_h >= 1 and s.out_w >= 1  # the kernel fits: Conv2DSpec validated it
        assert x.shape == s.x_shape and x.dtype == np.float32
    kinds = {layer.padding_kind for layer, _ in generated}
    assert kinds == set(fuzz.PADDINGS)


def test_a_layer_is_a_function_of_its_campaign_seed_and_index():
    a, b = fuzz.generate_layer(5, 17), fuzz.generate_layer(5, 17)
    assert a == b and a.seed == fuzz.layer_seed(5, 17)
    for u, v in zip(a.arrays(), b.arrays()):
        assert (u is None and v is None) or np.array_equal(u, v, equal_nan=True)
    assert fuzz.generate_layer(5, 18).seed != a.seed and fuzz.generate_layer(6, 17).seed != a.seed


def test_special_values_sit_where_the_recipe_says():
    layers = (fuzz.generate_layer(0, k) for k in range(1000))
    layer = next(l for l in layers if set(l.specials) == set(fuzz.SPECIALS) and l.residual)
    x, w, bias, res = layer.arrays()
    assert np.isnan(x).any() and np.isposinf(x).any() and np.isneginf(x).any()
    assert ((x == 0) & np.signbit(x)).any()
    assert np.isnan(res).any() and np.isinf(res).any()  # the residual carries them too
    assert np.isfinite(w).all()  # finite weights: the NaN/Inf promise of docs/algorithms.md 0.3


def test_candidates_take_what_each_algorithm_accepts(generated):
    grouped = next(layer for layer, _ in generated if layer.spec.groups > 1)
    assert {c.algorithm for c in fuzz.candidates(grouped)} == {a for a in ALGORITHMS if get_algorithm(a).groups}
    plain = [layer for layer, _ in generated if layer.spec.groups == 1 and layer.residual][:20]
    defaults = sampled = 0
    for layer in plain:
        cands = fuzz.candidates(layer)
        # one dict each, in registry order; an algorithm for grouped layers only is left out
        assert [c.algorithm for c in cands] == [a for a in ALGORITHMS if accepts(a, layer.spec)]
        assert len(cands) >= len(ALGORITHMS) - 1
        for c in cands:
            space = knob_space(c.algorithm, layer.spec)
            assert c.knobs in space and c.sampled == (c.knobs != space[0])
            assert c.residual == get_algorithm(c.algorithm).fuses_residual
            if len(space) > 1:
                defaults += not c.sampled
                sampled += c.sampled
        assert fuzz.candidates(layer) == cands  # drawn from the layer's seed
    assert defaults and sampled  # the defaults in about half the draws, the rest of the space too
    layer = plain[0]
    whole = fuzz.candidates(layer, ["halo"], knob_dicts=10 ** 6)
    assert [c.knobs for c in whole] == knob_space("halo", layer.spec)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_a_small_slice_through_the_cli(tmp_path, capsys):
    out = tmp_path / "fuzz.json"
    rc = main(["fuzz", "--layers", "6", "--seed", "3", "--algorithms", "direct,dense,halo", "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.out
    assert _last_line(cap.out).startswith("6 layers, 0 wrong, 0 errors")
    assert "[fuzz]" in cap.err and "ETA" in cap.err and "layers/minute" in cap.err
    saved = json.loads(out.read_text())
    assert saved["layers"] == 6 and saved["wrong"] == saved["errors"] == 0 and saved["failures"] == []
    assert saved["candidates"] == 4 * 3 + 2 and set(saved["seconds_by_algorithm"]) == {"direct", "dense", "halo"}


def test_a_campaign_cut_short_is_kept_layer_by_layer_and_resumed(tmp_path, capsys):
    """The --json file after each layer: a campaign stopped after its third layer has the three
    in it, and --resume runs the other three only, to the counts of one run of all six; a resume
    with other algorithms, or from a file that is not a campaign's, is refused."""
    whole = fuzz.run_campaign(3, 6, algorithms=("direct", "dense"), progress=False)
    seen = []

    def stop_after_three(res):
        seen.append(res.layers)
        (tmp_path / "part.json").write_text(json.dumps(res.to_dict()))
        if res.layers == 3:
            raise KeyboardInterrupt  # as a kill between layers would leave the file

    part = fuzz.run_campaign(3, 6, algorithms=("direct", "dense"), progress=False, on_layer=stop_after_three)
    assert part.interrupted and seen == [1, 2, 3] and part.done == [0, 1, 2]
    out = tmp_path / "part.json"
    rc = main(["fuzz", "--layers", "6", "--seed", "3", "--algorithms", "direct,dense", "--resume", str(out)])
    cap = capsys.readouterr()
    assert rc == 0 and _last_line(cap.out).startswith("6 layers, 0 wrong, 0 errors"), cap.out
    assert "3/3" in cap.err  # three layers left to run, not six
    saved = json.loads(out.read_text())
    assert saved["done"] == list(range(6)) and saved["candidates"] == whole.candidates > 6
    assert saved["elapsed_s"] > part.elapsed_s
    assert main(["fuzz", "--layers", "6", "--seed", "3", "--algorithms", "direct", "--resume", str(out)]) == 2
    assert "the campaign resumed was run with" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps({"layers": 2, "done": [0]}))
    assert main(["fuzz", "--resume", str(tmp_path / "other.json")]) == 2
    assert "is not the JSON of a fuzz campaign" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.extended  # 40 layers through every algorithm: about 10 minutes
def test_a_bigger_slice_through_the_cli(capsys):
    rc = main(["fuzz", "--layers", "40", "--seed", "2024"])
    cap = capsys.readouterr()
    assert _last_line(cap.out).startswith("40 layers, 0 wrong, 0 errors"), cap.out
    assert rc == 0


def _plain_layer(seed: int = 0) -> int:
    """The index of the first layer of campaign ``seed`` without groups (every algorithm takes it)."""
    return next(k for k in range(100) if fuzz.generate_layer(seed, k).spec.groups == 1)


def test_a_wrong_answer_is_reported_and_fails_the_run(monkeypatch, tmp_path, capsys):
    true_reference = fuzz.reference_output
    monkeypatch.setattr(fuzz, "reference_output", lambda *a: true_reference(*a) + 1.0)  # computed here
    k = _plain_layer()
    out = tmp_path / "wrong.json"
    rc = main(["fuzz", "--seed", "0", "--only", str(k), "--algorithms", "halo,direct", "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 1
    assert _last_line(cap.out).startswith("1 layers, 2 wrong, 0 errors")
    assert f"WRONG layer {k}" in cap.out and f"--only {k} --algorithms halo" in cap.out
    cases = json.loads(out.read_text())["failures"]
    assert [c["algorithm"] for c in cases] == ["halo", "direct"] and all(c["status"] == "wrong" for c in cases)
    for c in cases:  # what re-runs it: the layer, its seeds, the knobs, and the error against the reference
        assert abs(c["max_abs_error"] - 1.0) < 1e-3 and c["max_abs_error"] > c["tolerance"]
        assert c["layer"] == k and c["layer_seed"] == fuzz.layer_seed(0, k) and c["campaign_seed"] == 0
        assert Conv2DSpec.from_dict(c["spec"]) == fuzz.generate_layer(0, k).spec
        assert "largest finite error" in c["error"]


def test_a_nan_where_the_reference_has_a_number_is_wrong():
    ref = np.zeros((1, 2, 3, 3), np.float32)
    y = ref.copy()
    y[0, 1, 2, 0] = np.nan
    assert "NaN at 1 elements where the reference has none, the first at (0, 1, 2, 0)" in fuzz.mismatch(y, ref)
    y[0, 1, 2, 0] = 0
    ref[0, 0, 0, 0] = np.inf
    assert "no +Inf at 1 elements" in fuzz.mismatch(y, ref)


def abort_for_halo(algorithm, *args):
    """A job that dies as LLVM does on a fatal error for halo, and checks the others as usual."""
    if algorithm == "halo":
        os.write(2, b"LLVM ERROR: Cannot select: fuzz test\n")
        os.abort()
    return fuzz.check_candidate(algorithm, *args)


def test_a_crashing_candidate_is_an_error_and_the_campaign_goes_on():
    k = _plain_layer()
    failures = []
    res = fuzz.run_campaign(0, only=[k], algorithms=("halo", "direct"), progress=False,
                            on_failure=failures.append, job=abort_for_halo)
    assert (res.layers, res.wrong, res.errors, res.candidates) == (1, 0, 1, 2)  # direct ran after halo's crash
    assert [(c["algorithm"], c["status"]) for c in failures] == [("halo", "error")]
    assert failures[0]["error"].startswith("CandidateCrash: worker killed by SIGABRT: LLVM ERROR: Cannot select")


@T.prim_func
def _shift_copy(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32"), n: T.Buffer((1,), "int32")):
    T.func_attr({"global_symbol": "shift_copy", "tirx.noalias": True})
    for i in T.parallel(64):
        b[i + n[0]] = a[i] + 1.0  # n > 0: writes past the end of b


@T.prim_func
def _shift_read(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32"), n: T.Buffer((1,), "int32")):
    T.func_attr({"global_symbol": "shift_read", "tirx.noalias": True})
    for i in T.parallel(64):
        b[i] = a[i + n[0]]  # n > 0: reads past the end of a


def _run_guarded(func, name: str, shift: int):
    ex = tvm.compile(tvm.IRModule({name: func}), target="llvm")
    bufs = {"a": tvm.runtime.tensor(np.arange(64, dtype=np.float32)),
            "b": tvm.runtime.tensor(np.zeros(64, np.float32)),
            "n": tvm.runtime.tensor(np.array([shift], np.int32))}
    zones = fuzz.Redzones(bufs)
    found, outs = [], []
    for which in (0, 1):
        zones.fill(which)
        ex[name](bufs["a"], bufs["b"], bufs["n"])
        found += zones.damage(which)
        outs.append(bufs["b"].numpy().copy())
    return found, outs


def test_the_bounds_check_sees_writes_and_reads_outside_a_buffer():
    found, outs = _run_guarded(_shift_copy, "shift_copy", 0)
    assert found == [] and np.array_equal(outs[0], np.arange(64) + 1.0)  # in bounds: nothing, same output
    found, _ = _run_guarded(_shift_copy, "shift_copy", 3)
    assert found == ["b: wrote 3 elements past its end (from element 64 of 64)"] * 2  # once per guard pattern
    found, outs = _run_guarded(_shift_read, "shift_read", 2)
    assert found == []
    assert not np.array_equal(outs[0], outs[1], equal_nan=True)  # the output depends on the guard bytes


def test_the_bounds_check_leaves_buffers_aligned_and_their_contents_in_place():
    src = {"x": tvm.runtime.tensor(np.arange(10, dtype=np.float32).reshape(2, 5)),
           "p": tvm.runtime.tensor(np.arange(7, dtype=np.int32))}
    bufs = dict(src)
    zones = fuzz.Redzones(bufs)
    for k in src:
        assert bufs[k] is not src[k] and np.array_equal(bufs[k].numpy(), src[k].numpy())
        whole, _ = zones.zones[k]
        assert (whole.ctypes.data + fuzz.Redzones.GUARD_BYTES) % 64 == 0  # the kernels assume 64-byte alignment
        assert whole.size == 2 * fuzz.Redzones.GUARD_BYTES + src[k].numpy().nbytes


def test_an_out_of_bounds_error_fails_the_candidate_not_the_campaign(monkeypatch):
    monkeypatch.setenv("TVMS_IN_PROCESS", "1")  # the job raises at once: no child needed
    k = _plain_layer()
    res = fuzz.run_campaign(0, only=[k], algorithms=("dense",), progress=False, job=raise_out_of_bounds)
    assert (res.errors, res.wrong) == (1, 0)
    assert res.failures[0]["error"] == "OutOfBounds: out-of-bounds write: y: wrote 4 bytes past its end"


def raise_out_of_bounds(*args):
    raise fuzz.OutOfBounds("out-of-bounds write: y: wrote 4 bytes past its end")


def refuse_every_knob(algorithm, *args):
    raise KnobError(f"{algorithm}: no such tile here")


def test_a_refused_sampled_knob_is_a_refusal_but_refused_defaults_are_an_error(monkeypatch):
    monkeypatch.setenv("TVMS_IN_PROCESS", "1")  # the job raises at once: no child needed
    k = _plain_layer()
    space = knob_space("halo", fuzz.generate_layer(0, k).spec)
    res = fuzz.run_campaign(0, only=[k], algorithms=("halo",), knob_dicts=len(space), progress=False,
                            job=refuse_every_knob)
    assert (res.candidates, res.refusals, res.errors, res.wrong) == (len(space), len(space) - 1, 1, 0)
    assert res.failed and [(c["knobs"], c["sampled_knobs"]) for c in res.failures] == [(space[0], False)]
    assert res.failures[0]["error"] == "KnobError: halo: no such tile here"
