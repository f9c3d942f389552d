"""AArch64 (NEON) code built here and run on an emulated ARM CPU over TVM's RPC.

Every algorithm's kernels on a small grid against the float64 NumPy reference (the encoders'
arrays against their NumPy twins), the shipped models with a mixed plan against onnxruntime
on this machine, and `tvm-sparseconv tune --rpc-tracker` end to end. Under qemu the timings
mean nothing: these tests check results and the flow, never a speed.

Marked ``arm`` (and ``slow``): they run with ``python -m pytest -m arm``, which has a covering
sample of the kernel grid, MobileNet-V2 and the rest; TVMS_EXTENDED=1 adds the whole grid,
ResNet-50 and the tune (conftest's tiers). arm_bench.py says where the bench comes from and
when they skip.
"""
import dataclasses
import glob
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

from tvm_sparseconv.algorithms import ALGORITHMS
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.compile import build_isolated
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.frontend import load_model
from tvm_sparseconv.images import load_inputs
from tvm_sparseconv.models import known_preprocess, model_path
from tvm_sparseconv.plan import Plan
from tvm_sparseconv.reference import dense_conv2d

from arm_bench import TARGET, bring_up
from conftest import GRID, accepts, activation, assert_conv_close, grid_id, grid_spec, relu_like, small_onnx, weight
from test_models import IMAGES, assert_matches_onnxruntime, mixed_plan
from test_output_stationary_kernels import ENCODERS, assert_encoding_equals_reference

pytestmark = [pytest.mark.arm, pytest.mark.slow]

# 1x1, 3x3, strided with asymmetric padding and batch 2, 7x7 s2, dilation 2, strided 1x1
CASES = [GRID[i] for i in (0, 1, 2, 4, 7, 8)]


@pytest.fixture(scope="session")
def server(request):
    return bring_up(request, tracker=False)


@pytest.fixture(scope="session")
def tracker(request):
    return bring_up(request, tracker=True)


@pytest.fixture(scope="module")
def session(server):
    return server.connect()


def _intact_past_the_count(layer: CompiledLayer, x: np.ndarray) -> None:
    """After a poisoned run, every entry array of a vector encoder still holds the poison past
    its valid prefix: the NEON compaction writes nothing past the count (at the last row, where
    no later store would hide it)."""
    encode, parts = ENCODERS[layer.algorithm.name]
    ref = encode(layer.spec, x, layer.knobs)
    out = layer.produced()
    for p, names in enumerate(parts):
        for name, want in zip(names[1:], ref[3 * p + 1:3 * p + 3]):
            tail = out[name][..., want.shape[-1]:]
            assert (np.isnan(tail) if tail.dtype.kind == "f" else tail == -1).all(), name


@pytest.mark.cover("algorithm", "case")  # the default arm run: each algorithm and case once
@pytest.mark.parametrize("case", CASES, ids=grid_id)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_kernel_on_aarch64(session, algorithm, case):
    spec = grid_spec(case)
    if not accepts(algorithm, spec):  # grouped: the same layer, depthwise with a channel multiplier of 2
        spec = dataclasses.replace(spec, out_channels=2 * spec.in_channels, groups=spec.in_channels)
    w = weight(spec)
    bias = np.linspace(-0.5, 0.5, spec.out_channels).astype(np.float32)
    layer = CompiledLayer(algorithm, spec, w, bias=bias, relu=True, target=TARGET, session=session)
    for d in (0.0, 0.3, 1.0):
        x = activation(spec, d)
        layer.poison()
        assert_conv_close(layer(x), dense_conv2d(spec, x, w, bias, relu=True), spec)
        if algorithm in ENCODERS:
            assert_encoding_equals_reference(layer, x)
        if algorithm in ("pixcsr", "hybrid"):
            _intact_past_the_count(layer, x)


def test_neon_compaction_partial_vectors_and_special_values(session):
    """pixcsr and hybrid with blocks and channel counts that leave partial vectors of 4, rows
    wider than 4 (transposed tiles) and NaN/Inf/-0.0 in the input, on NEON's tbl compaction."""
    spec = Conv2DSpec.from_shapes((1, 22, 5, 19), (24, 22, 3, 3), padding=1)
    w = weight(spec)
    x = activation(spec, 0.4)
    x[0, 3, 2, 4], x[0, 7, 1, 1], x[0, 9, 0, 0], x[0, 21, 4, 18] = np.nan, np.inf, -0.0, -np.inf
    for algorithm, knobs in (("pixcsr", {"c_block": 6}), ("pixcsr", {"c_block": 16}), ("hybrid", {"c_block": 10}),
                             ("hybrid", {"c_block": 22, "dense_from": 2})):
        layer = CompiledLayer(algorithm, spec, w, target=TARGET, knobs=knobs, session=session)
        layer.poison()
        assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
        assert_encoding_equals_reference(layer, x)
        _intact_past_the_count(layer, x)


