"""passes/fast_math: exp, log, sigmoid, SiLU, tanh, erf and powers by a constant legalized to loops computed in registers, against
NumPy/math float64 over the whole float32 range and its special values, and built without a libm call,
in vectors as wide as the target's."""
import math
import re

import numpy as np
import pytest
import tvm
from tvm import relax, te

from tvm_sparseconv import tir_math
from tvm_sparseconv.passes.fast_math import legalize_map
from tvm_sparseconv.passes.parallelize_rest import ParallelizeRest
from tvm_sparseconv.target import make_target

SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 1e-45, 16.0, 17.0, 86.9, 87.0, 87.1, 88.7, 89.0,
                    1e30, -16.0, -86.9, -87.0, -87.1, -88.7, -89.0, -103.0, -1e30, 3.4e38, -3.4e38], np.float32)


def _inputs(n: int = 4096) -> np.ndarray:
    """1 x 16 x n/16... as 4-D: the special values, then N(0, 5) and N(0, 30) samples."""
    rng = np.random.default_rng(0)
    x = np.concatenate([SPECIAL, rng.normal(0, 5, n // 2), rng.normal(0, 30, n // 2)])[:n].astype(np.float32)
    return x.reshape(1, 16, n // 64, 4)


def _build(op, x: np.ndarray):
    bb = relax.BlockBuilder()
    v = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [v]):
        with bb.dataflow():
            y = bb.emit_output(op(v))
        bb.emit_func_output(y)
    target = make_target(None)
    with target:
        mod = relax.transform.LegalizeOps(legalize_map())(bb.get())
        mod = ParallelizeRest()(mod)
    return mod, relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())


def _asm(mod) -> str:
    """The host assembly of the one PrimFunc of a module _build legalized."""
    (gv, f), = [(g, f) for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    return tvm.tirx.build(tvm.IRModule({gv.name_hint: f.with_attr("global_symbol", gv.name_hint)}),
                          target=make_target(None)).inspect_source("asm")


def _reference(name: str, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    if name == "erf":
        return np.vectorize(math.erf)(x)
    if name == "tanh":
        return np.tanh(x)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if name in ("exp", "log"):
            y = getattr(np, name)(x)
            return np.where(np.abs(y) > np.finfo(np.float32).max, np.inf * np.sign(y), y)  # beyond float32: Inf
    with np.errstate(over="ignore", invalid="ignore"):
        s = 1.0 / (1.0 + np.exp(-x))
        return s if name == "sigmoid" else x * s


def _check(y: np.ndarray, ref: np.ndarray, x: np.ndarray):
    """Relative error under 1e-6 (TVM's libm sigmoid: 1.7e-7; erf measured 4.7e-7), but below e^-87, where the
    result may be e^-87 instead (under 1.7e-38, times x for SiLU); Inf and NaN where the
    reference has them."""
    assert np.array_equal(np.isnan(y), np.isnan(ref))
    fin = np.isfinite(ref)
    tail = 2e-38 * np.maximum(1.0, np.abs(x.astype(np.float64)))
    assert np.all(np.abs(y[fin] - ref[fin]) <= 1e-6 * np.abs(ref[fin]) + tail[fin])
    inf = np.isinf(ref)
    assert np.array_equal(y[inf], ref[inf])


@pytest.mark.parametrize("name,op", [("sigmoid", relax.op.sigmoid), ("silu", relax.op.nn.silu), ("tanh", relax.op.tanh),
                                     ("erf", relax.op.erf), ("exp", relax.op.exp), ("log", relax.op.log)])
def test_matches_float64_over_the_float32_range(name, op):
    x = _inputs()
    _, vm = _build(op, x)
    _check(vm["main"](tvm.runtime.tensor(x)).numpy(), _reference(name, x), x)


@pytest.mark.parametrize("name,op,top,extra", [
    ("erf", relax.op.erf, 4.5, []),  # up to where erf is 1 in float32: the fit's range
    ("tanh", relax.op.tanh, 10.0, [0.55, float(np.nextafter(np.float32(0.55), np.float32(0)))]),  # series / exp
])
def test_odd_functions_on_a_dense_grid(name, op, top, extra):
    """erf and tanh over every step of 2^-12 in (0, top] and values down to the subnormals,
    each with its negative, against float64 (relative error under 1e-6); never beyond +-1, odd,
    and f(-0.0) is -0.0 as in math.erf and np.tanh."""
    pos = np.concatenate([np.arange(1, top * 4096 + 1) / 4096, [1e-45, 1e-40, 1e-38, 1e-20, 1e-8, 3e-4], extra,
                          [0.0]])
    pos = np.pad(pos, (0, -len(pos) % 32), constant_values=1.0)
    x = np.concatenate([pos, -pos]).astype(np.float32).reshape(1, 16, -1, 4)
    _, vm = _build(op, x)
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    _check(y, _reference(name, x), x)
    assert np.abs(y).max() <= 1.0
    yp, yn = y.ravel()[:len(pos)], y.ravel()[len(pos):]
    assert np.array_equal(yn, -yp)
    assert np.array_equal(np.signbit(y.ravel()), np.signbit(x.ravel()))


def test_exp_and_log_at_the_ends_of_the_float32_range():
    """exp: +Inf from ln(FLT_MAX) up, subnormals down to e^-103.3 and 0 below, exact 1 at 0;
    log: every power of two from the least subnormal to 2^127 exactly (e ln 2 to float32's
    rounding), each step of 2^-12 around 1 against float64, -Inf at +-0, NaN below 0."""
    x = np.array([88.72, 88.7228, 88.7229, 89.0, 100.0, -87.0, -87.5, -95.0, -103.0, -103.5, -104.0, -200.0, 0.0, -0.0,
                  1.0, -1.0], np.float32).reshape(1, 1, 4, 4)
    _, vm = _build(relax.op.exp, x)
    y = vm["main"](tvm.runtime.tensor(x)).numpy().ravel()
    ref = np.exp(x.ravel().astype(np.float64))
    with np.errstate(over="ignore"):
        ref32 = ref.astype(np.float32)
    assert np.array_equal(np.isinf(y), np.isinf(ref32))
    fin = np.isfinite(ref32)
    assert np.all(np.abs(y[fin] - ref[fin]) <= 1e-6 * ref[fin] + 2.0 ** -149)  # the subnormals to their last bit
    assert y[12] == 1.0 and y[13] == 1.0 and y[11] == 0.0

    powers = [2.0 ** e for e in range(-149, 128)]
    grid = list(1.0 + np.arange(-2048, 2048) / 4096)
    x = np.array(powers + grid + [0.0, -0.0, -1e-30, -np.inf, np.inf, np.nan], np.float32)
    x = np.pad(x, (0, -len(x) % 64), constant_values=1.0).reshape(1, 16, -1, 4)
    _, vm = _build(relax.op.log, x)
    y = vm["main"](tvm.runtime.tensor(x)).numpy().ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.log(x.ravel().astype(np.float64))
    n = len(powers)
    assert np.all(np.abs(y[:n] - ref[:n]) <= 1e-6 * np.abs(ref[:n]))
    _check(y.reshape(x.shape), ref.reshape(x.shape), x)
    specials = y[n + len(grid):n + len(grid) + 6]
    assert list(specials[:2]) == [-np.inf, -np.inf] and np.isnan(specials[2]) and np.isnan(specials[3])
    assert specials[4] == np.inf and np.isnan(specials[5])


@pytest.mark.parametrize("c", [0.75, -0.75, 1.5, 3.0, -1.0, 2.0, 1.0, 0.0])
def test_power_by_a_constant(c):
    """x ** c for a scalar constant c (LocalResponseNorm's 0.75), against NumPy float64 (C's pow)
    over magnitudes from e^-100 to e^88 of both signs and the special values: relative error
    under 2e-7 max(2, |c log x|) (the log's rounding, scaled by c), the signs, infinities and
    NaNs as C's (NaN for a finite negative x and a c that is not an integer; an odd c keeps
    the sign, of -0.0 too), 1 for c = 0; and no libm powf call left."""
    rng = np.random.default_rng(1)
    mags = np.exp(rng.uniform(-100, 88, 2048))
    x = np.concatenate([SPECIAL, [-2.0, -3.0, 0.5, 1.0, -1e-45], mags, -mags]).astype(np.float32)
    x = np.pad(x, (0, -len(x) % 64), constant_values=1.0).reshape(1, 16, -1, 4)
    mod, vm = _build(lambda v: relax.op.power(v, relax.const(c, "float32")), x)
    y = vm["main"](tvm.runtime.tensor(x)).numpy().ravel()
    xd = x.ravel().astype(np.float64)
    with np.errstate(all="ignore"):
        ref = np.power(xd, c)
        ref = np.where(np.abs(ref) > np.finfo(np.float32).max, np.inf * np.sign(ref), ref)
        scale = np.fmax(2.0, np.abs(c * np.log(np.abs(xd))))  # fmax: 0 * log(0) is NaN
    normal = np.isfinite(ref) & (np.abs(ref) >= np.finfo(np.float32).tiny)
    assert np.all(np.abs(y[normal] - ref[normal]) <= 2e-7 * scale[normal] * np.abs(ref[normal]))
    small = np.isfinite(ref) & ~normal  # results in the subnormals: to a few of their steps
    assert np.all(np.abs(y[small] - ref[small]) <= 1e-43)
    assert np.array_equal(np.isnan(y), np.isnan(ref))
    inf = np.isinf(ref)
    assert np.array_equal(y[inf], ref[inf])
    exact = ~np.isnan(ref)
    assert np.array_equal(np.signbit(y[exact]), np.signbit(ref[exact]))
    asm = _asm(mod)
    assert "powf" not in asm and "logf" not in asm and "expf" not in asm


def test_sigmoid_limits_are_exact():
    """0 and 1 at the ends as in IEEE arithmetic, so SiLU(-Inf) = -Inf * 0 is NaN as in onnxruntime."""
    x = np.array([-np.inf, -1e30, -89.0, np.inf, 1e30, 89.0, 20.0, np.nan] * 2, np.float32).reshape(1, 1, 4, 4)
    _, vm = _build(relax.op.sigmoid, x)
    y = vm["main"](tvm.runtime.tensor(x)).numpy().ravel()[:8]
    assert list(y[:6]) == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0] and y[6] == np.float32(1.0) and np.isnan(y[7])


@pytest.mark.parametrize("op", [relax.op.sigmoid, relax.op.tanh, relax.op.erf, relax.op.exp, relax.op.log])
def test_built_without_a_libm_call(op):
    """The loop is vectorized: no call to expf, logf, tanhf or erff (one per lane) remains in the object code."""
    mod, _ = _build(op, _inputs())
    asm = _asm(mod)
    assert "vfmadd" in asm or "fmla" in asm or "mulps" in asm
    assert not any(f in asm for f in ("expf", "logf", "erff", "tanhf"))


def test_other_dtypes_keep_tvm_legalization():
    bb = relax.BlockBuilder()
    v = relax.Var("x", relax.TensorType((4, 8), "float64"))
    with bb.function("main", [v]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.sigmoid(v))
        bb.emit_func_output(y)
    mod = relax.transform.LegalizeOps(legalize_map())(bb.get())
    x = np.linspace(-10, 10, 32).reshape(4, 8)
    vm = relax.VirtualMachine(tvm.compile(mod, target=make_target(None)), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), _reference("sigmoid", x), rtol=1e-12)


@pytest.mark.parametrize("name", ["sigmoid_of", "tanh_of", "erf_of", "exp_of", "log_of", "pow_of"])
def test_the_functions_vectorize_at_the_targets_width(name):
    """A loop of 16 lanes of each function compiles to 16-lane vectors for an AVX-512 target
    (whatever the host: only compiled). An op TVM cannot vectorize (tirx.isnan) made the loop
    scalar, and LLVM re-vectorized it in 8 lanes (ymm registers)."""
    a = te.placeholder((64, 16), name="a")
    value_of = (lambda v: tir_math.pow_of(v, 0.75)) if name == "pow_of" else getattr(tir_math, name)
    b = te.compute((64, 16), lambda i, j: value_of(a[i, j]), name="b")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    sch.vectorize(sch.get_loops(sch.get_sblock("b"))[1])
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "f")}),
                      target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
    operands = [o for _, o in re.findall(r"^\s*(v\w+)\s+(.*)$", lib.mod.inspect_source("asm"), re.M)]
    wide, narrow = sum("zmm" in o for o in operands), sum("ymm" in o for o in operands)
    assert wide > 20 and narrow <= 2, (wide, narrow)
