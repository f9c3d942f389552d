"""bench on small Relax modules (test_relax_rewrite's): the per-op breakdown, and rounds
against another plan."""
import numpy as np
import pytest

from tvm_sparseconv import bench
from tvm_sparseconv.compile import build, resolve_plan
from tvm_sparseconv.frontend import Model, load_model
from tvm_sparseconv.plan import Plan

from test_relax_rewrite import small_module


def test_op_breakdown_names_our_kernels_and_the_rest():
    """bench --ops: every call inside the model is timed and filed under its kind."""
    mod, *_ = small_module(groups=2)
    model = load_model(mod)
    plan = resolve_plan(model, None, "pixcsr").to_dict()
    assert [l["algorithm"] for l in plan["layers"]] == ["pixcsr", "grouped"]  # the dense fallback
    plan["layers"][1]["algorithm"], plan["layers"][1]["knobs"] = "direct", {}  # TVM's conv2d on it
    b = build(model, resolve_plan(model, plan), None)
    x = np.random.default_rng(0).standard_normal((1, 4, 9, 9)).astype("float32")
    ops = bench.op_breakdown(b, x, runs=3)
    assert "conv pixcsr" in ops and all(v > 0 for v in ops.values())
    assert not any(k.startswith("pixcsr") or k[-1].isdigit() for k in ops)  # kinds, not call names
    assert any("conv2d" in k for k in ops)  # the fallback, under TVM's own name


def test_bench_rounds_against_another_plan(tmp_path, monkeypatch):
    """bench --baseline PLAN.json --rounds N: both builds timed N times in turn, each checked
    against the other; ``ms`` is the median of the rounds, ``plan_speedup`` the median of the
    per-round ratios ms_other / ms_plan (not the ratio of the medians).

    The builds run and are timed for real, but the times bench sees are scripted (in the order
    of the calls: plan, baseline, plan, baseline, ...), so that the arithmetic is checked
    exactly and nothing depends on this machine's speed."""
    plan_ms, base_ms = [2.0, 4.0, 3.0], [4.0, 4.0, 9.0]  # per-round ratios 2, 1, 3
    script = iter(t for pair in zip(plan_ms, base_ms) for t in pair)
    timed = []
    real = bench.vm_latency_ms

    def scripted(vm, x, repeat=10):
        y, _ = real(vm, x, repeat)
        timed.append(repeat)
        return y, next(script)

    monkeypatch.setattr(bench, "vm_latency_ms", scripted)
    mod, *_ = small_module()
    model = Model(mod, "x", (1, 4, 9, 9), "NCHW", "small")
    other = tmp_path / "other.json"
    Plan.uniform(model.sites, "hybrid").save(str(other))
    x = np.random.default_rng(0).standard_normal((1, 4, 9, 9)).astype("float32")
    res = bench.bench_model(model, x, algorithm="pixcsr", baseline=str(other), repeat=2, peers=False, rounds=3)
    assert timed == [2] * 6  # 3 rounds of the 2 builds, each with the repeat asked for
    plan, base = res["rows"]
    assert res["rounds"] == 3 and base["name"] == "tvm-sparseconv baseline plan"
    assert plan["layers"] == "pixcsr 2" and base["layers"] == "hybrid 2"
    assert (plan["ms"], base["ms"]) == (3.0, 4.0)  # medians of the rounds
    assert base["plan_speedup"] == 2.0 and base["plan_speedup_range"] == [1.0, 3.0]  # of the per-round ratios
    assert res["speedup_vs_best"] == base["ms"] / plan["ms"]
    assert base["max_abs_error"] == 0.0 and plan["max_abs_error"] < 1e-4  # checked against the baseline
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        bench.bench_model(model, x, algorithm="pixcsr", peers=False, rounds=0)


