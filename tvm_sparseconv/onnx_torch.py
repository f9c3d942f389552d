"""Run an ONNX CNN graph with PyTorch's own operators (the PyTorch peer for ONNX models).

A small interpreter over the ops of static CNN graphs; the convs, pools and resizes run in
torch's own kernels (oneDNN), which is what a PyTorch user of the model would get. Each op
follows the ONNX definition of the model's opset (11-19 for Resize; attributes that became
inputs, as Clip's bounds, Squeeze's axes or Pad's pads, are read from wherever the opset puts
them):

- Conv (1-3-D, groups, dilations, asymmetric pads, auto_pad), ConvTranspose (explicit pads
  and output_padding), BatchNormalization, InstanceNormalization, LRN (odd sizes), Gemm,
  MatMul, LayerNormalization, Relu, LeakyRelu, PRelu, Elu, Sigmoid, Tanh, Softplus,
  HardSigmoid, HardSwish, Clip (ReLU6), Softmax, Erf (GELU), Exp, Log, Sqrt, Abs, Neg, Pow;
- MaxPool, AveragePool (ceil_mode, count_include_pad, asymmetric pads, auto_pad),
  GlobalAveragePool, GlobalMaxPool;
- Add, Sub, Mul, Div (broadcasting), Concat, Split, Slice (negative steps too), Gather,
  Flatten, Reshape, Transpose, Squeeze, Unsqueeze, DepthToSpace, ReduceMean, ReduceSum,
  ReduceMax, ReduceMin, Pad (constant; reflect and edge on the spatial axes), Identity,
  Dropout (inference: the identity), Constant, ConstantOfShape, Cast, Shape;
- Resize, nearest and linear, where F.interpolate computes what ONNX defines (see _resize).

Any other op, or a variant whose semantics torch does not have (Pad reflect on the channel
axis, Resize cubic, ...), raises NotImplementedError naming it: the other op at load, the
variant when it runs.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F


def _refuse(op: str, variant: str = ""):
    raise NotImplementedError(f"the PyTorch peer does not run ONNX op {op}" + (f" with {variant}" if variant else ""))


class OnnxTorch:
    """``OnnxTorch(path)(x)``: the model's output (a tuple of them when it has several) for its
    one non-constant input ``x`` (a float32 torch tensor), computed with torch ops under
    inference_mode."""

    def __init__(self, onnx_path: str):
        import onnx
        from onnx import helper, numpy_helper

        m = onnx.load(onnx_path)
        self.opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.consts = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in m.graph.initializer}
        self.steps = []  # (op function, input names, output names, attributes), in graph order
        for n in m.graph.node:
            standard = n.domain in ("", "ai.onnx")
            if not standard or n.op_type not in _OPS:
                _refuse(n.op_type if standard else f"{n.domain}.{n.op_type}")
            # attributes decoded once, so that a timed call pays only for the ops themselves
            attrs = {a.name: _decode(helper.get_attribute_value(a)) for a in n.attribute}
            if n.op_type == "Split":  # equal parts, as many as outputs, unless sizes are given
                attrs.setdefault("num_outputs", len(n.output))
            if n.op_type == "Constant":
                self.consts[n.output[0]] = _constant(attrs)
            else:
                self.steps.append((_OPS[n.op_type], list(n.input), list(n.output), attrs))
        self.input = [i.name for i in m.graph.input if i.name not in self.consts][0]
        self.outputs = [o.name for o in m.graph.output]

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple:
        env = dict(self.consts)
        env[self.input] = x
        with torch.inference_mode():
            for fn, ins, outs, attrs in self.steps:
                y = fn([env[i] if i else None for i in ins], attrs, self.opset)
                for name, v in zip(outs, y if isinstance(y, tuple) else (y,)):
                    env[name] = v
            outs = tuple(env[o] for o in self.outputs)
            return outs[0] if len(outs) == 1 else outs


def _decode(v):
    """String attributes come as bytes."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [s.decode() for s in v]
    return v


def _constant(attrs: dict) -> torch.Tensor:
    from onnx import numpy_helper

    (name, v), = attrs.items()
    if name == "value":
        return torch.from_numpy(numpy_helper.to_array(v).copy())
    if name in ("value_float", "value_floats", "value_int", "value_ints"):
        return torch.from_numpy(np.array(v, np.float32 if "float" in name else np.int64))
    _refuse("Constant", name)


_OPS: dict = {"Constant": None}


