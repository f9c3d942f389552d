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


def _kinds(func) -> list[str]:
    """The kind of each loop around the function's first top-level block, outermost first."""
    sch, blks = _schedule(func)
    names = {tvm.tirx.ForKind.PARALLEL: "parallel", tvm.tirx.ForKind.VECTORIZED: "vectorized"}
    return [names.get(sch.get(lp).kind, "serial") for lp in sch.get_loops(blks[0])]


def test_pools_of_channel_blocks_reduce_whole_blocks_as_vectors():
    """A max and an average pool of NCHW8c data (as the rewrite leaves them between blocked
    layers) take each window tap as one vector over the block's 8 channels: the lane loop is the
    innermost and vectorised, under the window loops. NCHW's W (read at 2w + kw) is left alone.
    Both match a NumPy float64 pool, with the padding excluded from the maximum and the mean."""
    rng = np.random.default_rng(1)
    xv = rng.standard_normal((1, 3, 11, 13, 8)).astype("float32")
    for op, kw in ((relax.op.nn.max_pool2d, {}), (relax.op.nn.avg_pool2d, {"count_include_pad": False})):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(xv.shape, "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(bb.emit(op(x, pool_size=3, strides=2, padding=(1, 1, 1, 1), layout="NCHW8c",
                                                 out_layout="NCHW8c", **kw)))
            bb.emit_func_output(out)
        mod = ParallelizeRest()(relax.transform.LegalizeOps()(bb.get()))
        pool = next(f for gv, f in mod.functions_items() if "pool" in gv.name_hint)
        kinds = _kinds(pool)
        assert kinds[0] == "parallel" and kinds[-1] == "vectorized" and kinds.count("vectorized") == 1
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        y = vm["main"](tvm.runtime.tensor(xv)).numpy()
        xp = np.pad(xv.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), constant_values=np.nan)
        taps = np.stack([xp[:, :, i:i + 11:2, j:j + 13:2] for i in range(3) for j in range(3)])
        ref = np.nanmax(taps, axis=0) if op is relax.op.nn.max_pool2d else np.nanmean(taps, axis=0)
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 20, 20), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.max_pool2d(x, pool_size=3, strides=2, padding=1)))
        bb.emit_func_output(out)
    mod = ParallelizeRest()(relax.transform.LegalizeOps()(bb.get()))
    assert "vectorized" not in _kinds(next(f for gv, f in mod.functions_items() if "pool" in gv.name_hint))


def test_a_broadcast_operand_is_computed_once_and_a_global_pool_of_blocks_in_parallel():
    """In channel blocks (as the rewrite leaves an SE block between blocked layers): the sigmoid of
    the N x C/16 x 1 x 1 x 16 scales stays a loop of its own, not inlined into the multiply (it
    would be recomputed for every pixel); the global average pool of the blocks runs in parallel
    over the 2 blocks, its 16 lanes one vector under the window loops. Both match NumPy."""
    rng = np.random.default_rng(2)
    xv = rng.standard_normal((1, 2, 40, 40, 16)).astype("float32")
    sv = rng.standard_normal((1, 2, 1, 1, 16)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(xv.shape, "float32"))
    s = relax.Var("s", relax.TensorType(sv.shape, "float32"))
    with bb.function("main", [x, s]):
        with bb.dataflow():
            y = bb.emit(relax.op.multiply(x, relax.op.sigmoid(s)))
            g = bb.emit(relax.op.nn.adaptive_avg_pool2d(x, (1, 1), layout="NCHW16c", out_layout="NCHW16c"))
            out = bb.emit_output(relax.Tuple([y, g]))
        bb.emit_func_output(out)
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(
        relax.transform.LegalizeOps()(bb.get()))))
    mod = ParallelizeRest()(mod)
    mul = next(f for gv, f in mod.functions_items() if "multiply" in gv.name_hint)
    assert len(blocks(mul)) == 2 and loops(mul)[0][0] == "parallel"
    pool = next(f for gv, f in mod.functions_items() if "pool" in gv.name_hint)
    assert _kinds(pool) == ["parallel", "serial", "serial", "vectorized"]
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    yv, gv_ = (t.numpy() for t in vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(sv)))
    np.testing.assert_allclose(yv, xv / (1 + np.exp(-sv.astype(np.float64))), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gv_, xv.astype(np.float64).mean(axis=(2, 3), keepdims=True), rtol=1e-5, atol=1e-6)


