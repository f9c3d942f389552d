"""Every kernel built for the x86 ISAs other than the host's; the CPU description of a target.

The rest of the suite runs the kernels built for the host. Here each algorithm is built for
AVX2 (haswell), for SSE (x86-64-v2: 4 lanes and no masked store, as NEON) and, on a host
without AVX-512, for AVX-512 (built, not run: the skip says so). Code the host can run is
checked against the float64 reference, and the sparse encoders' arrays against their NumPy
twins (the per-ISA compactions must write exactly the format).
"""
import os
import platform

import numpy as np
import pytest
import tvm
from tvm import relax

from test_residual import block_module
from tvm_sparseconv.algorithms import ALGORITHMS, get_algorithm
from tvm_sparseconv.api import pipeline
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv import cpu as cpu_mod
from tvm_sparseconv.cpu import CPU, cpu_of
from tvm_sparseconv.passes.stack_scratch import TIR_PIPELINE
from tvm_sparseconv.reference import dense_conv2d
from tvm_sparseconv.target import host_cpu, make_target

from arm_bench import TARGET as ARM_TARGET
from conftest import AVX2_TARGET, AVX512_TARGET, GRID, HOST, SSE_TARGET, accepts, activation, assert_conv_close, \
    grid_id, grid_spec, isa_cases, weight
from test_output_stationary_kernels import ENCODERS, assert_encoding_equals_reference

# 1x1, 3x3, strided with asymmetric padding and batch 2, 7x7 s2, dilation 2, strided 1x1
CASES = [GRID[i] for i in (0, 1, 2, 4, 7, 8)]
# SSE: the kernels whose code depends on the vector width (encoders, register tiles)
SSE_ALGORITHMS = ("dense", "halo", "pixcsr", "hybrid", "cpo")


def _cases():
    for name, target, runs in isa_cases():
        for algorithm in ALGORITHMS:
            if name != "sse" or algorithm in SSE_ALGORITHMS:
                yield pytest.param(name, target, runs, algorithm, id=f"{name}-{algorithm}")


@pytest.mark.slow  # a grid: the default run covers each ISA, algorithm and case once, the extended run all
@pytest.mark.cover("isa", "algorithm", "case")
@pytest.mark.parametrize("case", CASES, ids=grid_id)
@pytest.mark.parametrize("isa,target,runs,algorithm", list(_cases()))
def test_every_kernel_on_the_other_isas(isa, target, runs, algorithm, case):
    spec = grid_spec(case)
    if not accepts(algorithm, spec):
        pytest.skip(f"{algorithm} does not compute groups=1 (test_grouped.py builds it for each ISA)")
    w = weight(spec)
    layer = CompiledLayer(algorithm, spec, w, target=target)
    if not runs:
        pytest.skip(f"built for {isa} without running it: this host ({HOST.name}) has no {isa}")
    for d in (0.0, 0.3, 1.0):
        x = activation(spec, d)
        assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
        if algorithm in ENCODERS:
            assert_encoding_equals_reference(layer, x)


@pytest.mark.parametrize("isa,target,runs", [c[:3] for c in isa_cases()], ids=[c[0] for c in isa_cases()])
def test_channels_not_a_multiple_of_the_lanes(isa, target, runs):
    """pixcsr and hybrid with blocks and channel counts that leave partial vectors, wide rows
    (transposed tiles) and NaN/Inf/-0.0 in the input, on each ISA's compaction."""
    spec = Conv2DSpec.from_shapes((1, 20, 5, 19), (24, 20, 3, 3), padding=1)
    w = weight(spec)
    x = activation(spec, 0.4)
    x[0, 3, 2, 4], x[0, 7, 1, 1], x[0, 9, 0, 0] = np.nan, np.inf, -0.0
    for algorithm, knobs in (("pixcsr", {"c_block": 12}), ("pixcsr", {"c_block": 16}), ("hybrid", {"c_block": 12}),
                             ("hybrid", {"c_block": 20, "dense_from": 2})):
        layer = CompiledLayer(algorithm, spec, w, target=target, knobs=knobs)
        if not runs:
            pytest.skip(f"built for {isa} without running it: this host ({HOST.name}) has no {isa}")
        assert_conv_close(layer(x), dense_conv2d(spec, x, w), spec)
        assert_encoding_equals_reference(layer, x)


