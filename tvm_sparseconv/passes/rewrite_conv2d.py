"""RewriteConv2D: replace chosen conv2d calls (+ bias + ReLU) by an algorithm's stages, keeping
activations in channel blocks between the layers whose knobs say so."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import tvm
from tvm import relax, te, topi

from ..algorithms import get_algorithm
from ..algorithms.layout import transform_stage
from ..cpu import CPU, cpu_of
from ..graph import ConvSite, const_value, find_conv_sites, scalar_value
from ..layout import NCHW, channel_block, layout_shape
from ..stages import LAYERS_ATTR, LAYOUT_ATTR, OPAQUE, algorithm_func, stage_symbol, transform_func

# ops the rewrite computes on blocked tensors when every tensor operand has the output's shape
# and is held in the same blocked layout (the others are scalars): elementwise, so the layout
# does not change what they compute (nn.leakyrelu's slope is one scalar attribute, unlike
# nn.prelu's per-channel one along an axis). The lanes past C may then hold op(0) (sigmoid: 0.5);
# no reader uses them.
_ELEMENTWISE = {tvm.ir.Op.get(f"relax.{n}") for n in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "clip", "nn.relu", "nn.leakyrelu", "sigmoid",
    "tanh")}
# pooling ops of NCHW data, which TVM also computes in channel blocks (their layout "NCHW16c"):
# max, average and adaptive average pooling of a block's lanes are those of its channels
_POOLS = {tvm.ir.Op.get(f"relax.nn.{n}"): getattr(relax.op.nn, n)
          for n in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d")}
_ADAPTIVE = tvm.ir.Op.get("relax.nn.adaptive_avg_pool2d")
# mean over H and W with keepdims (ONNX's GlobalAveragePool as TVM imports it, as in the
# squeeze-and-excitation blocks): in blocks, an adaptive average pool to 1 x 1
_MEAN = tvm.ir.Op.get("relax.mean")
# concat along the channels (a SqueezeNet fire module's, a DenseNet block's): in blocks, along
# the block axis, when every operand fills whole blocks (_blocked_layout)
_CONCAT = tvm.ir.Op.get("relax.concat")
# nearest-neighbour resize of NCHW data (a YOLO or FPN upsample before a concat): in blocks, a
# block's lanes move together. A bilinear one stays in NCHW, where passes/separable_resize.py
# computes it in two passes (TVM's legalization in blocks recomputes the weights per element)
_RESIZE = tvm.ir.Op.get("relax.image.resize2d")


@dataclass(frozen=True)
class LayerChoice:
    """The algorithm (and its knobs) chosen for one conv layer. "direct" leaves TVM's conv2d."""

    algorithm: str
    knobs: dict = field(default_factory=dict, hash=False)


def emit_layer(bb: relax.BlockBuilder, site: ConvSite, choice: LayerChoice, cpu: CPU, x: relax.Expr,
               res: relax.Expr | None = None, callers: dict | None = None) -> relax.Expr:
    """Emit every stage, built for ``cpu``, but the last as bindings; return the last stage's
    call (its result is y). With ``res`` the layer's epilogue adds it (site.residual_add's
    chain), and ReLUs if that chain ends in one. Each stage's PrimFunc carries the algorithm as
    an attribute (stages.algorithm_func); ``callers`` ({GlobalVar: [layer keys]}) gets this
    layer's key appended for each stage function it calls."""
    algo = get_algorithm(choice.algorithm)
    spec = site.spec
    algo.check(spec)
    knobs = algo.knobs(spec, choice.knobs, cpu)
    epilogue = site.epilogue(fused=res is not None)
    env = {"x": x, "res": res}
    for name, value in algo.constants(spec, site.weight, site.bias, knobs).items():
        env[name] = relax.const(value)
    stages = algo.stages(spec, epilogue, knobs, cpu)
    call = None
    for i, st in enumerate(stages):
        gv = bb.add_func(algorithm_func(st, algo.name), stage_symbol(algo.name, st.name))
        if callers is not None:
            callers.setdefault(gv, []).append(site.key)
        types = [relax.TensorType(b.shape, b.dtype) for b in st.outputs]
        call = relax.call_tir(gv, [env[n] for n in st.inputs], types[0] if len(types) == 1 else types)
        if i == len(stages) - 1:
            break
        out = bb.emit(call)
        if len(types) == 1:
            env[st.outputs[0].name] = out
        else:
            for j, b in enumerate(st.outputs):
                env[b.name] = bb.emit(relax.TupleGetItem(out, j))
    assert stages[-1].outputs[-1].name == "y" and len(stages[-1].outputs) == 1
    return call


