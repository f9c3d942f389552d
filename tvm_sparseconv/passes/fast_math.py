"""Sigmoid, SiLU, tanh and erf legalized to loops that vectorize.

TVM legalizes ``relax.sigmoid`` to ``1 / (1 + exp(-x))`` with LLVM's ``exp``, which LLVM
scalarizes into one libm ``expf`` call per lane: EfficientNet-B0's SiLUs (``x * sigmoid(x)``)
took 10 of its 16 ms on an AMD EPYC Zen 4, onnxruntime's whole model 7 ms. Here ``exp`` is
computed in registers instead: x = n ln2 + r with n = round(x / ln2) and |r| <= ln2/2, e^r
by the degree-7 Taylor-like minimax polynomial of Cephes' expf (relative error about 1e-7 on
that interval), 2^n by writing n + 127 into the exponent bits.

- x is clamped to [-87, 87] first, so 2^n stays a normal float; e^x above 87 is +Inf. So
  sigmoid(x) is 1 from x = 87 up (as in float32 from 17 up) and exactly 0 from -87 down
  (its value there is under 1.7e-38), and sigmoid(+-Inf) is 1 and 0, as in IEEE arithmetic:
  SiLU(-Inf) = -Inf * 0 is NaN, as in TVM's and onnxruntime's.
- NaN propagates (the clamp would turn it into a number): sigmoid(NaN) is NaN.

erf (GELU's, in ConvNeXt and the transformers' MLPs) had the same cause: ConvNeXt's GELUs took
11 of its 30 ms. It is an odd function, computed as x P(x^2) / Q(x^2) with P of degree 6 and
Q of degree 4 (relative error under 4e-7 in float32), and 1 from |x| = 4 up (erf(4) is
1 - 1.5e-8). NaN propagates. An earlier form (a Taylor series below 0.5, Abramowitz and
Stegun's 7.1.26 with an exp above, both computed in vector lanes) made a GELU after a
3136 x 48 -> 192 matmul cost 0.24 ms more than the matmul (AMD EPYC Zen 4).

tanh had it too (an ESPCN-like super-resolution net: its two tanh layers took 3.5 of 7.4 ms).
It is odd: tanh(x) is the Taylor series x (1 + x^2 P(x^2)) up to x^15 below |x| = 0.55 (the next
term is under 5e-8 of the value there), else 1 - 2 / (e^(2|x|) + 1), whose cancellation costs
at most one unit of 1 at 0.55 (the value is 0.5), with the sign of x put back. NaN propagates;
tanh(+-Inf) is +-1.

``legalize_map()`` is the customize_legalize_map of relax.transform.LegalizeOps.
"""
from __future__ import annotations

import tvm
from tvm import relax, te

_LOG2E = 1.4426950408889634
# ln 2 = _LN2_HI + _LN2_LO, _LN2_HI with few mantissa bits, so n * _LN2_HI is exact for |n| <= 127
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
# Cephes expf: e^r = 1 + r + r^2 * P(r), P's coefficients from the highest power down
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_CLAMP = 87.0


def _f(v: float) -> tvm.tirx.PrimExpr:
    return tvm.tirx.const(v, "float32")


def exp_of(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """e^x of a float32 expression in vectorizable TIR (no call): x below -87 is taken as -87
    (e^x under 1.7e-38), and above 87 e^x is +Inf (e^88.7 is float32's largest)."""
    xc = tvm.tirx.max(tvm.tirx.min(x, _f(_CLAMP)), _f(-_CLAMP))
    n = tvm.tirx.floor(xc * _f(_LOG2E) + _f(0.5))
    r = xc - n * _f(_LN2_HI) - n * _f(_LN2_LO)
    p = _f(_P[0])
    for c in _P[1:]:
        p = p * r + _f(c)
    er = p * r * r + r + _f(1.0)
    two_n = tvm.tirx.reinterpret("float32", (n.astype("int32") + 127) << 23)
    return tvm.tirx.Select(x > _f(_CLAMP), _f(float("inf")), er * two_n)


def sigmoid_of(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """1 / (1 + e^-x), NaN kept."""
    return tvm.tirx.Select(tvm.tirx.isnan(x), x, _f(1.0) / (_f(1.0) + exp_of(-x)))


# erf(x) / x = P(x^2) / Q(x^2) on |x| <= 4, coefficients from the lowest power up: fitted
# for this module (a rational least-squares fit to the relative error, reweighted towards the
# minimax one, in float64); its error in float64 is 6.5e-8, in float32 arithmetic 3.8e-7
_ERF_P = (1.1283790942753609, 0.20712608283314254, 0.05152494694298479, 0.003990570029382479,
          0.00014728344416558886, -1.9422347250543946e-06, 1.9109702859261785e-08)
_ERF_Q = (1.0, 0.516891961918878, 0.1179710439306614, 0.014958101129673315, 0.0010211023008354523)


def _horner(coefficients, t: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """The polynomial of ``coefficients`` (lowest power first) at t."""
    p = _f(coefficients[-1])
    for c in reversed(coefficients[:-1]):
        p = p * t + _f(c)
    return p


def erf_of(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """erf(x) of a float32 expression in vectorizable TIR, NaN kept: one division, no exp,
    clamped to [-1, 1] (the fit's float32 value at x = 4 is 1 + 4e-7)."""
    a = tvm.tirx.max(tvm.tirx.min(x, _f(4.0)), _f(-4.0))
    t = a * a
    e = tvm.tirx.max(tvm.tirx.min(a * _horner(_ERF_P, t) / _horner(_ERF_Q, t), _f(1.0)), _f(-1.0))
    return tvm.tirx.Select(tvm.tirx.isnan(x), x, e)


# tanh(x) = x + x^3 * P(x^2) near 0: its Taylor coefficients of x^3 .. x^15, lowest power first
_TANH_TAYLOR = (-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075, -929569 / 638512875)
_TANH_SERIES_BELOW = 0.55


def tanh_of(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """tanh(x) of a float32 expression in vectorizable TIR, NaN kept (module docstring)."""
    a = tvm.tirx.abs(x)
    t = a * a
    series = x * (_f(1.0) + t * _horner(_TANH_TAYLOR, t))  # a product with x: tanh(-0.0) is -0.0
    v = _f(1.0) - _f(2.0) / (exp_of(a + a) + _f(1.0))
    return tvm.tirx.Select(tvm.tirx.isnan(x), x, tvm.tirx.Select(
        a < _f(_TANH_SERIES_BELOW), series, tvm.tirx.Select(x < _f(0.0), -v, v)))


# op -> (name, the float32 value of an element x in vectorizable TIR)
_ELEMENTWISE = {"relax.sigmoid": ("sigmoid", sigmoid_of),
                "relax.nn.silu": ("silu", lambda x: x * sigmoid_of(x)),
                "relax.tanh": ("tanh", tanh_of),
                "relax.erf": ("erf", erf_of)}


def legalize_map() -> dict:
    """{op name: legalization} for float32 sigmoid, SiLU, tanh and erf; other dtypes keep TVM's."""
    return {op: _only_float32(name, value_of, op) for op, (name, value_of) in _ELEMENTWISE.items()}


def _only_float32(name: str, value_of, op_name: str):
    """A legalization: a call_te of ``value_of`` on each element for a float32 input, TVM's
    own for any other."""
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if call.args[0].ty.dtype != "float32":
            return default(bb, call)
        return bb.call_te(lambda t: te.compute(t.shape, lambda *i: value_of(t(*i)), name=name), call.args[0],
                          primfunc_name_hint=f"tir_{name}")

    return legalize
