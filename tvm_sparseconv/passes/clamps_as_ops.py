"""ClampsAsOps: an elementwise max or min against a scalar constant, imported as a TE call_tir,
becomes the Relax op ``maximum(x, c)`` or ``minimum(x, c)``.

TVM's ONNX importer emits Clip (ReLU6, any clip(0, a)) as ``call_tir`` of PrimFuncs it builds
with TE (``T_maximum[...] = T.max(A[...], c[()])``), not as Relax ops, so a pattern over Relax
ops cannot see them. After this pass graph.py matches one form whatever the importer; the
ops legalize back to the same loops wherever no kernel absorbs them. A PrimFunc is taken only
when its whole body is the one store ``out[i...] = max|min(x[i...], c[()])`` with out and x
of one shape; anything else is left as it is.
"""
from __future__ import annotations

import tvm
from tvm import relax, s_tir

from .main_mutator import mutate_main

_OPS = {tvm.tirx.Max: relax.op.maximum, tvm.tirx.Min: relax.op.minimum}
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _stores(stmt, out: list) -> bool:
    """Collect the BufferStores of a loop nest of blocks; False at anything else."""
    if isinstance(stmt, tvm.tirx.BufferStore):
        out.append(stmt)
        return True
    if isinstance(stmt, tvm.tirx.SeqStmt):
        return all(_stores(s, out) for s in stmt.seq)
    if isinstance(stmt, tvm.tirx.For):
        return _stores(stmt.body, out)
    if isinstance(stmt, s_tir.SBlockRealize):
        return _stores(stmt.block, out)
    if isinstance(stmt, s_tir.SBlock):
        return stmt.init is None and not stmt.alloc_buffers and _stores(stmt.body, out)
    return False


def _load_of(e, buf):
    """The indices of ``e`` when it loads ``buf`` (a buffer parameter), else None."""
    src = getattr(e, "source", None)  # a TensorLoad: its buffer is .source
    return list(e.indices) if src is not None and src.same_as(buf) else None


def scalar_clamp(func) -> type | None:
    """tvm.tirx.Max or Min when ``func`` is out = max|min(x, c) of its buffer parameters
    (x, c, out), c 0-d and out of x's shape; else None."""
    if not isinstance(func, tvm.tirx.PrimFunc) or len(func.params) != 3:
        return None
    x, c, out = func.params
    if any(getattr(p, "shape", None) is None for p in (x, c, out)) or len(c.shape) != 0 \
            or list(x.shape) != list(out.shape):
        return None
    stores = []
    if not _stores(func.body, stores) or len(stores) != 1 or not stores[0].buffer.same_as(out):
        return None
    st, v = stores[0], stores[0].value
    if type(v) not in _OPS:
        return None
    for ex, ec in ((v.a, v.b), (v.b, v.a)):
        ix, ic = _load_of(ex, x), _load_of(ec, c)
        if ix is not None and ic == [] and len(ix) == len(st.indices) and all(
                a.same_as(b) for a, b in zip(ix, st.indices)):
            return type(v)
    return None


@relax.expr_functor.mutator
class _Mutator(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != _CALL_TIR or not isinstance(call.args[0], tvm.ir.GlobalVar):
            return call
        args = call.args[1]
        if not (isinstance(args, relax.Tuple) and len(args.fields) == 2 and isinstance(args.fields[1], tvm.ir.expr.Constant)):
            return call
        kind = scalar_clamp(self.mod[call.args[0]])
        return call if kind is None else _OPS[kind](args.fields[0], args.fields[1])


@tvm.transform.module_pass(opt_level=0, name="tvm_sparseconv.ClampsAsOps")
def ClampsAsOps(mod: tvm.IRModule, ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named as TVM's are)
    """``main``'s scalar max/min call_tirs as Relax ops; the PrimFuncs nothing calls then dropped."""
    return relax.transform.DeadCodeElimination(["main"])(mutate_main(mod, _Mutator(mod)))
