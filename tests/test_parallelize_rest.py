"""ParallelizeRest: the ops the conv rewrite leaves to TVM (pools, adds, ReLUs) get a schedule."""
import numpy as np
import tvm
from tvm import relax

from tvm_sparseconv.passes.parallelize_rest import ParallelizeRest


def _schedule(func):
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    return sch, sch.get_child_blocks(sch.get_sblock("root"))


def loops(func) -> list[tuple[str, int]]:
    """(kind, extent) of the loops around the function's last top-level block, outermost first."""
    sch, blks = _schedule(func)
    kind = lambda lp: "parallel" if sch.get(lp).kind == tvm.tirx.ForKind.PARALLEL else "serial"
    return [(kind(lp), int(sch.get(lp).extent)) for lp in sch.get_loops(blks[-1])]


def blocks(func) -> set[str]:
    """The names of the function's top-level blocks."""
    sch, blks = _schedule(func)
    return {sch.get(b).name_hint for b in blks}


def test_parallelize_rest_pools_and_adds_in_parallel():
    """Ops nobody schedules (a padded max-pool, a residual add + ReLU) get a parallel outer loop,
    the pool's padding is inlined (no padded copy), the add's H and W are one inner loop (whole
    vectors), and the results stay exact."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 96, 20, 20), "float32"))
    r = relax.Var("r", relax.TensorType((1, 96, 10, 10), "float32"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.max_pool2d(x, pool_size=3, strides=2, padding=(0, 0, 1, 1)))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.add(p, r))))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    mod = ParallelizeRest()(mod)
    pool = next(f for gv, f in mod.functions_items() if gv.name_hint.startswith("max_pool2d"))
    assert loops(pool)[0][0] == "parallel" and "pad_temp" not in blocks(pool)
    add = next(f for gv, f in mod.functions_items() if "add" in gv.name_hint)
    assert loops(add) == [("parallel", 96), ("serial", 100)]
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((1, 96, 20, 20)).astype("float32")
    rv = rng.standard_normal((1, 96, 10, 10)).astype("float32")
    y = vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(rv)).numpy()
    xp = np.pad(xv, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=-np.inf)
    ref = np.max([xp[:, :, i:i + 19:2, j:j + 19:2] for i in range(3) for j in range(3)], axis=0)
    np.testing.assert_array_equal(y, np.maximum(ref + rv, 0))