def layer_layouts(site: ConvSite, choice: LayerChoice, cpu: CPU) -> tuple[str, str]:
    """(layout of the layer's input, of its output and residual) with ``choice`` (layout.py)."""
    algo = get_algorithm(choice.algorithm)
    return algo.layouts(site.spec, algo.knobs(site.spec, choice.knobs, cpu))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Rewrites the layers of ``todo`` in binding order. A layer that writes a blocked layout
    binds its result in that layout (``blocked``) and its original var to the transform back
    to the model's layout, which DeadCodeElimination removes when nothing but blocked readers
    use the var. A reader in a blocked layout takes the blocked var, or a transform of the var
    (made once per var and layout). Elementwise, pooling, global-mean and channel-concat ops
    whose operands are all blocked alike are computed blocked too (_passes_blocks,
    _blocked_layout). LayoutGraph counts the same transforms without rewriting."""

    def __init__(self, mod, todo: dict, absorbed: set, calls: dict, cpu: CPU):
        super().__init__(mod)
        self.todo, self.absorbed, self.calls, self.cpu = todo, absorbed, calls, cpu
        self.callers = {}  # stage function -> keys of the layers that call it, in binding order
        self.blocked = {}  # original var -> {layout: the var holding it in that layout}
        self.nhwc = set()  # vars NHWC layers wrote: the ops after them keep to the model's layout

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.absorbed:
            return  # the conv / bias add the fused chain replaces
        if binding.var in self.todo:
            return self._layer(binding)
        if not self._blocked_op(binding):
            super().visit_var_binding_(binding)

    def _layer(self, binding: relax.VarBinding) -> None:
        site, choice, fused = self.todo[binding.var]
        lin, lout = layer_layouts(site, choice, self.cpu)
        conv = self.calls[site.conv_var]
        x = self._held_in(conv.args[0], lin, site.data_layout, f"{site.key}_x")
        res = self._held_in(fused.residual, lout, "NCHW", f"{site.key}_res") if fused is not None else None
        y = emit_layer(self.builder_, site, choice, self.cpu, x, res, self.callers)
        if site.data_layout == "NHWC":
            self.nhwc.add(binding.var)
        self._bind(binding.var, y, lout, site.data_layout, site.spec.y_shape, f"{site.key}_y")

    def _bind(self, var: relax.Var, y: relax.Expr, layout: str, data_layout: str, nchw_shape, name: str) -> None:
        """var = y, y held in ``layout`` (NCHW: as the model has var, after a transpose for NHWC);
        a blocked y is kept for blocked readers, var bound to its transform back."""
        if layout != NCHW:
            yb = self.builder_.emit(y, f"{name}_{layout}")
            self.blocked[var] = {layout: yb}
            y = self._transform(yb, nchw_shape, layout, NCHW)
        if data_layout == "NHWC":
            y = relax.op.permute_dims(self.builder_.emit(y), [0, 2, 3, 1])
        self.builder_.emit_normalized(relax.VarBinding(var, self.builder_.normalize(y)))

    def _held_in(self, expr: relax.Expr, layout: str, data_layout: str, name: str) -> relax.Expr:
        """``expr`` (in the model's ``data_layout``) as a reader in ``layout`` takes it: NCHW
        (transposed from NHWC), or blocked: the blocked var a layer or an op wrote, else a
        transform of the NCHW tensor (kept for the var's other blocked readers)."""
        held = self.blocked.get(expr, {}) if isinstance(expr, relax.Var) else {}
        if layout in held:
            return held[layout]
        x = self.visit_expr(expr)
        if data_layout == "NHWC":
            x = self.builder_.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))
        if layout == NCHW:
            return x
        shape = [int(v) for v in x.ty.shape]
        xb = self.builder_.emit(self._transform(x, shape, NCHW, layout), f"{name}_{layout}")
        if isinstance(expr, relax.Var):
            self.blocked.setdefault(expr, {})[layout] = xb
        return xb

    def _transform(self, x: relax.Expr, nchw_shape, src: str, dst: str) -> relax.Call:
        st = transform_stage(nchw_shape, src, dst, self.cpu)
        gv = self.builder_.add_func(transform_func(st, src, dst), f"layout_{st.name}")
        return relax.call_tir(gv, [x], relax.TensorType(layout_shape(nchw_shape, dst), "float32"))

    def _blocked_concat(self, parts: list) -> relax.Call:
        """A concat of blocked tensors along the block axis, a function of its own: fused with
        per-channel ops after it (a DenseNet block's batch norm), LLVM 22 vectorised the select
        between the sources wrongly (outputs of 1e31 at 28 x 28 and up)."""
        ins = [te.placeholder([int(v) for v in p.ty.shape], "float32", name=f"x{i}") for i, p in enumerate(parts)]
        out = topi.concatenate(ins, axis=1)
        func = te.create_prim_func([*ins, out]).without_attr("global_symbol").with_attr("op_pattern", OPAQUE)
        gv = self.builder_.add_func(func, "concat_blocks")
        return relax.call_tir(gv, list(parts), relax.TensorType([int(v) for v in out.shape], "float32"))

    def _blocked_op(self, binding: relax.VarBinding) -> bool:
        """Emit an op that _passes_blocks on its operands' blocked vars, when they are all held
        in one blocked layout (True); else leave it to the caller (False)."""
        operands = _passes_blocks(binding.value, binding.var, self.nhwc)
        layout = _blocked_layout(binding.value, operands, self.blocked)
        if layout is None:
            return False
        call = binding.value
        tvm_layout = f"NCHW{channel_block(layout)}c"
        if call.op == _CONCAT:
            y = self._blocked_concat([self.blocked[a][layout] for a in operands])
        elif call.op == _RESIZE:
            a = call.attrs
            y = relax.op.image.resize2d(
                self.blocked[operands[0]][layout], call.args[1], roi=[float(v) for v in a.roi], layout=tvm_layout,
                method=str(a.method), coordinate_transformation_mode=str(a.coordinate_transformation_mode),
                rounding_method=str(a.rounding_method), cubic_alpha=float(a.cubic_alpha),
                cubic_exclude=int(a.cubic_exclude), extrapolation_value=float(a.extrapolation_value))
        elif call.op == _MEAN:
            y = relax.op.nn.adaptive_avg_pool2d(self.blocked[operands[0]][layout], (1, 1), layout=tvm_layout,
                                                out_layout=tvm_layout)
        elif call.op in _POOLS:
            attrs = call.attrs
            kw = ({"output_size": attrs.output_size} if call.op == _ADAPTIVE else
                  {k: getattr(attrs, k) for k in ("pool_size", "strides", "padding", "dilation", "ceil_mode",
                                                  "count_include_pad")})
            y = _POOLS[call.op](self.blocked[operands[0]][layout], **kw, layout=tvm_layout, out_layout=tvm_layout)
        else:
            channels = int(binding.var.ty.shape[1])

            def arg(a):
                if a in operands:
                    return self.blocked[a][layout]
                per_channel = _channel_constant(a, channels)
                return self.visit_expr(a) if per_channel is None else _blocked_constant(per_channel, layout)

            args = [arg(a) for a in call.args]
            y = relax.Call(call.op, args, call.attrs, call.ty_args)
        shape = [int(v) for v in binding.var.ty.shape]
        self._bind(binding.var, y, layout, "NCHW", shape, binding.var.name)
        return True


