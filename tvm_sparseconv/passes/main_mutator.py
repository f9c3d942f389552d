"""The step the Relax passes that rewrite ``main`` binding by binding share."""
from __future__ import annotations

import tvm
from tvm import relax


def mutate_main(mod: tvm.IRModule, mutator: relax.PyExprMutator) -> tvm.IRModule:
    """``mod`` with ``main`` visited by ``mutator`` (made with ``mod``); unchanged without a main.
    What the rewrite leaves unused is still there: run DeadCodeElimination after."""
    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod
    new_main = mutator.visit_expr(mod["main"])
    mutator.builder_.update_func(mutator.builder_.get().get_global_var("main"), new_main)
    return mutator.builder_.get()
