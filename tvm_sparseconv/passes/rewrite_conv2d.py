"""RewriteConv2D: replace chosen conv2d calls (+ bias + ReLU) by an algorithm's stages."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import tvm
from tvm import relax

from ..algorithms import get_algorithm
from ..cpu import CPU, cpu_of
from ..graph import ConvSite, find_conv_sites
from ..stages import LAYERS_ATTR, algorithm_func, stage_symbol


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


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, todo: dict, absorbed: set, calls: dict, cpu: CPU):
        super().__init__(mod)
        self.todo, self.absorbed, self.calls, self.cpu = todo, absorbed, calls, cpu
        self.callers = {}  # stage function -> keys of the layers that call it, in binding order

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.absorbed:
            return  # the conv / bias add the fused chain replaces
        if binding.var not in self.todo:
            return super().visit_var_binding_(binding)
        site, choice, fused = self.todo[binding.var]
        conv = self.calls[site.conv_var]
        x = self.visit_expr(conv.args[0])
        if site.data_layout == "NHWC":
            x = self.builder_.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))
        res = self.visit_expr(fused.residual) if fused is not None else None
        y = emit_layer(self.builder_, site, choice, self.cpu, x, res, self.callers)
        if site.data_layout == "NHWC":
            y = relax.op.permute_dims(self.builder_.emit(y), [0, 2, 3, 1])
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(y)))


@tvm.transform.module_pass(opt_level=0, name="tvm_sparseconv.RewriteConv2D")
class RewriteConv2D:
    """Replace each conv2d of ``main`` whose key has a choice other than "direct".

    ``choices`` maps layer keys (``conv000``...) to :class:`LayerChoice`. The conv, its bias
    add and its ReLU (when they only feed each other) become the algorithm's stages as
    ``call_tir`` bindings, weights re-laid-out into constants here, at compile time. When the
    algorithm fuses residual adds and the conv (+ bias) only feeds an add of another tensor
    of its shape (a ResNet block's end), the add and the ReLU after it go into its epilogue
    too; each add goes to the first layer that claims it. The kernels are built for ``target``'s
    CPU (None: this machine).
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
        absorbed = {v for s, _, fused in todo.values() for v in (fused.absorbed if fused else s.absorbed)}
        calls = {b.var: b.value for block in func.body.blocks for b in block.bindings
                 if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Call)}
        rw = _Rewriter(mod, todo, absorbed, calls, self.cpu)
        new_main = rw.visit_expr(func)
        gv = rw.builder_.get().get_global_var("main")
        rw.builder_.update_func(gv, new_main)
        for stage, keys in rw.callers.items():
            rw.builder_.update_func(stage, rw.builder_.get()[stage].with_attr(LAYERS_ATTR, keys))
        return relax.transform.DeadCodeElimination(["main"])(rw.builder_.get())


def applied_layers(mod: tvm.IRModule, sites) -> dict[str, str]:
    """{layer key: the algorithm that computes it} in a module RewriteConv2D has rewritten, read
    from its kernels' attributes; "direct" (TVM's conv2d) for the layers of ``sites`` it left."""
    from ..stages import kernel_table

    applied = {s.key: "direct" for s in sites}
    for layers, algorithm in kernel_table(mod).values():
        applied.update(dict.fromkeys(layers, algorithm))
    return applied