def op(*names):
    """Register ``fn(inputs, attributes, opset)`` (a missing optional input is None) as ``names``."""
    def register(fn):
        for n in names:
            _OPS[n] = fn
        return fn
    return register


def _given(ins: list, i: int):
    """Optional input ``i``, or None when absent, unnamed or empty (opset 11 Resize's scales)."""
    v = ins[i] if len(ins) > i else None
    return v if v is not None and v.numel() else None


def _axes(ins: list, a: dict, opset: int, input_since: int):
    """An op's axes: the ``axes`` attribute before opset ``input_since``, its second input since."""
    if opset < input_since:
        return a.get("axes")
    v = _given(ins, 1)
    return None if v is None else v.tolist()


def _torch_pads(begin, end) -> list:
    """ONNX per-axis (begin, end) pads as F.pad's list (last axis first)."""
    return [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]


# -- elementwise --------------------------------------------------------------------------------

op("Relu")(lambda ins, a, opset: ins[0].relu())
op("Sigmoid")(lambda ins, a, opset: ins[0].sigmoid())
op("HardSigmoid")(lambda ins, a, opset: (a.get("alpha", 0.2) * ins[0] + a.get("beta", 0.5)).clamp(0.0, 1.0))
op("HardSwish")(lambda ins, a, opset: F.hardswish(ins[0]))  # x * HardSigmoid(x, 1/6, 1/2), as ONNX
op("LeakyRelu")(lambda ins, a, opset: F.leaky_relu(ins[0], a.get("alpha", 0.01)))
op("Tanh")(lambda ins, a, opset: ins[0].tanh())
op("Elu")(lambda ins, a, opset: F.elu(ins[0], a.get("alpha", 1.0)))
op("Softplus")(lambda ins, a, opset: F.softplus(ins[0]))  # log(1 + e^x); torch's linear part (x > 20) is exact in float32
op("PRelu")(lambda ins, a, opset: torch.where(ins[0] < 0, ins[0] * ins[1], ins[0]))  # slope broadcast to x
op("Erf")(lambda ins, a, opset: torch.erf(ins[0]))  # GELU, as the exporters write it
op("Exp")(lambda ins, a, opset: ins[0].exp())
op("Log")(lambda ins, a, opset: ins[0].log())
op("Sqrt")(lambda ins, a, opset: ins[0].sqrt())
op("Abs")(lambda ins, a, opset: ins[0].abs())
op("Neg")(lambda ins, a, opset: -ins[0])
op("Pow")(lambda ins, a, opset: torch.pow(ins[0], ins[1]))
op("Shape")(lambda ins, a, opset: torch.tensor(ins[0].shape[a.get("start", 0):a.get("end")], dtype=torch.int64))
op("Identity")(lambda ins, a, opset: ins[0])
op("Add")(lambda ins, a, opset: ins[0] + ins[1])  # torch broadcasts as ONNX (numpy's rules)
op("Sub")(lambda ins, a, opset: ins[0] - ins[1])
op("Mul")(lambda ins, a, opset: ins[0] * ins[1])


@op("Div")
def _div(ins, a, opset):
    x, y = ins
    # ONNX integer division truncates; torch's / would give floats
    return x / y if x.is_floating_point() else torch.div(x, y, rounding_mode="trunc")


@op("Clip")
def _clip(ins, a, opset):
    """Bounds are attributes before opset 11, optional inputs since; none means unbounded."""
    if opset < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo, hi = (None if (v := _given(ins, i)) is None else v.item() for i in (1, 2))
    return ins[0] if lo is None and hi is None else ins[0].clamp(lo, hi)


@op("Dropout")
def _dropout(ins, a, opset):
    """Inference: the identity, and an all-true mask for a second output."""
    return ins[0], torch.ones_like(ins[0], dtype=torch.bool)


@op("Softmax")
def _softmax(ins, a, opset):
    x = ins[0]
    if opset >= 13:
        return x.softmax(a.get("axis", -1))
    # before opset 13: over the input coerced to 2-D at ``axis`` (default 1), i.e. over all of
    # the axes from ``axis`` on at once
    return x.flatten(a.get("axis", 1) % x.dim()).softmax(-1).reshape(x.shape)


# -- shapes -------------------------------------------------------------------------------------

op("Concat")(lambda ins, a, opset: torch.cat(ins, a["axis"]))
op("Flatten")(lambda ins, a, opset: ins[0].reshape(math.prod(ins[0].shape[:a.get("axis", 1)]), -1))


