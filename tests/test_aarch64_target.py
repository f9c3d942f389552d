"""AArch64 as a target, without an ARM CPU: the description, the defaults, the NEON code LLVM
emits, cross-linking and the foreign-target paths of the compile flow. (test_arm.py runs the
code on an emulated ARM CPU; it needs the bench.)"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tvm

from tvm_sparseconv.algorithms import ALGORITHMS, get_algorithm
from tvm_sparseconv.algorithms.lanes import NEON_ORDERS
from tvm_sparseconv.build import stage_module
from tvm_sparseconv.compile import build_isolated, resolve_plan
from tvm_sparseconv.conv import Conv2DSpec, Epilogue
from tvm_sparseconv.cpu import CACHE_DEFAULTS, cpu_of
from tvm_sparseconv.frontend import load_model
from tvm_sparseconv.profile import profile
from tvm_sparseconv.target import (CROSS_CC_ENV, CrossCompilerError, cross_compiler, export_library, make_target,
                                   runs_here)

from arm_bench import TARGET
from conftest import accepts, relu_like, small_onnx

ARM_CORES = [c for c in CACHE_DEFAULTS if c.startswith(("neoverse", "cortex", "apple", "ampere", "carmel"))]
HAS_CROSS_GCC = shutil.which("aarch64-linux-gnu-gcc") is not None
needs_cross_gcc = pytest.mark.skipif(not HAS_CROSS_GCC, reason="no aarch64-linux-gnu-gcc here "
                                     "(apt-get install gcc-aarch64-linux-gnu; tools/arm_rpc.sh installs it)")


def test_the_neon_description():
    cpu = cpu_of(TARGET)
    assert (cpu.isa, cpu.lanes, cpu.registers, cpu.masked_store, cpu.compress, cpu.cores) == \
        ("neon", 4, 32, False, False, 2)
    assert cpu.accumulators == 16


@pytest.mark.parametrize("core", ARM_CORES)
def test_a_named_arm_core_is_kept_and_known_to_llvm(core):
    """A real core named in the target stays in it (the defaults add no host cpu), LLVM knows
    it (its features include NEON) and its caches come from the table, not from this machine."""
    t = make_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": core})
    assert str(t.attrs["mcpu"]) == core
    cpu = cpu_of(t)
    assert cpu.isa == "neon" and (cpu.l1d, cpu.l2, cpu.l3) == CACHE_DEFAULTS[core]


def test_no_host_cpu_in_a_foreign_triple_and_no_llvm_complaint(capfd):
    """No mcpu of the host's in an aarch64 target (LLVM would print '-mcpu=... is not valid'
    for every function and build generic code), even when the host's name is given elsewhere."""
    t = make_target(TARGET)
    assert "mcpu" not in t.attrs
    assert str(t.attrs["mtriple"]) == "aarch64-linux-gnu" and int(t.attrs["num-cores"]) == 2
    spec = Conv2DSpec.from_shapes((1, 8, 6, 6), (8, 8, 3, 3), padding=1)
    algo = get_algorithm("dense")
    tvm.compile(stage_module(algo.name, algo.stages(spec, Epilogue(), algo.knobs(spec, None, t), t)), target=t)
    err = capfd.readouterr().err
    assert "is not valid" not in err and "not a recognized processor" not in err, err
    assert not runs_here(t) and runs_here(None)


def test_neon_orders_pack_the_set_lanes_first():
    """The 16-entry table of the NEON compaction, decoded from its two int64 constants: for
    each 4-bit mask, the lanes it sets in ascending order come first."""
    table = np.array(NEON_ORDERS, dtype=np.int64).view(np.uint8)  # little-endian: mask m is byte m
    for m in range(16):
        order = [int(table[m]) >> 2 * k & 3 for k in range(4)]
        selected = [lane for lane in range(4) if m & (1 << lane)]
        assert order[:len(selected)] == selected, m


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_builds_for_aarch64(algorithm):
    """Each algorithm's stages compile to AArch64 code, with defaults inside NEON's registers."""
    cpu = cpu_of(TARGET)
    algo = get_algorithm(algorithm)
    spec = Conv2DSpec.from_shapes((1, 20, 9, 9), (24, 20, 3, 3), padding=1)
    if not accepts(algorithm, spec):  # an algorithm of grouped layers only
        spec = Conv2DSpec.from_shapes((1, 20, 9, 9), (24, 5, 3, 3), padding=1, groups=4)
    k = algo.knobs(spec, None, cpu)
    if "m_tile" in k:
        assert k["m_tile"] <= 8 * cpu.lanes
    ex = tvm.compile(stage_module(algo.name, algo.stages(spec, Epilogue(bias=True, relu=True), k, TARGET)), target=TARGET)
    assert "aarch64" in _llvm_ir(ex)


