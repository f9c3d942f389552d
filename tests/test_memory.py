"""tvm-sparseconv memory: per-layer workspaces against the rewritten module itself, Relax's storage
plan, the peak RSS of an exported library and of onnxruntime in fresh processes, the formats'
storage against the compiled encoders, and the command."""
import json
import math
import os

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_sparseconv import memory
from tvm_sparseconv.algorithms import ALGORITHMS, get_algorithm
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.cli import main
from tvm_sparseconv.compile import build, lower
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.frontend import at_batch, load_model
from tvm_sparseconv.images import batch_input
from tvm_sparseconv.plan import Plan, PlanError, PlanLayer
from tvm_sparseconv.reference import dense_conv2d
from tvm_sparseconv.reference.storage import im2col_storage, mec_storage
from tvm_sparseconv.stages import ALGORITHM_ATTR, LAYERS_ATTR

from conftest import accepts, small_onnx


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small two-conv ONNX model with a free batch dimension, imported at batch 1, and an input."""
    d = tmp_path_factory.mktemp("memory")
    path = small_onnx(d / "small.onnx", batch="N")
    x = np.random.default_rng(3).standard_normal((1, 4, 9, 9)).astype("float32")
    np.save(d / "x.npy", x)
    return path, load_model(path), x


def reference(path, x):
    """The small model's output in NumPy float64 from its ONNX weights (independent of TVM)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(path).graph
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in g.initializer}
    s1 = Conv2DSpec.from_shapes(x.shape, w["w1"].shape, padding=1)
    h = dense_conv2d(s1, x.astype(np.float64), w["w1"], w["b1"], relu=True)
    s2 = Conv2DSpec.from_shapes(h.shape, w["w2"].shape)
    return dense_conv2d(s2, h, w["w2"], relu=True)


def _bytes(ty) -> int:
    return math.prod(int(v) for v in ty.shape.values) * tvm.runtime.DataType(ty.dtype).bits // 8


def module_layers(mod: tvm.IRModule) -> dict[str, dict]:
    """Per layer key, read from the rewritten module alone: the bytes of every output of its
    stage calls but the last (y), and of the constants those calls read."""
    stage = {gv: f for gv, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and ALGORITHM_ATTR in f.attrs}
    calls, out = {}, {}
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if not (isinstance(v, relax.Call) and v.op == tvm.ir.Op.get("relax.call_tir") and v.args[0] in stage):
                continue
            gv = v.args[0]
            k = calls.get(gv, 0)
            calls[gv] = k + 1
            key = str(stage[gv].attrs[LAYERS_ATTR][k])
            ty = b.var.ty
            outs = list(ty.fields) if isinstance(ty, relax.TupleType) else [ty]
            consts = [a for a in v.args[1].fields if isinstance(a, tvm.ir.expr.Constant)]
            entry = out.setdefault(key, {"outputs": [], "constants": {}})
            entry["outputs"].append([_bytes(o) for o in outs])
            for c in consts:
                entry["constants"][c] = c.value.numpy().nbytes  # a constant two stages read counts once
    return {k: {"workspace": sum(sum(o) for o in e["outputs"][:-1]) + sum(e["outputs"][-1][:-1]),
                "constants": sum(e["constants"].values())} for k, e in out.items()}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_layer_workspaces_are_what_the_rewritten_module_allocates(small, algorithm):
    _, model, _ = small
    plan = Plan.uniform(model.sites, algorithm)
    layers = memory.layer_memory(model, plan)
    mod, applied = lower(model, plan, None)
    seen = module_layers(mod)
    assert [l.key for l in layers] == [s.key for s in model.sites]
    for l, s in zip(layers, model.sites):
        assert l.algorithm == applied[l.key]
        assert l.activation_bytes == math.prod(s.spec.x_shape) * 4
        assert l.workspace_bytes == sum(b["bytes"] for b in l.buffers)
        if l.algorithm == "direct":  # TVM's conv2d: the model's own weight and bias, no stage buffers
            assert l.workspace_bytes == 0 and l.key not in seen
            assert l.constant_bytes == s.weight.nbytes + (s.bias.nbytes if s.bias is not None else 0)
            continue
        assert l.workspace_bytes == seen[l.key]["workspace"], l.buffers
        assert l.constant_bytes == seen[l.key]["constants"]
        # the lowered matrices by their own formulas (reference/storage.py)
        if algorithm == "im2col":
            assert l.workspace_bytes == im2col_storage(s.spec).bytes
        if algorithm == "mec":
            assert l.workspace_bytes == mec_storage(s.spec).bytes
    totals = memory.layer_totals(layers)
    assert totals["workspace_bytes"] == sum(v["workspace"] for v in seen.values())
    assert totals["activation_bytes"] == sum(l.activation_bytes for l in layers)