@op("Cast")
def _cast(ins, a, opset):
    from onnx import helper

    return ins[0].to(torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(a["to"]))).dtype)


@op("ConstantOfShape")
def _constant_of_shape(ins, a, opset):
    """A tensor of the first input's shape filled with ``value`` (a one-element tensor; float32 0
    when absent)."""
    value = _constant({"value": a["value"]}) if "value" in a else torch.zeros(1)
    return value.reshape(()).expand([int(v) for v in ins[0].tolist()]).clone()


@op("Gather")
def _gather(ins, a, opset):
    """x's slices at ``indices`` (any shape, negative ones from the end) along ``axis``."""
    x, idx, ax = ins[0], ins[1], a.get("axis", 0) % ins[0].dim()
    picked = torch.index_select(x, ax, idx.reshape(-1) % x.shape[ax])
    return picked.reshape(x.shape[:ax] + idx.shape + x.shape[ax + 1:])


@op("Split")
def _split(ins, a, opset):
    """Sizes from the attribute ``split`` before opset 13, the second input since; without them,
    ``num_outputs`` (opset 18; before it, the node's output count) equal parts, the last one
    smaller."""
    x, ax = ins[0], a.get("axis", 0)
    sizes = a.get("split") if opset < 13 else (None if (v := _given(ins, 1)) is None else v.tolist())
    if sizes is None:
        sizes = -(-x.shape[ax] // a["num_outputs"])  # torch.split's chunks of this size, the last one smaller
    return tuple(torch.split(x, sizes, ax))


@op("Slice")
def _slice(ins, a, opset):
    """starts, ends, axes and steps: attributes before opset 10, inputs since. Negative starts and
    ends count from the end; then both are clamped as ONNX clamps them: to [0, dim] for a
    positive step, to [0, dim - 1] and [-1, dim - 1] for a negative one (what a reflection pad
    exports to), whose elements are picked by index."""
    x = ins[0]
    if opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = ins[1].tolist(), ins[2].tolist()
        axes, steps = (None if (v := _given(ins, i)) is None else v.tolist() for i in (3, 4))
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for b, e, ax, st in zip(starts, ends, axes, steps):
        ax, dim = ax % x.dim(), x.shape[ax]
        b, e = (v + dim if v < 0 else v for v in (b, e))
        if st > 0:
            index = [slice(None)] * x.dim()
            index[ax] = slice(min(max(b, 0), dim), min(max(e, 0), dim), st)
            x = x[tuple(index)]
        else:
            x = torch.index_select(x, ax, torch.arange(min(max(b, 0), dim - 1), min(max(e, -1), dim - 1), st))
    return x


@op("DepthToSpace")
def _depth_to_space(ins, a, opset):
    """DCR (the default): the depth read as (block, block, C); CRD: as (C, block, block), torch's
    pixel_shuffle."""
    x, b = ins[0], a["blocksize"]
    if a.get("mode", "DCR") == "CRD":
        return F.pixel_shuffle(x, b)
    n, c, h, w = x.shape
    return x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c // (b * b), h * b, w * b)


@op("LayerNormalization")
def _layer_norm(ins, a, opset):
    """Over the axes from ``axis`` (default -1) on, scaled by the second input and shifted by the
    optional third; the mean and inverse deviation outputs are not computed."""
    x = ins[0]
    shape = x.shape[a.get("axis", -1) % x.dim():]
    return F.layer_norm(x, shape, ins[1].expand(shape), _given(ins, 2), a.get("epsilon", 1e-5))


@op("Transpose")
def _transpose(ins, a, opset):
    return ins[0].permute(*a.get("perm", reversed(range(ins[0].dim()))))


@op("Reshape")
def _reshape(ins, a, opset):
    """A 0 in the shape copies the input's dim (unless allowzero); -1 is inferred."""
    x = ins[0]
    shape = [int(v) for v in ins[1].tolist()]
    return x.reshape([x.shape[i] if v == 0 and not a.get("allowzero", 0) else v for i, v in enumerate(shape)])


@op("Squeeze")
def _squeeze(ins, a, opset):
    axes = _axes(ins, a, opset, 13)
    return ins[0].squeeze(tuple(axes)) if axes else ins[0].squeeze()


@op("Unsqueeze")
def _unsqueeze(ins, a, opset):
    x, axes = ins[0], _axes(ins, a, opset, 13)
    rank = x.dim() + len(axes)  # negative axes count from the end of the output
    for ax in sorted(v % rank for v in axes):
        x = x.unsqueeze(ax)
    return x


# ONNX reduction: torch's function, the first opset that gives the axes as an input
_REDUCTIONS = {"ReduceMean": (torch.mean, 18), "ReduceSum": (torch.sum, 13), "ReduceMax": (torch.amax, 18),
               "ReduceMin": (torch.amin, 18)}


def _reduce(ins, a, opset, fn, axes_input_since):
    x, axes = ins[0], _axes(ins, a, opset, axes_input_since)
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return x
        axes = range(x.dim())
    return fn(x, dim=tuple(axes), keepdim=bool(a.get("keepdims", 1)))


for _name, (_fn, _since) in _REDUCTIONS.items():
    op(_name)(functools.partial(_reduce, fn=_fn, axes_input_since=_since))


_TORCH_PAD_MODES = {"reflect": "reflect", "edge": "replicate"}  # ONNX's non-constant modes: torch's names


@op("Pad")
def _pad(ins, a, opset):
    """ONNX pads are (begin of each axis..., end of each axis...); negative ones crop."""
    x, mode = ins[0], a.get("mode", "constant")
    if mode != "constant" and mode not in _TORCH_PAD_MODES:
        _refuse("Pad", f"mode {mode}")
    if opset < 11:
        pads, value, axes = a["pads"], a.get("value", 0.0), None
    else:
        pads, value, axes = ins[1].tolist(), _given(ins, 2), _given(ins, 3)
        value, axes = (0.0 if value is None else value.item()), (None if axes is None else axes.tolist())
    axes = [v % x.dim() for v in axes] if axes else list(range(x.dim()))
    begin, end = [0] * x.dim(), [0] * x.dim()
    for i, ax in enumerate(axes):
        begin[ax], end[ax] = pads[i], pads[len(axes) + i]
    if mode == "constant":
        return F.pad(x, _torch_pads(begin, end), value=value)
    # torch reflects and replicates the trailing axes of a batch of channels only
    if x.dim() < 3 or any(begin[:2] + end[:2]) or min(begin + end) < 0:
        _refuse("Pad", f"mode {mode} on the batch or channel axis, or cropping")
    return F.pad(x, _torch_pads(begin[2:], end[2:]), mode=_TORCH_PAD_MODES[mode])


# -- conv, pools, dense ---------------------------------------------------------------------------

def _window(a: dict, x: torch.Tensor, kernel) -> tuple[list, list, list, list]:
    """(strides, dilations, begin pads, end pads) over the spatial axes of a Conv or pool node
    on ``x``, with auto_pad resolved (SAME_UPPER puts the odd pixel at the end)."""
    n, sizes = len(kernel), x.shape[2:]
    s, d = list(a.get("strides", [1] * n)), list(a.get("dilations", [1] * n))
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((-(-size // st) - 1) * st + (k - 1) * dl + 1 - size, 0)
                 for size, st, k, dl in zip(sizes, s, kernel, d)]
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        return s, d, begin, [t - b for t, b in zip(total, begin)]
    pads = [0] * (2 * n) if auto == "VALID" else list(a.get("pads", [0] * (2 * n)))
    return s, d, pads[:n], pads[n:]


@op("Conv")
def _conv(ins, a, opset):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    s, d, pb, pe = _window(a, x, a.get("kernel_shape", w.shape[2:]))
    if pb != pe:  # torch pads symmetrically only
        x, pb = F.pad(x, _torch_pads(pb, pe)), 0
    return getattr(F, f"conv{w.dim() - 2}d")(x, w, b, s, pb, d, a.get("group", 1))


@op("ConvTranspose")
def _conv_transpose(ins, a, opset):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    n = w.dim() - 2
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or "output_shape" in a:
        raise NotImplementedError("the PyTorch peer runs ConvTranspose with explicit pads only")
    s, d, begin, end = _window(a, x, w.shape[2:])
    # torch pads (crops) symmetrically only: compute unpadded, then crop each axis's begin and end
    y = getattr(F, f"conv_transpose{n}d")(x, w, b, s, 0, a.get("output_padding", [0] * n), a.get("group", 1), d)
    crop = [slice(pb, size - pe) for size, pb, pe in zip(y.shape[2:], begin, end)]
    return y[(slice(None), slice(None), *crop)]


def _pool_out(size, k, s, d, b, e, ceil) -> int:
    """ONNX pool output length. In ceil mode a last window that would start in the end padding
    is dropped (as torch and onnxruntime do)."""
    span = size + b + e - (k - 1) * d - 1
    out = (-(-span // s) if ceil else span // s) + 1
    return out - 1 if ceil and (out - 1) * s >= size + b else out


def _pool(kind: str):
    def run(ins, a, opset):
        x, k = ins[0], list(a["kernel_shape"])
        s, d, pb, pe = _window(a, x, k)
        ceil, include_pad = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))
        if kind == "avg" and set(d) != {1}:
            _refuse("AveragePool", "dilations")
        fn = getattr(F, f"{kind}_pool{len(k)}d")
        # torch's own padding: symmetric, at most half the (dilated) kernel; the ceil-mode rule
        # and count_include_pad's divisor are then ONNX's
        if pb == pe and all(2 * p <= (kk - 1) * dl + 1 for p, kk, dl in zip(pb, k, d)):
            if kind == "max":
                return fn(x, k, s, pb, d, ceil_mode=ceil)
            return fn(x, k, s, pb, ceil_mode=ceil, count_include_pad=include_pad)
        # otherwise pad by hand to exactly the windows ONNX has (the ceil mode's last one may
        # reach past the end padding: ``extra``) and pool without padding
        out = [_pool_out(*v, ceil) for v in zip(x.shape[2:], k, s, d, pb, pe)]
        extra = [max(0, (o - 1) * st + (kk - 1) * dl + 1 - (size + b + e))
                 for o, st, kk, dl, size, b, e in zip(out, s, k, d, x.shape[2:], pb, pe)]
        pe_all = [e + x_ for e, x_ in zip(pe, extra)]
        if kind == "max":
            return fn(F.pad(x, _torch_pads(pb, pe_all), value=float("-inf")), k, s, 0, d)
        # the mean over the counted elements: the input, and the pads with count_include_pad
        # (never the ceil mode's extra), as a window sum over a window count
        counted = F.pad(F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype), _torch_pads(pb, pe),
                              value=float(include_pad)), _torch_pads([0] * len(k), extra))
        return fn(F.pad(x, _torch_pads(pb, pe_all)), k, s) / fn(counted, k, s)
    return run


op("MaxPool")(_pool("max"))
op("AveragePool")(_pool("avg"))
op("GlobalAveragePool")(lambda ins, a, opset: ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True))
op("GlobalMaxPool")(lambda ins, a, opset: ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True))