def _passes_blocks(value: relax.Expr, var: relax.Var, nhwc: set) -> list | None:
    """The tensor operands (vars) of an op the rewrite may compute in channel blocks: an
    _ELEMENTWISE op whose operands are scalars, vars of its 4-D float32 output's shape, or
    per-channel vars (N x C x 1 x 1, an SE block's scales: broadcast alike in blocks) and
    per-channel constants (_channel_constant: a batch norm's scale and shift); a _POOLS
    op of NCHW data; a _MEAN over H and W that keeps them; a _CONCAT of 4-D vars along the
    channels; or a nearest-neighbour _RESIZE of NCHW data. None of them the NHWC output
    of a layer (``nhwc``). None for any other binding."""
    op = value.op if isinstance(value, relax.Call) else None
    if op not in _ELEMENTWISE and op not in _POOLS and op not in (_MEAN, _CONCAT, _RESIZE):
        return None
    ty = var.ty
    if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.shape is None or ty.ndim != 4:
        return None
    if value.op in _POOLS:
        a = value.attrs
        operands = [value.args[0]] if str(a.layout) == "NCHW" and str(a.out_layout or "NCHW") == "NCHW" else None
    elif value.op == _RESIZE:
        a = value.attrs
        operands = [value.args[0]] if str(a.layout) == "NCHW" and str(a.method) == "nearest_neighbor" else None
    elif value.op == _MEAN:
        a = value.attrs
        axes = sorted(int(v) % 4 for v in a.axis) if a.axis is not None else None
        operands = [value.args[0]] if axes == [2, 3] and bool(a.keepdims) else None
    elif value.op == _CONCAT:
        parts, axis = value.args[0], value.attrs.axis
        operands = list(parts.fields) if isinstance(parts, relax.Tuple) and axis is not None and int(axis) % 4 == 1 \
            and all(isinstance(a.ty, relax.TensorType) and a.ty.ndim == 4 and a.ty.shape is not None
                    for a in parts.fields) else None
    else:
        shape = [int(v) for v in ty.shape]
        operands = [a for a in value.args if not _is_scalar(a) and _channel_constant(a, shape[1]) is None]
        if not all(isinstance(a, relax.Var) and isinstance(a.ty, relax.TensorType) and a.ty.shape is not None
                   and [int(v) for v in a.ty.shape] in (shape, shape[:2] + [1, 1]) for a in operands):
            operands = None
    if not operands or not all(isinstance(a, relax.Var) and a not in nhwc for a in operands):
        return None
    return operands


