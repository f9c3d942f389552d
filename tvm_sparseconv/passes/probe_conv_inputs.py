"""ProbeConvInputs: make ``main`` also return the input activation of every conv2d."""
from __future__ import annotations

import tvm
from tvm import relax

from ..graph import CONV


@relax.expr_functor.mutator
class _Prober(relax.PyExprMutator):
    def __init__(self, mod, wanted: set):
        super().__init__(mod)
        self.wanted = wanted
        self.probes = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        super().visit_var_binding_(binding)
        if binding.var in self.wanted:
            self.probes[binding.var] = self.builder_.emit_output(binding.var)


@tvm.transform.module_pass(opt_level=0, name="tvm_sparseconv.ProbeConvInputs")
class ProbeConvInputs:
    """``main`` returns (its output, input of conv 0, input of conv 1, ...) in conv order."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        func = mod["main"]
        conv_inputs = []
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Call) and b.value.op == CONV:
                    conv_inputs.append(b.value.args[0])
        prober = _Prober(mod, {v for v in conv_inputs if isinstance(v, relax.DataflowVar)})
        new = prober.visit_expr(func)
        outs = [prober.probes.get(v, v) for v in conv_inputs]
        fields = [new.body.body, *outs]
        body = relax.SeqExpr(new.body.blocks, relax.Tuple(fields))
        func = relax.Function(new.params, body, relax.TupleType([f.ty for f in fields]), new.is_pure, new.attrs)
        bb = relax.BlockBuilder(mod)
        bb.update_func(mod.get_global_var("main"), bb.normalize(func))
        return bb.get()
