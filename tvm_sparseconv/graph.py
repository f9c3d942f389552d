"""Find the conv2d layers of a Relax ``main`` and what can be fused into them.

A layer's key is ``conv<NNN>``, its position among the conv2d calls in binding order:
stable across re-imports of the same model, and always checked against the layer's
shapes and attributes before a plan is applied.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .conv import HARD_SIGMOID, Conv2DSpec, Epilogue

CONV = tvm.ir.Op.get("relax.nn.conv2d")
ADD = tvm.ir.Op.get("relax.add")
RELU = tvm.ir.Op.get("relax.nn.relu")
MAXIMUM, MINIMUM, CLIP = (tvm.ir.Op.get(f"relax.{n}") for n in ("maximum", "minimum", "clip"))
MULTIPLY = tvm.ir.Op.get("relax.multiply")
SIGMOID, SILU = tvm.ir.Op.get("relax.sigmoid"), tvm.ir.Op.get("relax.nn.silu")
LEAKY_RELU = tvm.ir.Op.get("relax.nn.leakyrelu")
# ops that keep a non-negative input non-negative and about as sparse (they move, pad or pool its
# values): what may sit between a ReLU and the conv it feeds
KEEPS_ZEROS = tuple(tvm.ir.Op.get(f"relax.{n}") for n in (
    "nn.max_pool2d", "nn.pad", "permute_dims", "reshape", "strided_slice", "layout_transform"))

# data_layout -> axes that turn it into NCHW; kernel_layout -> axes that turn it into OIHW
_TO_NCHW = {"NCHW": None, "NHWC": (0, 3, 1, 2)}
_TO_OIHW = {"OIHW": None, "HWIO": (3, 2, 0, 1), "OHWI": (0, 3, 1, 2), "HWOI": (2, 3, 0, 1)}


@dataclass(frozen=True)
class ResidualAdd:
    """conv (+ bias) -> add(., residual) [-> ReLU, LeakyReLU, clip(0, a) or a gate]: the chain a kernel that
    fuses the residual add replaces (``root`` its last var, ``absorbed`` the vars before it),
    ``residual`` the other operand of the add (y-shaped, NCHW)."""

    residual: relax.Expr
    root: relax.Var
    absorbed: tuple
    relu: bool
    clip: float | None = None
    gate: str | None = None
    slope: float | None = None


@dataclass
class ConvSite:
    """One conv2d call, with the bias add and activation (ReLU, or a clip(0, a) such as ReLU6:
    ``relu`` and ``clip``; a LeakyReLU: ``relu`` and ``slope``; or a hard-swish or SiLU: ``gate``;
    conv.Epilogue's) that directly and only
    consume it.

    ``weight`` is the OIHW weight when it is a constant (else None); ``root`` is the last
    var of the fused chain (conv, + bias, ReLU) whose value a rewrite replaces; ``absorbed``
    the earlier vars of the chain that then disappear; ``residual_add`` the longer chain through
    a residual add, for kernels that fuse it (Algorithm.fuses_residual). ``why_dense`` says why
    the layer can only take TVM's own conv2d (None when any algorithm may take it).
    ``input_relu``: the layer's input is the output of a ReLU or a clip(0, a), directly or through
    ops that keep its zeros (KEEPS_ZEROS): an activation that is likely sparse, where the model's
    input or a linear bottleneck's output is dense.
    """

    index: int
    key: str
    spec: Conv2DSpec
    data_layout: str
    conv_var: relax.Var
    root: relax.Var
    absorbed: tuple = ()
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    relu: bool = False
    why_dense: str | None = None
    residual_add: ResidualAdd | None = None
    clip: float | None = None
    input_relu: bool = False
    gate: str | None = None
    slope: float | None = None

    def epilogue(self, fused: bool = False) -> Epilogue:
        """What a kernel for this layer computes after the convolution: its bias and activation,
        or with ``fused`` the residual_add chain (the residual add, then the chain's activation)."""
        act = self.residual_add if fused else self
        return Epilogue(bias=self.bias is not None, relu=act.relu, residual=fused, clip=act.clip, gate=act.gate,
                        slope=act.slope)

    def describe(self) -> dict:
        s = self.spec
        return {"key": self.key, "spec": s.to_dict(), "bias": self.bias is not None, "relu": self.relu,
                "clip": self.clip, "gate": self.gate, "slope": self.slope,
                "residual_add": self.residual_add is not None,
                "data_layout": self.data_layout, "why_dense": self.why_dense, "input_relu": self.input_relu}


def const_value(e) -> np.ndarray | None:
    """The array of a Relax tensor constant, else None (a PrimValue's value is no tensor)."""
    if isinstance(e, tvm.ir.expr.Constant) and hasattr(e.value, "numpy"):
        return e.value.numpy()
    return None


def _uses(func: relax.Function) -> Counter:
    """How many times each var is referenced (bindings and the function's result)."""
    n = Counter()

    def visit(e):
        if isinstance(e, relax.Var):
            n[e] += 1

    relax.analysis.post_order_visit(func.body, visit)
    return n


def _bias_of(e, site_m: int, layout: str):
    """The per-output-channel bias vector if ``e`` is a constant broadcast along channels only."""
    v = const_value(e)
    if v is None or v.dtype != np.float32:
        return None
    chan_shape = {"NCHW": [(1, site_m, 1, 1), (site_m, 1, 1)], "NHWC": [(1, 1, 1, site_m), (site_m,)]}[layout]
    if v.shape in chan_shape:
        return v.reshape(-1)
    return None


def find_conv_sites(func: relax.Function) -> list[ConvSite]:
    """Every conv2d of ``func`` in binding order."""
    bindings = {}
    order = []
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bindings[b.var] = b.value
                order.append(b.var)
    uses = _uses(func)
    consumer = {}
    for var, value in bindings.items():
        if isinstance(value, relax.Call):
            for a in value.args:
                if isinstance(a, relax.Var):
                    consumer.setdefault(a, []).append(var)
    sites = []
    for var in order:
        call = bindings[var]
        if not (isinstance(call, relax.Call) and call.op == CONV):
            continue
        site = _site(len(sites), var, call, bindings, uses, consumer)
        site.input_relu = _after_relu(call.args[0], bindings)
        sites.append(site)
    return sites


def _after_relu(x, bindings) -> bool:
    """``x`` is bounded below by 0: made by a ReLU, clip(0, a) or maximum(., 0) (then possibly
    minimum(., a)), directly or through KEEPS_ZEROS ops."""
    while isinstance(x, relax.Var) and isinstance(bindings.get(x), relax.Call):
        call = bindings[x]
        if call.op in KEEPS_ZEROS:
            x = call.args[0]
            continue
        bounded = [(a, _bounds(call, a)) for a in call.args if isinstance(a, relax.Var)]
        bounded = [(a, b) for a, b in bounded if b is not None]
        if not bounded:
            return False
        a, (lo, hi) = bounded[0]
        if lo >= 0:
            return True
        if call.op != MINIMUM:  # minimum(., a) keeps what a ReLU before it made
            return False
        x = a
    return False


def _only_consumer(var, uses, consumer):
    c = consumer.get(var, [])
    return c[0] if uses[var] == 1 and len(c) == 1 else None


def _site(index, var, call, bindings, uses, consumer) -> ConvSite:
    a = call.attrs
    data_layout, kernel_layout = str(a.data_layout), str(a.kernel_layout)
    out_layout = str(a.out_layout) if a.out_layout else data_layout
    x, w = call.args
    xs = [int(v) for v in x.ty.shape]
    ws = [int(v) for v in w.ty.shape]
    why = None
    if data_layout not in _TO_NCHW or kernel_layout not in _TO_OIHW or out_layout != data_layout:
        why = f"layouts {data_layout}/{kernel_layout}->{out_layout} are not supported by the sparse kernels"
        xs_nchw, ws_oihw = xs, ws
    else:
        t = _TO_NCHW[data_layout]
        xs_nchw = [xs[i] for i in t] if t else xs
        t = _TO_OIHW[kernel_layout]
        ws_oihw = [ws[i] for i in t] if t else ws
    spec = Conv2DSpec.from_shapes(xs_nchw, ws_oihw, tuple(int(v) for v in a.strides),
                                  tuple(int(v) for v in a.padding), tuple(int(v) for v in a.dilation), int(a.groups))
    weight = const_value(w)
    if weight is not None and why is None:
        t = _TO_OIHW[kernel_layout]
        weight = np.ascontiguousarray(weight.transpose(t) if t else weight)
    if why is None and weight is None:
        why = "the weight is not a constant"
    if why is None and not np.isfinite(weight).all():
        # 0 x Inf and 0 x NaN are NaN: a kernel that skips zero inputs or padded taps would not
        # give them; TVM's conv2d (explicit padding, every product) gives the float64 reference's
        why = "the weight holds NaN or Inf"
    if why is None and (x.ty.dtype != "float32" or (a.out_dtype and str(a.out_dtype) not in ("", "float32"))):
        why = f"dtype {x.ty.dtype} (the kernels are float32)"
    root, absorbed, bias, relu, clip, gate, slope = var, [], None, False, None, None, None
    if why is None:
        nxt = _only_consumer(root, uses, consumer)
        if nxt is not None and bindings[nxt].op == ADD:
            args = bindings[nxt].args
            other = args[1] if args[0].same_as(root) else args[0]
            b = _bias_of(other, spec.out_channels, data_layout)
            if b is not None:
                absorbed.append(root)
                root, bias = nxt, b
        root, relu, clip, gate, slope = _activation(root, absorbed, bindings, uses, consumer)
    residual = None if why is not None or relu or gate or data_layout != "NCHW" else _residual_add(
        root, absorbed, spec, bindings, uses, consumer)
    return ConvSite(index, f"conv{index:03d}", spec, data_layout, var, root, tuple(absorbed), weight, bias, relu, why,
                    residual, clip, gate=gate, slope=slope)


def scalar_value(e) -> float | None:
    """The value of a one-element float constant or a PrimValue, else None."""
    if isinstance(e, (tvm.tirx.FloatImm, tvm.tirx.IntImm)):  # a relax.prim_value
        return float(e.value)
    v = const_value(e)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 and v.dtype.kind == "f" else None


def _bounds(call, x) -> tuple[float, float] | None:
    """(lo, hi) when ``call`` bounds ``x`` elementwise by constants: relu, maximum/minimum with a
    scalar constant, clip; else None."""
    if not isinstance(call, relax.Call):
        return None
    if call.op == RELU:
        return 0.0, np.inf
    if call.op == CLIP and call.args[0].same_as(x):
        lo, hi = scalar_value(call.args[1]), scalar_value(call.args[2])
        return None if lo is None or hi is None else (lo, hi)
    if call.op in (MAXIMUM, MINIMUM):
        a, b = call.args
        c = scalar_value(b) if a.same_as(x) else scalar_value(a) if b.same_as(x) else None
        if c is not None:
            return (c, np.inf) if call.op == MAXIMUM else (-np.inf, c)
    return None


def _bounded(root, bindings, uses, consumer):
    """(the var, lo, hi) when the only consumer of ``root`` bounds it by constants, else None."""
    nxt = _only_consumer(root, uses, consumer)
    b = _bounds(bindings.get(nxt), root) if nxt is not None else None
    return None if b is None else (nxt, *b)


def _activation(root, absorbed: list, bindings, uses, consumer) -> tuple:
    """Follow ``root`` through a ReLU or a clip to [0, a] that only it feeds: relu, maximum(., 0)
    or clip(., 0, a), then optionally minimum(., a) after the first two (a > 0); or through a
    LeakyReLU of slope in (0, 1); or through a gate (_gate). The vars passed go into
    ``absorbed``. Returns (the new root, relu, clip, gate, slope) as conv.Epilogue has them."""
    leaky = _only_consumer(root, uses, consumer)
    call = _call_of(leaky, LEAKY_RELU, bindings) if leaky is not None else None
    if call is not None and 0 < float(call.attrs.alpha) < 1:
        absorbed.append(root)
        return leaky, True, None, None, float(call.attrs.alpha)
    first = _bounded(root, bindings, uses, consumer)
    if first is None or first[1] != 0.0 or not first[2] > 0:
        gated = _gate(root, bindings, uses, consumer)
        if gated is None:
            return root, False, None, None, None
        absorbed.extend(gated[0])
        return gated[1], False, None, gated[2], None
    absorbed.append(root)
    root, _, hi = first
    if hi < np.inf:
        return root, True, hi, None, None
    second = _bounded(root, bindings, uses, consumer)
    if second is None or second[1] != -np.inf or not 0 < second[2] < np.inf:
        return root, True, None, None, None
    absorbed.append(root)
    return second[0], True, second[2], None, None


def _gate(root, bindings, uses, consumer) -> tuple | None:
    """(the vars absorbed, the new root, conv.Epilogue's gate) when ``root`` only feeds
    root * g(root), else None:
    - multiply(root, clip(add(multiply(root, 1/6), 1/2), 0, 1)) -> "hard_sigmoid", as TVM's
      ONNX importer writes a HardSwish. Only those constants: another alpha or beta, or
      relu6(x + 3) / 6, keeps its own ops, unfused;
    - multiply(root, sigmoid(root)) (ONNX's SiLU, as exporters write it) or nn.silu(root)
      (torch's) -> "sigmoid".
    The multiply's operands in either order; the intermediates must feed nothing else."""
    silu = _only_consumer(root, uses, consumer)
    if silu is not None and _call_of(silu, SILU, bindings) is not None:
        return [root], silu, "sigmoid"
    users = consumer.get(root, [])
    if uses[root] != 2 or len(users) != 2:
        return None
    for first, last in (users, users[::-1]):
        m = _call_of(last, MULTIPLY, bindings)
        g = _operand_besides(m, root) if m is not None else None
        if g is None:
            continue
        chain = _hard_sigmoid_chain(first, root, bindings, uses, consumer)
        if chain is not None and g.same_as(chain[-1]):
            return [root, *chain], last, "hard_sigmoid"
        if g.same_as(first) and _call_of(first, SIGMOID, bindings) is not None and uses[first] == 1:
            return [root, first], last, "sigmoid"
    return None


def _hard_sigmoid_chain(mul, root, bindings, uses, consumer) -> list | None:
    """[mul, add, clip] when mul = root * alpha, add = mul + beta and clip = clip(add, 0, 1) with
    HARD_SIGMOID's (alpha, beta), each feeding only the next; else None."""
    m = _call_of(mul, MULTIPLY, bindings)
    alpha = scalar_value(_operand_besides(m, root)) if m is not None else None
    if alpha is None or not np.isclose(alpha, HARD_SIGMOID[0], rtol=1e-6, atol=0):
        return None
    add = _only_consumer(mul, uses, consumer)
    a = _call_of(add, ADD, bindings)
    if a is None or scalar_value(_operand_besides(a, mul)) != HARD_SIGMOID[1]:
        return None
    clip = _only_consumer(add, uses, consumer)
    if _bounds(_call_of(clip, CLIP, bindings), add) != (0.0, 1.0) or uses[clip] != 1:
        return None
    return [mul, add, clip]


def _call_of(var, op, bindings) -> relax.Call | None:
    """``var``'s binding when it is a call of ``op``."""
    c = bindings.get(var)
    return c if isinstance(c, relax.Call) and c.op == op else None


def _operand_besides(call: relax.Call, x):
    """The operand of a binary ``call`` that is not ``x`` (None when neither is)."""
    a, b = call.args
    return b if a.same_as(x) else a if b.same_as(x) else None


def _residual_add(root, absorbed, spec: Conv2DSpec, bindings, uses, consumer) -> ResidualAdd | None:
    """The chain root -> add(root, r) [-> ReLU] when r is another float32 tensor of y's shape."""
    nxt = _only_consumer(root, uses, consumer)
    if nxt is None or bindings[nxt].op != ADD:
        return None
    a, b = bindings[nxt].args
    other = b if a.same_as(root) else a
    ty = getattr(other, "ty", None)
    if (other.same_as(root) or const_value(other) is not None or not isinstance(ty, relax.TensorType)
            or ty.dtype != "float32" or ty.shape is None or [int(v) for v in ty.shape] != list(spec.y_shape)):
        return None
    chain = [*absorbed, root]
    root, relu, clip, gate, slope = _activation(nxt, chain, bindings, uses, consumer)
    return ResidualAdd(other, root, tuple(chain), relu, clip, gate, slope)