def _llvm_ir(ex) -> str:
    return next(m.inspect_source("ll") for m in [ex.mod, *ex.mod.imports] if m.kind == "llvm")


def _asm(ex) -> str:
    return next(m.inspect_source("asm") for m in [ex.mod, *ex.mod.imports] if m.kind == "llvm")


@pytest.mark.parametrize("algorithm", ["pixcsr", "hybrid"])
def test_the_vector_encoders_compact_by_tbl_on_neon(algorithm):
    """The encoders' compaction is NEON's table lookup and lane stores: no compress, no
    masked store, no x86 intrinsic, no branch per lane (a per-lane compaction would test each
    lane's bit: far more conditional branches than vectors)."""
    spec = Conv2DSpec.from_shapes((1, 32, 6, 6), (16, 32, 3, 3), padding=1)
    algo = get_algorithm(algorithm)
    stages = algo.stages(spec, Epilogue(), algo.knobs(spec, {"c_block": 32}, TARGET), TARGET)
    ex = tvm.compile(stage_module(algo.name, [st for st in stages if st.kind == "encode"]), target=TARGET)
    ir, asm = _llvm_ir(ex), _asm(ex)
    assert "llvm.aarch64.neon.tbl1" in ir
    assert "vector.compress" not in ir and "masked.store" not in ir and "llvm.x86" not in ir
    assert "\ttbl\t" in asm and "st1\t{" in asm


def test_cross_compiler_is_found_named_or_explained(monkeypatch, tmp_path):
    monkeypatch.delenv(CROSS_CC_ENV, raising=False)
    assert cross_compiler(None) is None  # the host: TVM's default linker
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler at all
    with pytest.raises(CrossCompilerError, match=r"aarch64-linux-gnu-gcc.*apt-get install gcc-aarch64-linux-gnu.*"
                       + CROSS_CC_ENV):
        cross_compiler(TARGET)
    monkeypatch.setenv(CROSS_CC_ENV, "my-aarch64-gcc --sysroot=/x")
    with pytest.raises(CrossCompilerError, match="my-aarch64-gcc"):
        cross_compiler(TARGET)
    fake = tmp_path / "my-aarch64-gcc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert callable(cross_compiler(TARGET))


@needs_cross_gcc
def test_export_library_cross_links_an_aarch64_elf(tmp_path):
    spec = Conv2DSpec.from_shapes((1, 8, 6, 6), (8, 8, 3, 3), padding=1)
    algo = get_algorithm("pixcsr")
    ex = tvm.compile(stage_module(algo.name, algo.stages(spec, Epilogue(), algo.knobs(spec, None, TARGET), TARGET)),
                     target=TARGET)
    path = export_library(ex, str(tmp_path / "k.so"), TARGET)
    head = open(path, "rb").read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    m = load_model(small_onnx(d / "small.onnx"))
    return m, relu_like((1, 4, 9, 9), 0.5, np.random.default_rng(0))


@needs_cross_gcc
def test_build_isolated_for_aarch64_exports_and_does_not_load(tiny, tmp_path):
    m, _ = tiny
    plan = resolve_plan(m, algorithm="pixcsr", target=TARGET)
    with pytest.raises(ValueError, match="aarch64-linux-gnu does not run on this machine"):
        build_isolated(m, plan, TARGET)
    b = build_isolated(m, plan, TARGET, path=str(tmp_path / "m.so"))
    assert b.module is None and set(b.applied.values()) == {"pixcsr"}
    assert int.from_bytes(open(tmp_path / "m.so", "rb").read(20)[18:20], "little") == 183
    with pytest.raises(RuntimeError, match="another architecture"):
        b.vm()


def test_compile_command_without_a_cross_compiler_says_so(tiny, tmp_path):
    """Exit code 2 and one line naming what is missing, before the model is compiled."""
    m, _ = tiny
    res = subprocess.run([sys.executable, "-m", "tvm_sparseconv.cli", "compile", str(m.source), "--algorithm",
                          "dense", "--target", json.dumps(TARGET), "--cross-compiler", "no-such-gcc",
                          "-o", str(tmp_path / "m.so")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "cross compiler 'no-such-gcc' is not on PATH" in res.stderr, res.stderr
    assert not (tmp_path / "m.so").exists()


def test_profile_of_a_foreign_target_runs_here(tiny):
    """Densities do not depend on the CPU: an aarch64 target is profiled on this machine."""
    m, x = tiny
    arm, _, _ = profile(m, [x], TARGET)
    host, _, _ = profile(m, [x], None)
    assert [l.density_mean for l in arm] == [l.density_mean for l in host]
    assert arm[0].density_mean == pytest.approx(float((x != 0).mean()))  # the first conv reads x