@op("BatchNormalization")
def _bn(ins, a, opset):
    """Inference: (x - mean) / sqrt(var + epsilon) * scale + B, per channel (axis 1)."""
    x, scale, bias, mean, var = ins[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


@op("InstanceNormalization")
def _instance_norm(ins, a, opset):
    """(x - mean) / sqrt(var + epsilon) * scale + B over each channel's pixels (torch exports
    GroupNorm as one between two reshapes)."""
    x, scale, bias = ins[:3]
    return F.instance_norm(x, weight=scale, bias=bias, eps=a.get("epsilon", 1e-5))


@op("LRN")
def _lrn(ins, a, opset):
    """x / (bias + alpha / size * sum of x^2 over ``size`` channels around)^beta. ONNX centres an
    even window one channel later than torch does: refused."""
    size = a["size"]
    if size % 2 == 0:
        _refuse("LRN", f"an even size, {size}")
    return F.local_response_norm(ins[0], size, a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0))


@op("Gemm")
def _gemm(ins, a, opset):
    """alpha * A' @ B' + beta * C (C broadcast, optional); ' is the transpose where transA/B."""
    x, w = ins[0], ins[1]
    x, w = (x.T if a.get("transA", 0) else x), (w.T if a.get("transB", 0) else w)
    y = a.get("alpha", 1.0) * (x @ w)
    return y if _given(ins, 2) is None else y + a.get("beta", 1.0) * ins[2]