def test_cpu_descriptions():
    avx512, avx2, sse = cpu_of(AVX512_TARGET), cpu_of(AVX2_TARGET), cpu_of(SSE_TARGET)
    assert (avx512.isa, avx512.lanes, avx512.registers, avx512.compress, avx512.masked_store) == \
        ("avx512", 16, 32, True, True)
    assert (avx2.isa, avx2.lanes, avx2.registers, avx2.compress, avx2.masked_store) == ("avx2", 8, 16, False, True)
    assert (sse.lanes, sse.registers, sse.masked_store) == (4, 16, False)
    assert avx2.accumulators == 8 and avx512.accumulators == 16
    # mattr takes AVX-512 away from an AVX-512 cpu; num-cores is the target's
    no512 = cpu_of({"kind": "llvm", "mcpu": "znver4", "mattr": ["-avx512f"], "num-cores": 6})
    assert no512.isa == "avx2" and no512.cores == 6
    # another family's caches come from the table, not from this machine
    assert (avx2.l1d, avx2.l2) == (32 << 10, 256 << 10)
    arm = cpu_of({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1", "num-cores": 4})
    assert (arm.isa, arm.lanes, arm.registers, arm.compress, arm.l1d, arm.cores) == ("neon", 4, 32, False, 64 << 10, 4)
    assert CPU.from_dict(arm.to_dict()) == arm


def test_fma_units_per_family():
    """Vector FMAs per cycle: two on cores with two FMA units of the widest width, one where a
    512-bit FMA takes both 256-bit units (Zen 4) or one port (Rocket Lake); a family the table
    lacks gets the generic two; a description saved before the field existed gets the table's.
    (This machine's own name is left out: its flags may raise it, as the next test checks.)"""
    expected = {"znver4": 1, "znver5": 2, "emeraldrapids": 2, "rocketlake": 1, "haswell": 2,
                "znver3": 2, "x86-64": 2}
    others = [m for m in expected if m != host_cpu()]
    assert {m: cpu_of({"kind": "llvm", "mcpu": m, "num-cores": 2}).fma_units for m in others} == \
        {m: expected[m] for m in others}
    zen4 = cpu_of({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    old = {k: v for k, v in zen4.to_dict().items() if k != "fma_units"}
    assert CPU.from_dict(old) == zen4
    assert "1 FMA/cycle" in str(zen4)


def test_every_x86_family_in_the_tables_is_an_llvm_cpu():
    """Each x86 name of CACHE_DEFAULTS and FMA_UNITS is a CPU LLVM knows (a misspelt one would
    never match a target's mcpu), has x86 vectors, and a target naming it (not this machine)
    gets the table's caches and FMA units."""
    known = set(tvm.get_global_func("target.llvm_get_cpu_archlist")(tvm.target.Target("llvm")))
    arm = ("neoverse", "cortex", "apple", "ampere", "carmel")
    x86 = sorted({n for n in [*cpu_mod.CACHE_DEFAULTS, *cpu_mod.FMA_UNITS] if not n.startswith(arm)} - {host_cpu()})
    assert set(x86) <= known, set(x86) - known
    for name in x86:
        cpu = cpu_of({"kind": "llvm", "mcpu": name, "num-cores": 2})
        assert cpu.isa in ("avx512", "avx2") and cpu.lanes in (8, 16), (name, cpu)
        assert (cpu.l1d, cpu.l2, cpu.l3) == cpu_mod.CACHE_DEFAULTS.get(name, cpu_mod.GENERIC_CACHES), name
        assert cpu.fma_units == cpu_mod.FMA_UNITS.get(name, cpu_mod.GENERIC_FMA_UNITS), name


def test_fma_units_of_a_server_core_shown_as_another(tmp_path):
    """A guest shown a client model (LLVM rocketlake: one 512-bit FMA unit) on a Xeon with AMX
    gets the Xeon's two units from its flags; a host without such flags keeps the table's."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile avx512_fp16\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx512f amx_bf16 amx_tile avx512_fp16\n")
    assert cpu_mod._host_fma_units(str(info)) == 2
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma avx512f\n")
    assert cpu_mod._host_fma_units(str(info)) is None
    assert cpu_mod._host_fma_units(str(tmp_path / "missing")) is None
    host = cpu_of({"kind": "llvm", "mcpu": host_cpu(), "num-cores": 2})
    table = cpu_mod.FMA_UNITS.get(host_cpu(), cpu_mod.GENERIC_FMA_UNITS)
    assert host.fma_units == max(table, cpu_mod._host_fma_units() or 0)


def test_host_description_reads_this_machine():
    if os.environ.get("TVMS_TARGET"):
        pytest.skip("TVMS_TARGET names the CPU to build for instead of this machine's")
    host = cpu_of(None)
    assert host.name == make_target(None).attrs["mcpu"]
    assert host.l1d >= 16 << 10 and host.l2 >= host.l1d
    with open("/proc/cpuinfo") as f:
        flags = next((l for l in f if l.startswith(("flags", "Features"))), "")
    if " avx512f" in flags:
        assert host.isa == "avx512"
    elif " avx2" in flags:
        assert host.isa == "avx2"


def test_a_bare_llvm_target_is_this_cpu():
    """A bare "llvm" names this machine as {"kind": "llvm"} does: the mcpu that cpu_of assumes,
    so LLVM builds the ISA the kernels are written for (pixcsr from a bare "llvm" on an AVX2
    host aborted the process in LLVM's instruction selection); the kernel matches NumPy."""
    assert make_target("llvm").attrs["mcpu"] == host_cpu() == make_target({"kind": "llvm"}).attrs["mcpu"]
    # so is any llvm target of this architecture without mcpu, in every form, and cpu_of agrees
    forms = (tvm.target.Target("llvm"), tvm.target.Target({"kind": "llvm", "num-cores": 3, "mattr": ["+fma"]}))
    for form in forms:
        t = make_target(form)
        assert t.attrs["mcpu"] == host_cpu() and int(t.attrs["num-cores"]) > 0
        assert cpu_of(form).name == host_cpu()
    kept = make_target(forms[1])  # what a target names is kept
    assert int(kept.attrs["num-cores"]) == 3 and list(kept.attrs["mattr"]) == ["+fma"]
    assert make_target(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})).attrs["mcpu"] == "haswell"
    spec = Conv2DSpec.from_shapes((1, 16, 10, 10), (16, 16, 3, 3), padding=1)
    w, x = weight(spec), activation(spec, 0.4)
    assert_conv_close(CompiledLayer("pixcsr", spec, w, target="llvm")(x), dense_conv2d(spec, x, w), spec)


def test_tvm_compile_for_a_target_without_mcpu():
    """tvm.compile(mod, target="llvm", relax_pipeline=pipeline(...)) builds every function for
    LLVM's generic CPU, whatever the pass does; the kernels are written for that CPU (SSE2 on
    x86-64: pixcsr written for this AVX2 host aborted the process in LLVM) and say so."""
    mod, reference = block_module(projection=True)
    x = np.random.default_rng(2).standard_normal((1, 8, 9, 9)).astype("float32")
    x[x < 0.3] = 0  # sparse enough that pixcsr's encoder has work to skip
    for algorithm in ("pixcsr", "dense"):
        with pytest.warns(UserWarning, match="names no mcpu"):
            ex = tvm.compile(mod, target="llvm", relax_pipeline=pipeline(algorithm=algorithm),
                             tir_pipeline=TIR_PIPELINE)
        y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(y, reference(x), rtol=1e-4, atol=1e-4)


def test_a_target_that_is_not_json_and_a_negative_thread_count_are_clear_errors():
    from tvm_sparseconv.target import set_num_threads

    with pytest.raises(ValueError, match=r"the target '\{\"kind\": llvm\}' is not valid JSON"):
        make_target('{"kind": llvm}')
    with pytest.raises(ValueError, match="threads must be a count of threads .0: all cores., got -3"):
        set_num_threads(-3)


def test_a_foreign_triple_gets_no_host_cpu():
    foreign = "aarch64-linux-gnu" if platform.machine() != "aarch64" else "x86_64-linux-gnu"
    for form in ({"kind": "llvm", "mtriple": foreign}, tvm.target.Target({"kind": "llvm", "mtriple": foreign})):
        t = make_target(form)
        assert "mcpu" not in t.attrs or str(t.attrs["mcpu"]) != HOST.name


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "direct"])
def test_defaults_follow_the_target(algorithm):
    """Defaults never exceed the target's registers: on AVX2 no tile is sized for 32 zmm, on
    NEON none for 16 lanes."""
    algo = get_algorithm(algorithm)
    for target in (AVX2_TARGET, SSE_TARGET, AVX512_TARGET, ARM_TARGET):
        cpu = cpu_of(target)
        for case in GRID + [((1, 256, 56, 56), 256, (3, 3), 1, 1, 1), ((1, 256, 14, 14), 1024, (1, 1), 1, 0, 1)]:
            spec = grid_spec(case)
            k = algo.knobs(spec, None, cpu)
            if "block" in k and algorithm in ("halo", "im2csr", "hybrid") or k.get("kernel") == "window":
                assert k["block"] * k["m_tile"] / cpu.lanes <= cpu.registers * 3 // 4, (target, case, k)
