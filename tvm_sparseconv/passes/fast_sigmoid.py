"""Sigmoid (and SiLU) legalized to loops that vectorize.

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


def _sigmoid(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(lambda t: te.compute(t.shape, lambda *i: sigmoid_of(t(*i)), name="sigmoid"), call.args[0],
                      primfunc_name_hint="tir_sigmoid")


def _silu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(lambda t: te.compute(t.shape, lambda *i: t(*i) * sigmoid_of(t(*i)), name="silu"), call.args[0],
                      primfunc_name_hint="tir_silu")


def legalize_map() -> dict:
    """{op name: legalization} for float32 sigmoid and SiLU; other dtypes keep TVM's."""
    return {"relax.sigmoid": _only_float32(_sigmoid, "relax.sigmoid"),
            "relax.nn.silu": _only_float32(_silu, "relax.nn.silu")}


def _only_float32(f, op_name: str):
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        return f(bb, call) if call.args[0].ty.dtype == "float32" else default(bb, call)

    return legalize