def test_relax_storage_plan_shares_blocks(small):
    """Both layers' im2col matrices and activations are tensors of the plan; the blocks that hold
    them are fewer and smaller in all than the tensors, and hold the largest one."""
    _, model, _ = small
    plan = Plan.uniform(model.sites, "im2col")
    sp = memory.storage_plan(model, plan)
    layers = memory.layer_memory(model, plan)
    assert sp["tensor_bytes"] >= sum(l.workspace_bytes for l in layers)
    assert max(l.workspace_bytes for l in layers) <= sp["largest_storage_bytes"] <= sp["planned_bytes"]
    assert sp["planned_bytes"] < sp["tensor_bytes"] and sp["storages"] < sp["tensors"]
    assert sp["unplanned_bytes"] == 1 * 8 * 9 * 9 * 4  # the output, which the VM allocates itself


def test_plan_with_batch():
    spec = {"batch": 1, "in_channels": 4, "height": 9, "width": 9, "out_channels": 8, "kernel_h": 3,
            "kernel_w": 3, "stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1}
    p = Plan([PlanLayer("conv000", spec, "halo", {"block": 4})], model={"input_shape": [1, 4, 9, 9]})
    q = p.with_batch(8)
    assert q.layers[0].spec["batch"] == 8 and q.layers[0].knobs == {"block": 4}
    assert q.model["input_shape"] == [8, 4, 9, 9] and p.layers[0].spec["batch"] == 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(PlanError, match="batch"):
            p.with_batch(bad)


def test_peak_rss_of_the_library_and_onnxruntime_at_batch_1_and_2(small, tmp_path):
    """A library exported per batch runs in a fresh process that imports tvm (and neither
    tvm_sparseconv nor torch), onnxruntime in one that imports onnxruntime only; both give
    positive, ordered memory readings and the model's output (against NumPy float64)."""
    path, model, x = small
    for batch in (1, 2):
        m = at_batch(model, batch)
        assert m.input_shape == (batch, 4, 9, 9)
        xb = batch_input([x, 2 * x], batch)
        lib = str(tmp_path / f"halo{batch}.so")
        build(m, Plan.uniform(m.sites, "halo"), None).module.export_library(lib)
        ref = reference(path, xb)
        readings = {}
        for runner, f in (("tvm", lib), ("tvm-runtime", lib), ("onnxruntime", m.onnx_path)):
            r = readings[runner] = memory.peak_rss(runner, f, xb, threads=2)
            assert r["modules"] == [runner.split("-")[0]]
            assert r["libraries"] == {"tvm": ["libtvm_runtime", "libtvm_compiler"], "tvm-runtime": ["libtvm_runtime"],
                                      "onnxruntime": []}[runner]
            assert 0 < r["import_mb"] < r["load_mb"] <= r["peak_mb"] and r["peak_over_import_mb"] > 0
            assert r["peak_mb"] == max(r["load_peak_mb"], r["run_peak_mb"])
            assert r["ru_maxrss_mb"] == pytest.approx(r["peak_mb"], rel=0.05)  # getrusage agrees with VmHWM
            np.testing.assert_allclose(r["output"], ref, rtol=1e-4, atol=1e-4)
        assert readings["tvm-runtime"]["import_mb"] < readings["tvm"]["import_mb"]  # no compiler library


@pytest.mark.slow
def test_measure_model_at_batch_1_and_2(small):
    """The whole measurement: per batch the plan re-batched, both builds exported in the worker
    and measured with onnxruntime, outputs cross-checked."""
    _, model, x = small
    res = memory.measure_model(model, Plan.uniform(model.sites, "halo"), [x, 2 * x], batches=(1, 2), repeat=1)
    assert [e["batch"] for e in res["batches"]] == [1, 2]
    for e in res["batches"]:
        builds = {b["name"]: b for b in e["builds"]}
        assert list(builds) == ["plan", memory.RUNTIME_ONLY, "all dense", "onnxruntime"]
        assert builds["plan"]["layers"] == "halo 2" and builds["all dense"]["layers"] == "dense 2"
        for name, b in builds.items():
            assert b["modules"] == (["onnxruntime"] if name == "onnxruntime" else ["tvm"])
            assert b["peak_mb"] > b["import_mb"] > 0 and len(b["peaks_mb"]) == 1
            assert b["max_abs_error"] < 1e-4
        assert builds["plan"]["storage_plan"]["planned_bytes"] > 0
        assert all(l["spec"]["batch"] == e["batch"] for l in e["layers"])
    one, two = (e["totals"]["workspace_bytes"] for e in res["batches"])
    assert two > one > 0


def test_peak_rss_errors(tmp_path):
    x = np.zeros((1, 4, 9, 9), np.float32)
    with pytest.raises(ValueError, match="unknown runner"):
        memory.peak_rss("pytorch", str(tmp_path / "m.so"), x)
    with pytest.raises(FileNotFoundError, match="not found"):
        memory.peak_rss("tvm", str(tmp_path / "missing.so"), x)
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not a library")
    with pytest.raises(RuntimeError, match="the tvm memory child failed"):
        memory.peak_rss("tvm", str(bad), x)


@pytest.mark.slow
def test_format_storage_against_the_compiled_encoders(small):
    """The stored counts on an activation equal what the compiled stages produce (CompiledLayer,
    independent of the NumPy encoders) and never exceed the worst-case buffers."""
    _, model, x = small
    from tvm_sparseconv.profile import run_with_probes

    _, acts, _ = run_with_probes(model, [x])
    rows = memory.format_storage(model, acts)
    assert [r["key"] for r in rows] == [s.key for s in model.sites]
    for r, s, a in zip(rows, model.sites, acts):
        assert r["density"] == pytest.approx(np.count_nonzero(a[0]) / a[0].size)
        for name in ALGORITHMS:
            f = r["algorithms"][name]
            if not accepts(name, s.spec):  # grouped layers only: it says why it has no row
                assert f == {"error": f"{name} computes grouped and depthwise convs only (groups > 1), not groups=1"}
                continue
            # CPO's and CPS's counts include their column order, a constant rather than a buffer
            consts = get_algorithm(name).constants(s.spec, s.weight, s.bias, f["knobs"])
            assert 0 <= f["bytes"] <= f["worst_case_bytes"] + (consts["cols"].nbytes if name in ("cpo", "cps") else 0)
            if name == "im2col":
                assert (f["elements"], f["bytes"]) == (im2col_storage(s.spec).elements, im2col_storage(s.spec).bytes)
                assert f["cr_vs_im2col"] == 1.0
            if name == "direct":
                assert f["elements"] == 0 and f["cr_vs_im2col"] is None
            if name in ("halo", "pixcsr", "hybrid", "cpo") and s.key == "conv000":
                layer = CompiledLayer(name, s.spec, s.weight, knobs=f["knobs"])
                layer(a[0])
                st = layer.storage()
                assert (f["elements"], f["bytes"]) == (st.elements, st.bytes), name


def run_memory(args, capsys) -> str:
    assert main(["memory", *args]) == 0
    return capsys.readouterr().out


def test_memory_command(small, tmp_path, capsys):
    """The table and the JSON it writes, without onnxruntime and the formats (the slow test below
    has both)."""
    path, _, _ = small
    x = os.path.join(os.path.dirname(path), "x.npy")
    out, md = tmp_path / "m.json", tmp_path / "m.md"
    text = run_memory([path, "--inputs", x, "--algorithm", "pixcsr", "--batch", "1", "--repeat", "1", "--no-peers",
                       "--threads", "2", "--json", str(out), "--markdown", str(md)], capsys)
    res = json.loads(out.read_text())
    assert res["model"] == path and res["plan"] == "all pixcsr" and res["images"] == [x]
    assert [b["name"] for b in res["batches"][0]["builds"]] == ["plan", memory.RUNTIME_ONLY, "all dense"]
    assert [l["algorithm"] for l in res["batches"][0]["layers"]] == ["pixcsr", "pixcsr"]
    assert "formats" not in res
    lines = text.splitlines()
    assert lines[0].startswith(f"{path}: input (1, 4, 9, 9) NCHW, plan all pixcsr")
    layer_rows = [l.split() for l in lines if l.startswith("conv00")]
    ws = {l["key"]: l["workspace_bytes"] for l in res["batches"][0]["layers"]}
    assert [r[:2] for r in layer_rows] == [["conv000", "pixcsr"], ["conv001", "pixcsr"]]
    assert [float(r[4]) for r in layer_rows] == [round(ws[k] / 1e6, 2) for k in ("conv000", "conv001")]
    peaks = [l.split() for l in lines if l.split()[:1] == ["1"]]
    assert [float(r[-5]) for r in peaks] == [round(b["peak_mb"], 1) for b in res["batches"][0]["builds"]]
    assert any(l.startswith("Batch 1: the conv layers' workspaces add up to") for l in lines)
    doc = md.read_text()
    assert doc.startswith(f"# {path}") and "| conv000 | pixcsr |" in doc and "Command: `tvm-sparseconv memory" in doc
    # results renders the saved JSON as the same section, under its CPU
    assert main(["results", str(out)]) == 0
    assert "| conv000 | pixcsr |" in capsys.readouterr().out


@pytest.mark.slow
def test_memory_command_with_onnxruntime_and_formats(small, tmp_path, capsys):
    path, _, _ = small
    x = os.path.join(os.path.dirname(path), "x.npy")
    out = tmp_path / "m.json"
    text = run_memory([path, "--inputs", x, "--algorithm", "hybrid", "--batch", "1", "2", "--repeat", "1",
                       "--formats", "--json", str(out)], capsys)
    res = json.loads(out.read_text())
    assert [e["batch"] for e in res["batches"]] == [1, 2]
    assert [b["name"] for b in res["batches"][1]["builds"]] == ["plan", memory.RUNTIME_ONLY, "all dense", "onnxruntime"]
    assert [l["key"] for l in res["formats"]["layers"]] == ["conv000", "conv001"]
    assert list(res["formats"]["layers"][0]["algorithms"]) == list(ALGORITHMS)
    assert "Formats, stored MB on the samples' activations:" in text
    assert any(l.startswith("Batch 2:") and "onnxruntime" in l for l in text.splitlines())


def test_memory_command_errors(small, tmp_path, capsys):
    path, _, _ = small
    assert main(["memory", str(tmp_path / "missing.onnx"), "--algorithm", "dense"]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["memory", path, "--plan", str(bad), "--batch", "1"]) == 2  # refused before any image is read
    assert "is not a plan" in capsys.readouterr().err
    assert main(["memory", path, "--plan", str(tmp_path / "nope.json")]) == 2
    assert "plan file not found" in capsys.readouterr().err
    other = Plan.uniform(load_model(small_onnx(tmp_path / "o.onnx", batch=2)).sites, "halo").to_dict()
    other["layers"][0]["spec"]["out_channels"] = 16  # another model's layer (the batch alone may differ)
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["memory", path, "--plan", str(tmp_path / "other.json"), "--batch", "1"]) == 2
    assert "conv000" in capsys.readouterr().err  # a plan for another model names the layer
    assert main(["memory", path, "--inputs", os.path.join(os.path.dirname(path), "x.npy"), "--algorithm", "dense",
                 "--batch", "0"]) == 2
    assert "--batch takes positive sizes" in capsys.readouterr().err