def _blocked_layout(value: relax.Call, operands, blocked: dict) -> str | None:
    """The blocked layout an op that _passes_blocks (``value`` on ``operands``) is computed in:
    one every operand is held in (the first by name if several), for a _CONCAT one whose blocks
    each operand's channels fill (a partial block's pad lanes would land inside the output);
    else None."""
    if not operands:
        return None
    common = set.intersection(*(set(blocked.get(a, ())) for a in operands))
    if value.op == _CONCAT:
        common = {lay for lay in common if all(int(a.ty.shape[1]) % channel_block(lay) == 0 for a in operands)}
    return sorted(common)[0] if common else None


def _channel_constant(e: relax.Expr, channels: int):
    """The C values of a float32 constant of shape (1, C, 1, 1) or (C, 1, 1) (one per channel,
    broadcast over N, H and W), else None."""
    v = const_value(e)
    return v.reshape(-1) if v is not None and v.dtype == "float32" and v.shape in (
        (1, channels, 1, 1), (channels, 1, 1)) else None


def _blocked_constant(values, layout: str) -> relax.Expr:
    """Per-channel ``values`` (C) as a constant broadcast over blocked data in ``layout``:
    (1, ceil(C / b), 1, 1, b), zeros in the pad lanes."""
    shape = layout_shape((1, len(values), 1, 1), layout)
    padded = np.zeros(shape[1] * shape[-1], np.float32)
    padded[:len(values)] = values
    return relax.const(padded.reshape(shape))


def _is_scalar(e: relax.Expr) -> bool:
    """A one-element float constant or a PrimValue (an operand every element shares)."""
    return scalar_value(e) is not None


