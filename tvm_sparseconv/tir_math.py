"""exp, log, pow, sigmoid, tanh and erf of float32 TIR expressions, computed in vector registers.

TVM legalizes ``relax.sigmoid`` to ``1 / (1 + exp(-x))`` with LLVM's ``exp``, which LLVM
scalarizes into one libm ``expf`` call per lane: EfficientNet-B0's SiLUs (``x * sigmoid(x)``)
took 10 of its 16 ms on an AMD EPYC Zen 4, onnxruntime's whole model 7 ms. These are
polynomials that vectorize instead. passes/fast_math.py legalizes the graph's sigmoid, SiLU,
tanh and erf with them, and the conv kernels' epilogues compute SiLU's gate with
``sigmoid_of`` (conv.Epilogue). Each takes a scalar or a vector expression (a TensorSlice, or a
PrimExpr of float32xN) and returns one of the same width.

- ``exp``: x = n ln2 + r with n = round(x / ln2) and |r| <= ln2/2, e^r by the degree-7
  Taylor-like minimax polynomial of Cephes' expf (relative error about 1e-7 on that
  interval), 2^n as the product of two normal floats 2^(n // 2) and 2^(n - n // 2), each
  made by writing its exponent into the bits, so that the product overflows to +Inf above
  ln(FLT_MAX) and falls into the subnormals below -87.3 as IEEE arithmetic does. x is clamped
  to [-104, 89] first (e^-104 is under half the least subnormal). So sigmoid(+-Inf) is 1 and
  0, as in IEEE arithmetic: SiLU(-Inf) = -Inf * 0 is NaN, as in TVM's and onnxruntime's.
- ``log`` (softplus's, in Mish: ``x tanh(log(1 + e^x))``, where TVM's libm ``logf`` and
  ``expf`` per lane took 45 of a CSPDarknet-like net's 96 ms) splits x into m 2^e with m in
  [sqrt(1/2), sqrt(2)) by its bits (subnormals scaled by 2^23 first) and takes log(m) by
  Cephes' logf polynomial (relative error about 1e-7); log(0) is -Inf, log(+Inf) +Inf, a
  negative x NaN.
- ``erf`` (GELU's, in ConvNeXt and the transformers' MLPs; ConvNeXt's GELUs took 11 of its
  30 ms with TVM's) is odd, computed as x P(x^2) / Q(x^2) with P of degree 6 and Q of degree 4
  (relative error under 4e-7 in float32), and 1 from |x| = 4 up (erf(4) is 1 - 1.5e-8). An
  earlier form (a Taylor series below 0.5, Abramowitz and Stegun's 7.1.26 with an exp above)
  made a GELU after a 3136 x 48 -> 192 matmul cost 0.24 ms more than the matmul (Zen 4).
- ``tanh`` (an ESPCN-like net's two tanh layers took 3.5 of 7.4 ms with TVM's) is odd:
  the Taylor series x (1 + x^2 P(x^2)) up to x^15 below |x| = 0.55 (the next term is under
  5e-8 of the value there), else 1 - 2 / (e^(2|x|) + 1), whose cancellation costs at most one
  unit of 1 at 0.55 (the value is 0.5), with the sign of x put back; tanh(+-Inf) is +-1.

NaN propagates through all three (the clamps alone would turn it into a number). It is found
by its bits (is_nan), not by ``tirx.isnan``, which TVM cannot vectorize: one in a loop's body
made the whole loop scalar, and LLVM re-vectorized it at its preferred width, 8 lanes on
AVX-512: a SiLU pass over 451,584 floats took 0.12 ms instead of 0.094 alone, and
EfficientNet-B0's SiLU passes 2.40 ms instead of 2.15 in the model (Intel Xeon Emerald Rapids).
"""
from __future__ import annotations

import tvm

_LOG2E = 1.4426950408889634
# ln 2 = _LN2_HI + _LN2_LO, _LN2_HI with few mantissa bits, so n * _LN2_HI is exact for |n| <= 127
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
# Cephes expf: e^r = 1 + r + r^2 * P(r), P's coefficients from the lowest power up
_P = (5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3, 1.3981999507e-3, 1.9875691500e-4)
_EXP_LOW, _EXP_HIGH = -104.0, 89.0
# Cephes logf: log(1 + f) = f - f^2 / 2 + f^3 * P(f) for f = m - 1, P's coefficients from the lowest power up
_LOG_P = (3.3333331174e-1, -2.4999993993e-1, 2.0000714765e-1, -1.6668057665e-1, 1.4249322787e-1,
          -1.2420140846e-1, 1.1676998740e-1, -1.1514610310e-1, 7.0376836292e-2)