def test_elementwise_ops_of_channel_blocks_run_rows_of_lane_vectors():
    """A concat of channel blocks fused with a batch norm's per-channel multiply and add and a
    ReLU (a DenseNet block's, 4 + 4 blocks of 16 at 28 x 28): N x CB x H in parallel, W serial,
    the 16 lanes one vector. With W and the lanes fused into one loop, LLVM gathered the
    per-channel operands and (LLVM 22, AVX-512) vectorised the concat's select wrongly: outputs
    of 1e31. It matches NumPy on this CPU."""
    from tvm_sparseconv.target import make_target

    rng = np.random.default_rng(3)
    av, bv = (rng.standard_normal((1, 4, 28, 28, 16)).astype("float32") for _ in range(2))
    sv, tv = (rng.standard_normal((1, 8, 1, 1, 16)).astype("float32") for _ in range(2))
    bb = relax.BlockBuilder()
    a, b = (relax.Var(n, relax.TensorType(av.shape, "float32")) for n in "ab")
    with bb.function("main", [a, b]):
        with bb.dataflow():
            c = bb.emit(relax.op.concat([a, b], axis=1))
            y = relax.op.add(relax.op.multiply(c, relax.const(sv)), relax.const(tv))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    target = make_target(None)
    with target:
        mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(
            relax.transform.LegalizeOps()(bb.get()))))
        mod = ParallelizeRest()(mod)
    fused = next(f for gv, f in mod.functions_items() if "concatenate" in gv.name_hint)
    assert len(blocks(fused)) == 1 and _kinds(fused) == ["parallel", "serial", "vectorized"]
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    yv = vm["main"](tvm.runtime.tensor(av), tvm.runtime.tensor(bv)).numpy()
    ref = np.maximum(np.concatenate([av, bv], axis=1).astype(np.float64) * sv + tv, 0)
    np.testing.assert_allclose(yv, ref, rtol=1e-5, atol=1e-5)


def test_a_depth_to_space_fused_with_a_concat_is_one_pass():
    """A transposed conv's depth-to-space (reshape, permute, reshape), its bias add and the skip
    concat after it, fused: the reshapes and the add are smaller than the concat's output but
    not broadcast (each element is read once), so they are inlined into the concat, with no
    intermediate buffer; the result matches NumPy."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 6, 6), "float32"))
    skip = relax.Var("s", relax.TensorType((1, 4, 12, 12), "float32"))
    bias = np.arange(4, dtype="float32").reshape(1, 4, 1, 1)
    with bb.function("main", [x, skip]):
        with bb.dataflow():
            y = bb.emit(relax.op.reshape(x, (1, 4, 2, 2, 6, 6)))
            y = bb.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3]))
            y = bb.emit(relax.op.add(relax.op.reshape(y, (1, 4, 12, 12)), relax.const(bias)))
            out = bb.emit_output(bb.emit(relax.op.concat([y, skip], axis=1)))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(mod)))
    mod = ParallelizeRest()(mod)
    fused = next(f for gv, f in mod.functions_items() if "concatenate" in gv.name_hint)
    assert len(blocks(fused)) == 1 and loops(fused)[0][0] == "parallel"
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    rng = np.random.default_rng(0)
    xv, sv = (rng.standard_normal(s).astype("float32") for s in ((1, 16, 6, 6), (1, 4, 12, 12)))
    got = vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(sv)).numpy()
    d2s = xv.reshape(1, 4, 2, 2, 6, 6).transpose(0, 1, 4, 2, 5, 3).reshape(1, 4, 12, 12) + bias
    np.testing.assert_array_equal(got, np.concatenate([d2s, sv], axis=1))