@tvm.transform.module_pass(opt_level=0, name="tvm_sparseconv.RewriteConv2D")
class RewriteConv2D:
    """Replace each conv2d of ``main`` whose key has a choice other than "direct".

    ``choices`` maps layer keys (``conv000``...) to :class:`LayerChoice`. The conv, its bias
    add and its ReLU (when they only feed each other) become the algorithm's stages as
    ``call_tir`` bindings, weights re-laid-out into constants here, at compile time. When the
    algorithm fuses residual adds and the conv (+ bias) only feeds an add of another tensor
    of its shape (a ResNet block's end), the add and the ReLU after it go into its epilogue
    too; each add goes to the first layer that claims it. The kernels are built for ``target``'s
    CPU (None: this machine). A layer whose knobs hold its input or output in channel blocks
    (Algorithm.layouts) takes and leaves them so, and the transforms between layouts stand only
    where a tensor is needed in a layout it was not written in (_Rewriter; docs/design.md,
    "Layouts between layers"; layout_transforms lists them).
    Layers without a choice, chosen "direct", or that only TVM's conv2d can compute
    (non-constant weight, unsupported layout) stay as they are; so does a layer the chosen
    algorithm does not support (``strict=False``) unless ``strict`` asks for an error.
    """

    def __init__(self, choices: Mapping[str, LayerChoice], target=None, strict: bool = False, sites=None):
        self.choices = dict(choices)
        self.cpu = cpu_of(target)
        self.strict = strict
        self.sites = sites  # the module's ConvSites when the caller has found them already

    def select(self, func: relax.Function) -> dict:
        """{root var: (site, choice, the ResidualAdd fused or None)} of the layers to rewrite.

        Call it directly for a clear UnsupportedConvError under ``strict`` (an exception
        raised inside a pass reaches the caller as a RuntimeError).
        """
        from ..conv import UnsupportedConvError

        todo, claimed = {}, set()
        for s in self.sites if self.sites is not None else find_conv_sites(func):
            choice = self.choices.get(s.key)
            if choice is None or choice.algorithm == "direct":
                continue
            reason = s.why_dense
            if reason is None:
                try:
                    get_algorithm(choice.algorithm).check(s.spec)
                except UnsupportedConvError as e:
                    reason = str(e)
            if reason is not None:
                if self.strict:
                    raise UnsupportedConvError(f"{s.key}: {reason}")
                continue
            fused = s.residual_add
            if fused is None or not get_algorithm(choice.algorithm).fuses_residual or fused.root in claimed:
                fused = None
            else:
                claimed.add(fused.root)
            todo[fused.root if fused else s.root] = (s, choice, fused)
        return todo

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        func = mod["main"]
        todo = self.select(func)
        if not todo:
            return mod
        rw = _Rewriter(mod, todo, _absorbed(todo), _calls(func), self.cpu)
        new_main = rw.visit_expr(func)
        gv = rw.builder_.get().get_global_var("main")
        rw.builder_.update_func(gv, new_main)
        for stage, keys in rw.callers.items():
            rw.builder_.update_func(stage, rw.builder_.get()[stage].with_attr(LAYERS_ATTR, keys))
        return relax.transform.DeadCodeElimination(["main"])(rw.builder_.get())


def _absorbed(todo: dict) -> set:
    """The vars of the chains the layers of ``todo`` replace (conv, bias add, ...), but their roots."""
    return {v for s, _, fused in todo.values() for v in (fused.absorbed if fused else s.absorbed)}


def _calls(func: relax.Function) -> dict:
    return {b.var: b.value for block in func.body.blocks for b in block.bindings
            if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Call)}


def vars_in(e: relax.Expr) -> list:
    """Every relax.Var that ``e`` reads, in post order (a var read twice is listed twice)."""
    out = []
    relax.analysis.post_order_visit(e, lambda x: out.append(x) if isinstance(x, relax.Var) else None)
    return out