op("MatMul")(lambda ins, a, opset: torch.matmul(ins[0], ins[1]))  # numpy's matmul, as ONNX


# -- Resize ---------------------------------------------------------------------------------------

@op("Resize")
def _resize(ins, a, opset):
    """ONNX Resize (opsets 11-19) of the spatial axes of an N, C, ... input, by F.interpolate:

    - linear: half_pixel, and pytorch_half_pixel to lengths above 1, are F.interpolate's
      align_corners=False (both clamp source coordinates below 0 to 0); align_corners is
      align_corners=True; asymmetric and the other modes have no torch equivalent;
    - nearest: torch's "nearest" (floor of dst / scale) or "nearest-exact" (floor of
      (dst + 0.5) / scale), whichever picks the same source pixels as ONNX's coordinate
      transformation and nearest_mode for these lengths (_nearest_modes); asymmetric + floor
      is always "nearest", half_pixel + round_prefer_ceil always "nearest-exact".

    The scale is the given one (F.interpolate's scale_factor, not recomputed), or, with sizes,
    output / input length, as torch's size= uses it. Anything else is refused by name."""
    x = ins[0]
    if opset < 11:
        _refuse("Resize", f"opset {opset} semantics")
    mode, ctm = a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear"):
        _refuse("Resize", f"mode {mode}")
    for name, ok in (("antialias", 0), ("keep_aspect_ratio_policy", "stretch")):
        if a.get(name, ok) != ok:
            _refuse("Resize", f"{name} {a[name]}")
    if not 3 <= x.dim() <= 5:
        _refuse("Resize", f"a {x.dim()}-D input")
    # opset 18's ``axes``: scales or sizes for those axes only
    axes = [v % x.dim() for v in a.get("axes", range(x.dim()))]
    scales, sizes = _given(ins, 2), _given(ins, 3)
    if scales is None and sizes is None:
        raise ValueError("Resize without scales or sizes")
    if scales is not None:
        full = dict(zip(axes, scales.tolist()))
        scale = [float(full.get(i, 1.0)) for i in range(x.dim())]
        out = [int(n * s) for n, s in zip(x.shape, scale)]
        kw = {"scale_factor": scale[2:], "recompute_scale_factor": False}
    else:
        full = dict(zip(axes, sizes.tolist()))
        out = [int(full.get(i, n)) for i, n in enumerate(x.shape)]
        scale = [o / n for o, n in zip(out, x.shape)]
        kw = {"size": out[2:]}
    if out[:2] != list(x.shape[:2]):
        _refuse("Resize", "resizing the batch or channel axis")
    if mode == "linear":
        if ctm == "pytorch_half_pixel" and min(out[2:]) == 1:
            _refuse("Resize", "linear pytorch_half_pixel to length 1")
        if ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            _refuse("Resize", f"linear coordinate_transformation_mode {ctm}")
        return F.interpolate(x, mode=("linear", "bilinear", "trilinear")[x.dim() - 3],
                             align_corners=ctm == "align_corners", **kw)
    rounding = a.get("nearest_mode", "round_prefer_floor")
    modes = {"nearest", "nearest-exact"}
    for n, o, s in zip(x.shape[2:], out[2:], scale[2:]):
        modes &= _nearest_modes(ctm, rounding, n, o, s, scales is not None)
    if not modes:
        _refuse("Resize", f"nearest {ctm} {rounding} from {list(x.shape[2:])} to {out[2:]}")
    return F.interpolate(x, mode=min(modes), **kw)  # "nearest" when both