def run_remote(session, lib_path: str, x: np.ndarray) -> np.ndarray:
    """Upload an exported library, load it on the server and run its main on x there."""
    name = f"model-{uuid.uuid4().hex[:12]}.so"  # a library the server has loaded must not be overwritten
    session.upload(lib_path, name)
    dev = session.cpu()
    vm = relax.VirtualMachine(session.load_module(name), dev)
    out = vm["main"](tvm.runtime.tensor(x, dev))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


@pytest.mark.parametrize("name", ["mobilenet-v2", pytest.param("resnet50-nsfw", marks=pytest.mark.extended)])
def test_model_with_a_mixed_plan_against_onnxruntime(session, name, tmp_path):
    """Every algorithm on some layer of the model, built for AArch64 here, run on the emulated
    CPU, against onnxruntime on this machine."""
    m = load_model(model_path(name))
    x = load_inputs(m, IMAGES[name][1:], preprocess=known_preprocess(name))[0]
    ref = ort.InferenceSession(m.onnx_path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: x})[0]
    plan = mixed_plan(m)
    lib = str(tmp_path / "model.so")
    b = build_isolated(m, plan, TARGET, path=lib)
    assert b.module is None  # not loadable here: an aarch64 library
    assert b.applied == {l.key: l.algorithm for l in plan.layers}
    assert_matches_onnxruntime(run_remote(session, lib, x), ref)


TUNED = ("direct", "dense", "pixcsr", "hybrid", "halo", "cpo")


@pytest.mark.extended  # about 5 minutes under qemu
def test_tune_over_the_rpc_tracker_then_compile_and_run(tracker, tmp_path):
    """`tune --rpc-tracker --exhaustive` to the emulated servers (MetaSchedule's trials for TVM's
    conv2d and every algorithm's knob configs, all timed there) writes a plan made for the NEON CPU; the
    `compile` command builds it with the tuned database into an aarch64 library that matches
    onnxruntime there."""
    rng = np.random.default_rng(0)
    model = small_onnx(tmp_path / "small.onnx")
    inp = tmp_path / "x.npy"
    np.save(inp, relu_like((1, 4, 9, 9), 0.5, rng))
    target = json.dumps(TARGET)
    cli = [sys.executable, "-m", "tvm_sparseconv.cli"]
    res = subprocess.run(cli + ["tune", model, "--inputs", str(inp), "--target", target, "--rpc-tracker",
                                f"{tracker.host}:{tracker.port}", "--rpc-key", tracker.key, "--trials", "8",
                                "--knob-trials", "2", "--exhaustive", "--algorithms", ",".join(TUNED), "--out", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir, = glob.glob(str(tmp_path / "runs" / "small-*"))
    plan = Plan.load(os.path.join(run_dir, "plan.json"))
    assert plan.cpu["isa"] == "neon" and plan.cpu["lanes"] == 4
    assert len(plan.layers) == 2 and all(l.algorithm in TUNED for l in plan.layers)
    with open(os.path.join(run_dir, "trials.jsonl")) as f:
        lines = [json.loads(l) for l in f]
    header, recs = lines[0], [l for l in lines[1:] if "workload" in l]
    assert json.loads(header["target"])["mtriple"] == "aarch64-linux-gnu" and header["cache"] == "cold"
    timed = [r for r in recs if r.get("time_ms")]
    assert {r["algorithm"] for r in timed} == set(TUNED), [r.get("error") for r in recs]
    database = os.path.join(run_dir, "database")
    assert os.path.getsize(os.path.join(database, "database_tuning_record.json")) > 0
    lib = str(tmp_path / "small.so")
    res = subprocess.run(cli + ["compile", model, "--plan", os.path.join(run_dir, "plan.json"), "--database", database,
                                "--target", target, "-o", lib], capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    x = np.load(inp)
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y = run_remote(tracker.connect(), lib, x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