def test_bench_batch_applies_a_batch1_plan(tmp_path, capsys):
    """bench --batch 3 --plan P: the ONNX model imported at batch 3, a plan saved at batch 1
    applied as it is, onnxruntime run on the same 3 images, and the plan's output checked
    against it (max_abs_error); --batch 0 is refused."""
    import json

    from conftest import small_onnx
    from tvm_sparseconv.cli import main

    path = small_onnx(tmp_path / "small.onnx", batch="N")
    one = load_model(path, (1, 4, 9, 9))
    plan = tmp_path / "plan.json"
    Plan.uniform(one.sites, "hybrid").save(str(plan))
    x = np.random.default_rng(0).standard_normal((1, 4, 9, 9)).astype("float32")
    np.save(tmp_path / "x.npy", np.maximum(x, 0))
    args = ["bench", path, "--input-shape", "1,4,9,9", "--inputs", str(tmp_path / "x.npy"), "--plan", str(plan),
            "--repeat", "1", "--json"]
    assert main(args + ["--batch", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in res["rows"]}
    assert res["input_shape"][0] == 3
    assert rows["tvm-sparseconv plan"]["layers"] == "hybrid 2"
    assert "onnxruntime" in rows and rows["tvm-sparseconv plan"]["max_abs_error"] < 1e-4
    assert main(args + ["--batch", "0"]) != 0


def test_bench_flags_a_wrong_output(monkeypatch):
    """A build whose output is far from the reference's (here the plan's, made wrong on purpose
    after it ran) is marked ``wrong`` and logged as a WARNING; the reference is not."""
    real = bench.vm_latency_ms
    calls = []

    def corrupting(vm, x, repeat=10):
        y, ms = real(vm, x, repeat)
        calls.append(1)
        return (y + 1.0 if len(calls) % 2 == 1 else y), ms  # the plan is timed first in each round

    monkeypatch.setattr(bench, "vm_latency_ms", corrupting)
    mod, *_ = small_module()
    model = Model(mod, "x", (1, 4, 9, 9), "NCHW", "small")
    x = np.random.default_rng(0).standard_normal((1, 4, 9, 9)).astype("float32")
    logged = []
    res = bench.bench_model(model, x, algorithm="pixcsr", repeat=1, peers=False, log=logged.append)
    plan, base = res["rows"]
    assert plan["wrong"] and plan["max_abs_error"] >= 1.0 and not base["wrong"]
    assert any(line.startswith("WARNING: tvm-sparseconv plan's output differs") for line in logged)
    assert not bench.wrong_output(1e-4, np.full(3, 0.5)) and bench.wrong_output(float("inf"), np.ones(3))


def two_output_onnx(path) -> str:
    """x (1, 4, 9, 9) -> conv 3x3 -> 8, LeakyReLU -> y (1, 8, 9, 9); and -> conv 1x1 stride 2
    -> 6 -> z (1, 6, 5, 5): a detector's two heads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    init = [numpy_helper.from_array((0.4 * rng.standard_normal(s)).astype("float32"), n)
            for n, s in (("w1", (8, 4, 3, 3)), ("w2", (6, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("LeakyRelu", ["c"], ["y"], alpha=0.1),
             helper.make_node("Conv", ["y", "w2"], ["z"], kernel_shape=[1, 1], strides=[2, 2])]
    value = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    g = helper.make_graph(nodes, "two", [value("x", [1, 4, 9, 9])], [value("y", [1, 8, 9, 9]), value("z", [1, 6, 5, 5])],
                          init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return str(path)


def test_bench_compares_every_output_of_a_two_output_model(tmp_path, monkeypatch):
    """A model with two outputs profiles, and bench checks both against onnxruntime and PyTorch:
    a plan whose second output alone is wrong is flagged."""
    from tvm_sparseconv.profile import profile

    model = load_model(two_output_onnx(tmp_path / "two.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 4, 9, 9)).astype("float32")
    layers, _, outputs = profile(model, [x])
    assert len(layers) == 2 and outputs[0].shape == (8 * 81 + 6 * 25,)
    res = bench.bench_model(model, x, algorithm="dense", repeat=1)
    assert [r["name"] for r in res["rows"]] == ["tvm-sparseconv plan", "tvm-sparseconv all dense", "onnxruntime",
                                                "pytorch"]
    assert all(r["wrong"] is False and r["max_abs_error"] < 1e-4 for r in res["rows"]), res["rows"]
    real, calls = bench.vm_latency_ms, []

    def second_output_off(vm, x, repeat=10):
        y, ms = real(vm, x, repeat)
        calls.append(1)
        if len(calls) % 2 == 1:  # the plan
            y = y.copy()
            y[-1] += 1.0  # the last value of z
        return y, ms

    monkeypatch.setattr(bench, "vm_latency_ms", second_output_off)
    plan, base, *_ = bench.bench_model(model, x, algorithm="dense", repeat=1)["rows"]
    assert plan["wrong"] and not base["wrong"]