_SQRT_HALF = 0.70710678118654752
_MIN_NORMAL = 1.17549435e-38

# erf(x) / x = P(x^2) / Q(x^2) on |x| <= 4, coefficients from the lowest power up: fitted
# for this module (a rational least-squares fit to the relative error, reweighted towards the
# minimax one, in float64); its error in float64 is 6.5e-8, in float32 arithmetic 3.8e-7
_ERF_P = (1.1283790942753609, 0.20712608283314254, 0.05152494694298479, 0.003990570029382479,
          0.00014728344416558886, -1.9422347250543946e-06, 1.9109702859261785e-08)
_ERF_Q = (1.0, 0.516891961918878, 0.1179710439306614, 0.014958101129673315, 0.0010211023008354523)

# tanh(x) = x + x^3 * P(x^2) near 0: its Taylor coefficients of x^3 .. x^15, lowest power first
_TANH_TAYLOR = (-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075, -929569 / 638512875)
_TANH_SERIES_BELOW = 0.55


def bound(x: tvm.tirx.PrimExpr, value_of) -> tvm.tirx.PrimExpr:
    """``value_of(v)`` with v bound to ``x`` once (a Let). The functions here read their
    argument many times; once a chain of them is inlined into one loop (Mish's tanh of a log of
    an exp) the copies multiply: unbound, the build of a CSPDarknet-like net with Mish ran out
    of 24 GB."""
    v = tvm.tirx.Var("v", _dtype("float32", lanes_of(x)))
    return tvm.tirx.Let(v, x, value_of(v))


def lanes_of(x) -> int:
    """The vector width of a TIR expression ``x``: 1 for a scalar (a TE tensor element, a
    TensorSlice, has no ``ty``)."""
    ty = getattr(x, "ty", None)
    return ty.dtype.lanes if ty is not None else 1


def splat(v, lanes: int, dtype: str = "float32") -> tvm.tirx.PrimExpr:
    """The constant ``v`` in ``lanes`` lanes, as wide as the expression it meets (Select and
    the integer ops take no scalar beside a vector)."""
    c = tvm.tirx.const(v, dtype)
    return c if lanes == 1 else tvm.tirx.Broadcast(c, lanes)


def _dtype(base: str, lanes: int) -> str:
    return base if lanes == 1 else f"{base}x{lanes}"


def _horner(coefficients, t: tvm.tirx.PrimExpr, lanes: int) -> tvm.tirx.PrimExpr:
    """The polynomial of ``coefficients`` (lowest power first) at t."""
    p = splat(coefficients[-1], lanes)
    for c in reversed(coefficients[:-1]):
        p = p * t + splat(c, lanes)
    return p