class LayoutGraph:
    """Where a model's activations are read and written, as RewriteConv2D rewrites ``main`` for
    ``choices``, without rewriting it: ``transforms(layouts)`` lists the transforms the rewrite
    would insert if the layers had ``layouts`` (the tuner weighs them). One node per binding
    the rewrite keeps, in order, as (kind, var, vars read, layer key or op): a layer (reads its
    input in layout_in and its fused residual in layout_out, writes its output in layout_out);
    an op that _passes_blocks (blocked as _blocked_layout finds its operands held); any other
    op and the function's result (read NCHW)."""

    def __init__(self, func: relax.Function, choices: Mapping[str, LayerChoice], sites=None):
        todo = RewriteConv2D(choices, sites=sites).select(func)
        absorbed, calls = _absorbed(todo), _calls(func)
        self.nodes, self.shapes, nhwc = [], {}, set()
        for block in func.body.blocks:
            for b in block.bindings:
                var = b.var
                if var in absorbed:
                    continue
                if var in todo:
                    site, _, fused = todo[var]
                    x, res = calls[site.conv_var].args[0], fused.residual if fused is not None else None
                    self.shapes.update({x: site.spec.x_shape, var: site.spec.y_shape})
                    if res is not None:
                        self.shapes[res] = site.spec.y_shape
                    if site.data_layout == "NHWC":
                        nhwc.add(var)
                    self.nodes.append(("layer", var, (x, res), site.key))
                    continue
                operands = _passes_blocks(b.value, var, nhwc)
                if operands is not None:
                    self.shapes.update({v: tuple(int(d) for d in v.ty.shape) for v in [var, *operands]})
                    self.nodes.append(("op", var, tuple(operands), b.value))
                else:
                    self.nodes.append(("nchw", var, tuple(vars_in(b.value)), None))
        self.nodes.append(("nchw", None, tuple(vars_in(func.body.body)), None))
        self.keys = [key for kind, _, _, key in self.nodes if kind == "layer"]

    def neighbours(self) -> dict[str, set]:
        """{layer key: the other layers that read or write a tensor it reads or writes}, a
        tensor and the output of an op that _passes_blocks on it counted as one."""
        group = {}  # var -> the first var of its group (ops join their operands and output)

        def find(v):
            while group.get(v, v) is not v:
                v = group[v]
            return v

        for kind, var, reads, _ in self.nodes:
            if kind == "op":
                for v in reads:
                    group[find(v)] = find(var)
        touches = {}
        for kind, var, reads, key in self.nodes:
            if kind == "layer":
                for v in (var, *reads):
                    if v is not None:
                        touches.setdefault(find(v), set()).add(key)
        out = {k: set() for k in self.keys}
        for keys in touches.values():
            for k in keys:
                out[k] |= keys - {k}
        return out

    def transforms(self, layouts: Mapping[str, tuple[str, str]]) -> list[tuple[tuple, str, str]]:
        """(NCHW shape, src, dst) of each transform the rewrite inserts when each layer of
        ``layouts`` ({key: (layout_in, layout_out)}; NCHW for the others) has those layouts."""
        blocked, written, unblocked, out = {}, {}, set(), []

        def need(v, layout: str) -> None:
            if layout == NCHW:
                if v in written and v not in unblocked:
                    out.append((self.shapes[v], written[v], NCHW))
                    unblocked.add(v)
            elif layout not in blocked.get(v, ()):
                need(v, NCHW)
                out.append((self.shapes[v], NCHW, layout))
                if isinstance(v, relax.Var):
                    blocked.setdefault(v, set()).add(layout)

        for kind, var, reads, key in self.nodes:
            if kind == "layer":
                lin, lout = layouts.get(key, (NCHW, NCHW))
                need(reads[0], lin)
                if reads[1] is not None:
                    need(reads[1], lout)
                written_in = lout
            elif kind == "op":  # key: the op's call
                written_in = _blocked_layout(key, list(reads), blocked) or NCHW
                if written_in == NCHW:
                    for v in reads:
                        need(v, NCHW)
            else:
                for v in reads:
                    need(v, NCHW)
                continue
            if written_in != NCHW:
                blocked[var], written[var] = {written_in}, written_in
        return out


def layout_transforms(mod: tvm.IRModule) -> list[tuple[str, str, str]]:
    """(the var transformed, the var it is bound to, "src->dst") of every layout transform
    ``main`` of a rewritten module calls, in binding order. RewriteConv2D names the vars it
    makes after the layer: "conv003_x_nchw16c" is conv003's input in blocks,
    "conv052_y_nchw16c" conv052's blocked output."""
    marked = {gv: str(f.attrs[LAYOUT_ATTR]) for gv, f in mod.functions_items()
              if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and LAYOUT_ATTR in f.attrs}
    call_tir = tvm.ir.Op.get("relax.call_tir")
    out = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op == call_tir and v.args[0] in marked:
                src = v.args[1].fields[0]
                out.append((src.name if isinstance(src, relax.Var) else str(src), b.var.name,
                            marked[v.args[0]]))
    return out


def applied_layers(mod: tvm.IRModule, sites) -> dict[str, str]:
    """{layer key: the algorithm that computes it} in a module RewriteConv2D has rewritten, read
    from its kernels' attributes; "direct" (TVM's conv2d) for the layers of ``sites`` it left."""
    from ..stages import kernel_table

    applied = {s.key: "direct" for s in sites}
    for layers, algorithm in kernel_table(mod).values():
        applied.update(dict.fromkeys(layers, algorithm))
    return applied
