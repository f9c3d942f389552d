"""`tvm-sparseconv algorithms` and `tvm-sparseconv results`: the registry as a table, and saved
bench / layer results (made here by the real commands on a small case) as markdown by CPU."""
import contextlib
import inspect
import io
import json
import os
import shlex
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_sparseconv.algorithms import ALGORITHMS, SPARSE, get_algorithm
from tvm_sparseconv.cli import main
from tvm_sparseconv.cli.commands import REPRESENTATIVE_LAYER
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.cpu import CPU, cpu_of


def cells(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |"), line
    return [c.strip() for c in line[2:-2].split(" | ")]


def test_algorithms_markdown_is_the_registry(capsys):
    assert main(["algorithms", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = cells(lines[0])
    assert header == ["algorithm", "kind", "tuned by", "fuses residual add", "groups", "knobs", "description"]
    assert lines[1] == "|" + "|".join(["---"] * len(header)) + "|"
    rows = [cells(l) for l in lines[2:]]
    assert all(len(r) == len(header) for r in rows)  # nothing but the table
    assert [r[0] for r in rows] == [f"`{n}`" for n in ALGORITHMS]
    spec = Conv2DSpec.from_shapes(*REPRESENTATIVE_LAYER, 1, 1)
    yes = {True: "yes", False: "no"}
    for r in rows:
        a = get_algorithm(r[0].strip("`"))
        knobs = list(a.default_knobs(spec, cpu_of(None)))
        assert r[1] == ("sparse" if a.sparse else "dense")
        assert r[2] == ("MetaSchedule" if a.metaschedule else "knobs" if knobs else "-")
        assert r[3] == yes[a.fuses_residual] and r[4] == yes[a.groups]
        assert r[5] == (", ".join(f"`{k}`" for k in knobs) or "-")
        doc = " ".join(inspect.getdoc(sys.modules[type(a).__module__]).split())
        assert r[6] and (doc.startswith(r[6]) or doc.startswith(f"{a.name}: {r[6]}"))  # its first sentence


def small_onnx(path, batch=1):
    """x (batch, 4, 9, 9) -> conv 3x3 + bias -> relu -> conv 1x1 -> relu; ``batch`` a size, or a
    name for a free batch dimension (fixed when the model is imported)."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype("float32"), n)
            for n, s in (("w1", (8, 4, 3, 3)), ("b1", (8,)), ("w2", (8, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c2"], ["y"])]
    g = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 9, 9])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 9, 9])], init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A bench --json and a layer --json result, written by the commands themselves (capsys is
    per test: stdout is captured by hand)."""
    d = tmp_path_factory.mktemp("results")
    model = small_onnx(d / "small.onnx")
    np.save(d / "x.npy", np.random.default_rng(1).standard_normal((1, 4, 9, 9)).astype("float32"))
    out = {}
    for name, args in (("layer", ["layer", "--shape", "1,8,10,10", "-m", "16", "--algorithms", "dense,halo",
                                  "--repeat", "2", "--json", "-q"]),
                       ("bench", ["bench", model, "--inputs", str(d / "x.npy"), "--algorithm", "halo",
                                  "--repeat", "2", "--no-peers", "--json"])):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(args) == 0
        (d / f"{name}.json").write_text(buf.getvalue())
        out[name] = (str(d / f"{name}.json"), json.loads(buf.getvalue()), args)
    return d, model, out


def test_bench_and_layer_json_say_what_ran(saved):
    _, model, out = saved
    _, bench, args = out["bench"]
    assert bench["model"] == model and bench["input_shape"] == [1, 4, 9, 9]
    assert bench["command"] == shlex.join(["tvm-sparseconv", *args])
    CPU.from_dict(bench["cpu"])  # a whole CPU description
    _, layer, args = out["layer"]
    assert layer["command"] == shlex.join(["tvm-sparseconv", *args])
    assert layer["cpu"] == bench["cpu"]


def test_results_renders_the_tables_by_cpu(saved, capsys):
    d, model, out = saved
    (bench_path, bench, _), (layer_path, layer, _) = out["bench"], out["layer"]
    md = d / "docs" / "benchmarks.md"
    assert main(["results", bench_path, layer_path, "-o", str(md)]) == 0
    assert capsys.readouterr().out == f"wrote {md}\n"
    text = md.read_text()
    first, rest = text.split("\n", 1)
    assert first.startswith("Generated by `tvm-sparseconv results` from the 2 JSON files in ")
    assert os.path.dirname(bench_path) in first and os.path.dirname(layer_path) in first
    # without -o: the same tables on stdout, without the header line
    assert main(["results", bench_path, layer_path]) == 0
    assert capsys.readouterr().out == rest.lstrip("\n")

    lines = text.splitlines()
    assert lines.count(f"## {CPU.from_dict(bench['cpu'])}") == 1
    rows = {r[0]: r for r in (cells(l) for l in lines if l.startswith("| ") and "---" not in l)}
    header = rows["model"]
    names = [r["name"] for r in bench["rows"]]
    assert header == ["model", "input", "threads", "rounds"] + [f"{n} ms" for n in names] + \
        ["plan speed-up over the best other"]
    row = rows[model]
    assert row[1:4] == ["1x4x9x9", str(bench["threads"]), "1"]
    assert row[-1] == f"{bench['speedup_vs_best']:.2f}x"
    for cell, r in zip(row[4:-1], bench["rows"]):
        assert float(cell) == pytest.approx(r["ms"], abs=0.01)
    assert f"- {model}: `{bench['command']}`" in lines

    label = "1x8x10x10 -> 16, 3x3, stride 1, pad 1"
    rows_here = [cells(l) for l in lines if l.startswith(f"| {label} |")]
    summary, layer_rows = [r for r in rows_here if len(r) == 7], [r for r in rows_here if len(r) == 6]
    times = {r["algorithm"]: r["time_ms"] for r in layer["results"]}
    dense_best = min(t for a, t in times.items() if a not in SPARSE)
    # the summary: the fastest algorithm; no peer ran, so no ratio
    assert len(summary) == 1 and summary[0][2] == min(times, key=times.get) and summary[0][5:] == ["-", "-"]
    assert [r[3] for r in layer_rows] == ["dense", "halo"]
    for r in layer_rows:
        assert r[1] == f"{layer['density']:.3f}" and r[2] == str(layer["threads"])
        assert float(r[4]) == pytest.approx(times[r[3]], abs=1e-3)
        assert r[5] == f"{dense_best / times[r[3]]:.2f}x"
    assert f"- {label}: `{layer['command']}`" in lines


def test_results_groups_by_cpu_and_refuses_other_json(saved, tmp_path, capsys):
    _, _, out = saved
    layer_path, layer, _ = out["layer"]
    other = dict(layer, cpu=dict(layer["cpu"], name="haswell", isa="avx2", lanes=8, registers=16, cores=4))
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["results", layer_path, str(tmp_path / "other.json")]) == 0
    text = capsys.readouterr().out
    heads = [l for l in text.splitlines() if l.startswith("## ")]
    assert heads == [f"## {CPU.from_dict(layer['cpu'])}", f"## {CPU.from_dict(other['cpu'])}"]
    first, second = text.split(heads[1])
    assert first.count("Every algorithm:") == 1 and second.count("Every algorithm:") == 1
    assert "| dense |" in first and "| dense |" in second

    (tmp_path / "plan.json").write_text(json.dumps({"format": "tvm-sparseconv-plan"}))
    assert main(["results", str(tmp_path / "plan.json")]) == 2
    assert "is not the output of `bench --json`, `layer --json` or `memory --json`" in capsys.readouterr().err