def is_nan(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """Whether a float32 expression is NaN, by its bits: exponent all ones, mantissa not zero
    (``x != x`` is simplified to false)."""
    n = lanes_of(x)
    bits = tvm.tirx.reinterpret(_dtype("int32", n), x)
    return (bits & splat(0x7FFFFFFF, n, "int32")) > splat(0x7F800000, n, "int32")


def exp_of(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """e^x of a float32 expression (no call), over the whole float32 range (the module's
    docstring); NaN kept."""
    k = lanes_of(x)
    xc = tvm.tirx.max(tvm.tirx.min(x, splat(_EXP_HIGH, k)), splat(_EXP_LOW, k))
    n = tvm.tirx.floor(xc * splat(_LOG2E, k) + splat(0.5, k))
    r = xc - n * splat(_LN2_HI, k) - n * splat(_LN2_LO, k)
    er = _horner(_P, r, k) * r * r + r + splat(1.0, k)
    n_int = n.astype(_dtype("int32", k))
    half = n_int >> splat(1, k, "int32")
    return tvm.tirx.Select(is_nan(x), x, er * _two_to(half, k) * _two_to(n_int - half, k))


def _two_to(n: tvm.tirx.PrimExpr, lanes: int) -> tvm.tirx.PrimExpr:
    """2^n as a float32 for an int32 n in [-126, 127], by writing n + 127 into the exponent bits."""
    return tvm.tirx.reinterpret(_dtype("float32", lanes), (n + splat(127, lanes, "int32")) << splat(23, lanes, "int32"))


def log_of(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """The natural log of a float32 expression (no call): NaN for NaN and x < 0, -Inf at +-0,
    +Inf at +Inf (the module's docstring)."""
    k = lanes_of(x)
    i32, f32 = _dtype("int32", k), _dtype("float32", k)
    tiny = x < splat(_MIN_NORMAL, k)
    scaled = tvm.tirx.Select(tiny, x * splat(8388608.0, k), x)  # subnormals times 2^23: normal
    bits = tvm.tirx.reinterpret(i32, scaled)
    e = (((bits >> splat(23, k, "int32")) & splat(0xFF, k, "int32")) - splat(126, k, "int32")).astype(f32)
    m = tvm.tirx.reinterpret(f32, (bits & splat(0x007FFFFF, k, "int32")) | splat(0x3F000000, k, "int32"))  # [0.5, 1)
    low = m < splat(_SQRT_HALF, k)
    f = tvm.tirx.Select(low, m + m, m) - splat(1.0, k)  # m in [sqrt(1/2), sqrt(2)), less 1
    ef = e - tvm.tirx.Select(tiny, splat(23.0, k), splat(0.0, k)) - tvm.tirx.Select(low, splat(1.0, k), splat(0.0, k))
    z = f * f
    y = f * z * _horner(_LOG_P, f, k) + ef * splat(_LN2_LO, k) - splat(0.5, k) * z
    value = f + y + ef * splat(_LN2_HI, k)
    return tvm.tirx.Select(is_nan(x) | (x < splat(0.0, k)), splat(float("nan"), k), tvm.tirx.Select(
        x == splat(0.0, k), splat(float("-inf"), k), tvm.tirx.Select(x == splat(float("inf"), k), x, value)))


def pow_of(x: tvm.tirx.PrimExpr, c: float) -> tvm.tirx.PrimExpr:
    """x^c of a float32 expression for a constant exponent c (LocalResponseNorm's 0.75 in
    AlexNet and GoogLeNet): x for 1, x * x for 2, else e^(c log|x|), negated for a negative x
    and an odd integer c, NaN for a finite negative x and a c that is not an integer; 1 for
    c = 0 (NaN too), as C's powf. Its relative error grows with |c log x| (the log's rounding,
    scaled by c): measured under 3e-7 while |c log x| < 4, under 1.6e-7 |c log x| beyond
    (7e-6 for c = 0.75 at float32's ends)."""
    k = lanes_of(x)
    if c == 0:
        return splat(1.0, k)
    if c == 1:
        return x
    if c == 2:
        return x * x
    # the log bound apart: inside exp_of's float -> int32 cast, TVM's int64 index rewrite (of a
    # legalized op) widened the log's bit operations, and LLVM refused the int64 -> float reinterpret
    r = bound(splat(c, k) * log_of(tvm.tirx.abs(x)), exp_of)
    if float(c).is_integer():
        signed = (x < splat(0.0, k)) | (splat(1.0, k) / x < splat(0.0, k))  # -0.0 too: (-0)^3 is -0
        return bound(r, lambda r: tvm.tirx.Select(signed, -r, r)) if int(c) % 2 else r
    negative = (x < splat(0.0, k)) & (x != splat(float("-inf"), k))  # (-Inf)^c is |(-Inf)^c|
    return tvm.tirx.Select(negative, splat(float("nan"), k), r)


def sigmoid_of(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """1 / (1 + e^-x), NaN kept."""
    k = lanes_of(x)
    return tvm.tirx.Select(is_nan(x), x, splat(1.0, k) / (splat(1.0, k) + exp_of(-x)))


def erf_of(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """erf(x), NaN kept: one division, no exp, clamped to [-1, 1] (the fit's float32 value at
    x = 4 is 1 + 4e-7)."""
    k = lanes_of(x)
    a = tvm.tirx.max(tvm.tirx.min(x, splat(4.0, k)), splat(-4.0, k))
    t = a * a
    e = tvm.tirx.max(tvm.tirx.min(a * _horner(_ERF_P, t, k) / _horner(_ERF_Q, t, k), splat(1.0, k)), splat(-1.0, k))
    return tvm.tirx.Select(is_nan(x), x, e)


def tanh_of(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """tanh(x), NaN kept (the module's docstring)."""
    k = lanes_of(x)
    a = tvm.tirx.abs(x)
    t = a * a
    series = x * (splat(1.0, k) + t * _horner(_TANH_TAYLOR, t, k))  # a product with x: tanh(-0.0) is -0.0
    v = splat(1.0, k) - splat(2.0, k) / (exp_of(a + a) + splat(1.0, k))
    return tvm.tirx.Select(is_nan(x), x, tvm.tirx.Select(
        a < splat(_TANH_SERIES_BELOW, k), series, tvm.tirx.Select(x < splat(0.0, k), -v, v)))