@functools.lru_cache(maxsize=None)
def _nearest_modes(ctm: str, rounding: str, n_in: int, n_out: int, scale: float, by_scale: bool) -> frozenset:
    """The F.interpolate nearest modes that pick the same source index as ONNX Resize (nearest,
    ``ctm``, nearest_mode ``rounding``) on every output position of one axis n_in -> n_out.
    ONNX's indices come from its formulas; torch's from interpolating a ramp 0..n_in-1, so that
    its own float arithmetic decides."""
    dst = np.arange(n_out, dtype=np.float64)
    one = n_out == 1  # pytorch_half_pixel and align_corners map a length-1 output to 0
    src = {"half_pixel": (dst + 0.5) / scale - 0.5,
           "pytorch_half_pixel": 0 * dst if one else (dst + 0.5) / scale - 0.5,
           "align_corners": 0 * dst if one else dst * (n_in - 1) / max(n_out - 1, 1),
           "asymmetric": dst / scale}.get(ctm)
    if src is None or rounding not in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        return frozenset()
    idx = {"round_prefer_floor": np.ceil(src - 0.5), "round_prefer_ceil": np.floor(src + 0.5),
           "floor": np.floor(src), "ceil": np.ceil(src)}[rounding].clip(0, n_in - 1)
    ramp = torch.arange(n_in, dtype=torch.float32).reshape(1, 1, n_in)
    kw = {"scale_factor": scale, "recompute_scale_factor": False} if by_scale else {"size": n_out}
    return frozenset(m for m in ("nearest", "nearest-exact")
                     if np.array_equal(F.interpolate(ramp, mode=m, **kw).reshape(-1).numpy(), idx))
