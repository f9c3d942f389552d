"""Structural tests of the Relax passes: a Before module, the pass, an Expected module written
in TVMScript, compared with tvm.ir.assert_structural_equal.

The kernels RewriteConv2D inserts are generated TIR: Expected declares them with placeholder
bodies, and the test puts in their place the algorithm's own stages (what the pass must insert,
with the attributes it must add), so that the whole module is compared."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, te
from tvm.script import ir as I, relax as R, tirx as T

from tvm_sparseconv.algorithms import get_algorithm
from tvm_sparseconv.conv import Conv2DSpec, Epilogue
from tvm_sparseconv.passes import LayerChoice, RewriteConv2D, applied_layers
from tvm_sparseconv.passes.parallelize_rest import ParallelizeRest
from tvm_sparseconv.passes.probe_conv_inputs import ProbeConvInputs
from tvm_sparseconv.stages import LAYERS_ATTR, algorithm_func, kernel_table


def _bind(mod, **params):
    return relax.transform.BindParams("main", params)(mod)


def _put_stages(expected, algorithm: str, spec: Conv2DSpec, epilogue: Epilogue, layers: list[str], knobs=None):
    """Expected with its placeholder kernels replaced by ``algorithm``'s stages for ``spec``."""
    algo = get_algorithm(algorithm)
    for st in algo.stages(spec, epilogue, algo.knobs(spec, knobs)):
        gv = expected.get_global_var(f"{algorithm}_{st.name}")
        expected[gv] = algorithm_func(st, algorithm).with_attr(LAYERS_ATTR, layers)
    return expected


def test_rewrite_replaces_conv_bias_relu_by_the_stages():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32"),
                 b: R.Tensor((1, 4, 1, 1), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, w, padding=(1, 1, 1, 1))
                c = R.add(a, b)
                d = R.nn.relu(c)
                e = R.nn.max_pool2d(d)
                R.output(e)
            return e

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def im2col_lower(x: T.Buffer((1, 3, 8, 8), "float32"), a: T.Buffer((1, 27, 64), "float32")):
            T.evaluate(0)

        @T.prim_func(private=True)
        def im2col_gemm(a: T.Buffer((1, 27, 64), "float32"), w_mk: T.Buffer((4, 27), "float32"),
                        bias: T.Buffer((4,), "float32"), y: T.Buffer((1, 4, 8, 8), "float32")):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w_mk: R.Tensor((4, 27), "float32"),
                 bias: R.Tensor((4,), "float32")):
            cls = Expected
            with R.dataflow():
                a = R.call_tir(cls.im2col_lower, (x,), out_ty=R.Tensor((1, 27, 64), "float32"))
                d = R.call_tir(cls.im2col_gemm, (a, w_mk, bias), out_ty=R.Tensor((1, 4, 8, 8), "float32"))
                e = R.nn.max_pool2d(d)
                R.output(e)
            return e

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype("float32")
    b = rng.standard_normal((1, 4, 1, 1)).astype("float32")
    after = RewriteConv2D({"conv000": LayerChoice("im2col")})(_bind(Before, w=w, b=b))
    spec = Conv2DSpec.from_shapes((1, 3, 8, 8), (4, 3, 3, 3), padding=1)
    expected = _put_stages(_bind(Expected, w_mk=w.reshape(4, -1), bias=b.reshape(-1)), "im2col", spec,
                           Epilogue(bias=True, relu=True), ["conv000"])
    tvm.ir.assert_structural_equal(after, expected)
    assert applied_layers(after, [type("Site", (), {"key": "conv000"})]) == {"conv000": "im2col"}


def test_rewrite_fuses_the_residual_add_and_relu_after_it():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 8, 6, 6), "float32"), r: R.Tensor((1, 8, 6, 6), "float32"),
                 w: R.Tensor((8, 8, 1, 1), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, w)
                c = R.add(a, r)
                d = R.nn.relu(c)
                R.output(d)
            return d

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def dense_multiply(x: T.Buffer((1, 8, 6, 6), "float32"), w: T.Buffer((1, 8, 8), "float32"),
                           res: T.Buffer((1, 8, 6, 6), "float32"), y: T.Buffer((1, 8, 6, 6), "float32")):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((1, 8, 6, 6), "float32"), r: R.Tensor((1, 8, 6, 6), "float32"),
                 wt: R.Tensor((1, 8, 8), "float32")):
            cls = Expected
            with R.dataflow():
                d = R.call_tir(cls.dense_multiply, (x, wt, r), out_ty=R.Tensor((1, 8, 6, 6), "float32"))
                R.output(d)
            return d

    w = np.random.default_rng(1).standard_normal((8, 8, 1, 1)).astype("float32")
    spec = Conv2DSpec.from_shapes((1, 8, 6, 6), (8, 8, 1, 1))
    dense = get_algorithm("dense")
    knobs = {"m_tile": 8}  # the default depends on the CPU's registers (6 on AVX2)
    wt = dense.constants(spec, w, None, dense.knobs(spec, knobs))["w"]
    assert wt.shape == (1, 8, 8)  # one M tile of 8 channels: C x m_tile (the gemm kernel's layout)
    after = RewriteConv2D({"conv000": LayerChoice("dense", knobs)})(_bind(Before, w=w))
    expected = _put_stages(_bind(Expected, wt=wt), "dense", spec, Epilogue(relu=True, residual=True), ["conv000"],
                           knobs)
    tvm.ir.assert_structural_equal(after, expected)


def test_layers_that_share_a_kernel_name_both_in_call_order():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 8, 6, 6), "float32"), w1: R.Tensor((8, 8, 1, 1), "float32"),
                 w2: R.Tensor((8, 8, 1, 1), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, w1)
                b = R.nn.relu(a)
                c = R.nn.conv2d(b, w2)
                d = R.nn.relu(c)
                R.output(d)
            return d

    rng = np.random.default_rng(2)
    w1, w2 = (rng.standard_normal((8, 8, 1, 1)).astype("float32") for _ in range(2))
    after = RewriteConv2D({"conv000": LayerChoice("dense"), "conv001": LayerChoice("dense")})(
        _bind(Before, w1=w1, w2=w2))
    assert kernel_table(after) == {"dense_multiply": (("conv000", "conv001"), "dense")}


def test_parallelize_rest_fuses_the_outer_loops_in_parallel_and_the_plane_inside():
    @I.ir_module
    class Before:
        @T.prim_func(private=True, s_tir=True)
        def add(a: T.Buffer((1, 64, 14, 14), "float32"), b: T.Buffer((1, 64, 14, 14), "float32"),
                c: T.Buffer((1, 64, 14, 14), "float32")):
            T.func_attr({"tirx.noalias": True})
            for n, ch, h, w in T.grid(1, 64, 14, 14):
                with T.sblock("add"):
                    vn, vc, vh, vw = T.axis.remap("SSSS", [n, ch, h, w])
                    c[vn, vc, vh, vw] = a[vn, vc, vh, vw] + b[vn, vc, vh, vw]

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def add(a: T.Buffer((1, 64, 14, 14), "float32"), b: T.Buffer((1, 64, 14, 14), "float32"),
                c: T.Buffer((1, 64, 14, 14), "float32")):
            T.func_attr({"tirx.noalias": True})
            for n_ch_fused in T.parallel(64):
                for h_w_fused in range(196):
                    with T.sblock("add"):
                        vn = T.axis.spatial(1, 0)
                        vc = T.axis.spatial(64, n_ch_fused)
                        vh = T.axis.spatial(14, h_w_fused // 14)
                        vw = T.axis.spatial(14, h_w_fused % 14)
                        T.reads(a[vn, vc, vh, vw], b[vn, vc, vh, vw])
                        T.writes(c[vn, vc, vh, vw])
                        c[vn, vc, vh, vw] = a[vn, vc, vh, vw] + b[vn, vc, vh, vw]

    tvm.ir.assert_structural_equal(ParallelizeRest()(Before), Expected)


def test_parallelize_rest_leaves_scheduled_functions_alone():
    @I.ir_module
    class Before:
        @T.prim_func(private=True, s_tir=True)
        def add(a: T.Buffer((1, 64, 14, 14), "float32"), c: T.Buffer((1, 64, 14, 14), "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for n, ch, h, w in T.grid(1, 64, 14, 14):
                with T.sblock("copy"):
                    vn, vc, vh, vw = T.axis.remap("SSSS", [n, ch, h, w])
                    c[vn, vc, vh, vw] = a[vn, vc, vh, vw]

    tvm.ir.assert_structural_equal(ParallelizeRest()(Before), Before)


def test_probe_conv_inputs_returns_every_conv_input_after_the_output():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w1: R.Tensor((4, 3, 3, 3), "float32"),
                 w2: R.Tensor((4, 4, 1, 1), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, w1, padding=(1, 1, 1, 1))
                b = R.nn.relu(a)
                c = R.nn.conv2d(b, w2)
                R.output(c)
            return c

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w1: R.Tensor((4, 3, 3, 3), "float32"),
                 w2: R.Tensor((4, 4, 1, 1), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, w1, padding=(1, 1, 1, 1))
                b = R.nn.relu(a)
                gv = b
                c = R.nn.conv2d(b, w2)
                R.output(gv, c)
            return (c, x, gv)

    tvm.ir.assert_structural_equal(ProbeConvInputs()(Before), Expected)


def _module(op, shape) -> tvm.IRModule:
    """main(x) = op(x) (a Relax expression of x) as a Relax module."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(op(x))
        bb.emit_func_output(y)
    return bb.get()


def _legalized(op, shape) -> tvm.tirx.PrimFunc:
    mod = relax.transform.LegalizeOps()(_module(op, shape))
    return next(f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def test_one_reduction_rule_leaves_softmax_to_parallelize_rest():
    """dlight's Reduction rule would recompute a softmax's two reductions at every output
    element; the rule the lowering uses declines functions with more than one reduction, and
    ParallelizeRest keeps the reductions outside the parallel loop. The numbers agree with NumPy."""
    from tvm_sparseconv.schedule_rules import OneReduction
    from tvm_sparseconv.target import make_target

    target = make_target(None)
    rule = OneReduction()
    softmax = _legalized(lambda x: relax.op.nn.softmax(x, axis=-1), (1, 1000))
    assert rule.apply(softmax, target, False) is None
    mean = _legalized(lambda x: relax.op.mean(x, axis=[2, 3], keepdims=True), (1, 64, 7, 7))
    assert rule.apply(mean, target, False) is not None  # one reduction: dlight schedules it
    par = ParallelizeRest()(tvm.IRModule({"main": softmax}))["main"]
    # the reductions sit in serial loops before the parallel one, not inside it
    text = par.script()
    parallel_at = text.index("T.parallel")
    assert text.index('T.sblock("T_softmax_maxelem")') < parallel_at
    assert text.index('T.sblock("T_softmax_expsum")') < parallel_at
    x = np.random.default_rng(0).standard_normal((1, 1000)).astype("float32")
    f = tvm.compile(tvm.IRModule({"main": par.with_attr("global_symbol", "main")}), target=target)
    y = tvm.runtime.tensor(np.zeros_like(x))
    f["main"](tvm.runtime.tensor(x), y)
    e = np.exp(x.astype(np.float64) - x.max())
    np.testing.assert_allclose(y.numpy(), e / e.sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lanes", [8, 16])
def test_a_mean_over_channel_blocks_goes_to_parallelize_rest_in_vectors(lanes):
    """A global average pool in NCHWc (N x C/lanes x H x W x lanes): dlight's Reduction rule
    would make one scalar task per lane, reading x ``lanes`` floats apart; the lowering's rule
    declines it and ParallelizeRest reduces each block's lanes as one vector per tap. A mean
    in NCHW stays with dlight. Values against NumPy float64."""
    from tvm_sparseconv.passes.parallelize_rest import reduces_lanes
    from tvm_sparseconv.schedule_rules import OneReduction
    from tvm_sparseconv.target import make_target

    target = make_target(None)
    shape = (2, 40, 7, 7, lanes)  # 80 blocks: enough for a parallel loop beside the lanes
    mean = _legalized(lambda x: relax.op.mean(x, axis=[2, 3], keepdims=True), shape)
    assert OneReduction().apply(mean, target, False) is None
    nchw = _legalized(lambda x: relax.op.mean(x, axis=[2, 3], keepdims=True), (2, 80, 7, 7))
    assert OneReduction().apply(nchw, target, False) is not None
    assert not any(reduces_lanes(b) for b in _blocks(nchw))
    par = ParallelizeRest()(tvm.IRModule({"main": mean}))["main"]
    assert f"T.vectorized(T.int64({lanes}))" in par.script()
    f = tvm.compile(tvm.IRModule({"main": par.with_attr("global_symbol", "main")}), target=target)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    x[0, 1, 2, 3, 0] = np.nan
    y = tvm.runtime.tensor(np.zeros((2, 40, 1, 1, lanes), "float32"))
    f["main"](tvm.runtime.tensor(x), y)
    np.testing.assert_allclose(y.numpy(), x.astype(np.float64).mean(axis=(2, 3), keepdims=True), rtol=1e-5,
                               atol=1e-6)


def _blocks(func: tvm.tirx.PrimFunc) -> list:
    """The top-level blocks of ``func``."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    return [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]


def _gelu(y):
    """GELU as torch exports it to ONNX (erf), in Relax ops."""
    erf = relax.op.erf(relax.op.divide(y, relax.const(1.4142135, "float32")))
    return relax.op.multiply(relax.op.multiply(y, relax.op.add(erf, relax.const(1.0, "float32"))),
                             relax.const(0.5, "float32"))


def _gelu_f64(y):
    from math import erf

    return 0.5 * y * (1 + np.vectorize(erf)(y / np.sqrt(2)))


def _fused_head(batch: int, k: int, n: int, gelu: bool = False) -> tvm.tirx.PrimFunc:
    """The PrimFunc of x (batch x k) @ w (k x n) + b (then GELU) after Relax fuses it, as a
    classifier head from ONNX (the weight's transpose folded into it) or an MLP over the pixels
    of an NHWC map arrives at the dlight rules."""
    from tvm_sparseconv.passes.fast_math import legalize_map

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), "float32"))
    b = relax.Var("b", relax.TensorType((n,), "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = relax.op.add(relax.op.matmul(x, w), b)
            y = bb.emit_output(_gelu(y) if gelu else y)
        bb.emit_func_output(y)
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(legalize_map()), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])(bb.get())
    return next(f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


@pytest.mark.parametrize("batch,k,n,gelu", [(1, 1280, 1000, False), (8, 96, 1000, False), (2, 64, 5, False),
                                            (1, 25088, 64, False), (36, 40, 24, False), (3136, 48, 192, True),
                                            (49, 384, 1536, True), (784, 384, 96, False), (8, 2048, 512, True),
                                            (3, 2050, 1000, False), (1, 4097, 1000, False)])
def test_column_gemv_streams_the_weight_rows_in_vectors(batch, k, n, gelu):
    """A K x N matmul, a head or an MLP over many rows (pixels). Tiled: each parallel task keeps
    a tile of outputs of a group of rows in vectors and walks k (the old schedule read w down
    its columns), so each row of w read feeds the whole group; the tiles and groups are one
    parallel loop. Split-K (a w larger than the L2 caches, at most 8 rows; a k the cores divide:
    not 4097): one task per range of k, each with its own partial outputs, its rows of w in
    order, ``step`` at a time into a register tile; a serial loop adds the parts. The
    elementwise epilogue (bias, GELU) is computed as the outputs are stored: no buffer of the
    matmul's size is left in the tiled function, and in the split-K one only the parts' and
    their sum. The tile is written as vectors of the CPU's width or a divisor of it (1000
    outputs in tiles of 40 on AVX-512: 5 vectors of 8, not one 40-wide vector that LLVM takes
    apart). Values against NumPy float64, the tile and group divisors of N and the rows (no
    tail)."""
    from math import gcd

    from tvm_sparseconv.cpu import cpu_of
    from tvm_sparseconv.schedule_rules import ColumnGEMV, matmul_tile, split_k
    from tvm_sparseconv.target import make_target

    target = make_target(None)
    cpu = cpu_of(target)
    split = split_k(k, n, batch, cpu)
    tile, group = matmul_tile(n, batch, cpu.lanes, cpu.accumulators, 1 if split else cpu.cores)
    assert n % tile == 0 and batch % group == 0
    width = gcd(tile, cpu.lanes)
    assert group * (tile // width) <= cpu.accumulators
    sch = ColumnGEMV().apply(_fused_head(batch, k, n, gelu), target, False)
    assert sch is not None
    func = sch.mod["main"]
    text = func.script()
    assert f"T.vectorized(T.int64({width}))" in text
    vectors = [tile // width, width]
    if split:
        parts, step = split
        assert text.count("T.parallel(") == 1 and f"T.parallel(T.int64({parts}))" in text
        assert k % (parts * step) == 0 and step in (1, 2, 4, 8)
        assert f"T.sblock_alloc_buffer((T.int64({parts}), T.int64({batch}), T.int64({n})))" in text
        loops = [int(sch.get(lp).extent) for lp in sch.get_loops(sch.get_sblock("matmul_rf_update"))]
        groups = [batch // group, step, group] if group > 1 else [batch, step]
        assert loops == [parts, k // parts // step, n // tile, *groups, *vectors]
    else:
        tasks = n // tile * batch // group
        assert f"T.parallel(T.int64({tasks}))" in text
        assert f"T.sblock_alloc_buffer((T.int64({batch}), T.int64({n})))" not in text  # only the local accumulators
        loops = [int(sch.get(lp).extent) for lp in sch.get_loops(sch.get_sblock("matmul_update"))]
        assert loops == ([tasks, k, group, *vectors] if group > 1 else [tasks, k, *vectors])
    f = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype("float32") for s in ((batch, k), (k, n), (n,)))
    y = tvm.runtime.tensor(np.zeros((batch, n), "float32"))
    f["main"](*(tvm.runtime.tensor(a) for a in (x, w, b)), y)
    ref = x.astype(np.float64) @ w + b
    np.testing.assert_allclose(y.numpy(), _gelu_f64(ref) if gelu else ref, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_matmul_tiles_fill_the_registers_and_the_cores():
    """The (outputs, rows) a ColumnGEMV task holds: up to 4 vectors of outputs, as many rows as
    fit the accumulators and divide the rows, the most multiply-adds per load while every core
    has a task. 49 rows (7x7 pixels) of 1536 outputs take 2 vectors of 7 rows on AVX-512 (4
    vectors would leave groups of 1: 0.48 ms against 0.28 on an AMD EPYC Zen 4)."""
    from tvm_sparseconv.schedule_rules import matmul_tile

    assert matmul_tile(1536, 49, 16, 16, 2) == (32, 7)
    assert matmul_tile(192, 3136, 16, 16, 2) == (64, 4)
    assert matmul_tile(192, 3136, 8, 8, 2) == (32, 2)  # AVX2: 4 vectors of 2 rows in 8 accumulators
    assert matmul_tile(1000, 1, 16, 16, 2) == (40, 1)  # a head: the widest tile that still gives 2 tasks
    assert matmul_tile(64, 1, 16, 16, 2) == (32, 1) and matmul_tile(64, 1, 16, 16, 1) == (64, 1)
    assert matmul_tile(64, 0, 16, 16, 2) == (32, 1)  # rows known at run time only: one at a time
    assert matmul_tile(1009, 5, 16, 16, 2) is None


def test_split_k_takes_heads_whose_weight_outgrows_the_l2_caches():
    """ColumnGEMV's split-K schedule: a w larger than the cores' L2 caches together, at most 8
    rows of x, a k the cores divide; the step the largest of 8, 4, 2, 1 that divides each
    core's range of k."""
    from tvm_sparseconv.cpu import CPU
    from tvm_sparseconv.schedule_rules import split_k

    zen4 = CPU("znver4", "avx512", 16, 32, True, True, 1.0, 32 << 10, 1 << 20, 32 << 20, 2)
    assert split_k(9216, 4096, 1, zen4) == (2, 8)  # AlexNet's 151 MB: 2 ranges of k, 8 rows a step
    assert split_k(2050, 1000, 8, zen4) == (2, 1)
    assert split_k(1280, 1000, 1, zen4) == (2, 8)  # MobileNet-V2's head, 5.1 MB
    assert split_k(512, 1000, 1, zen4) is None  # 2.0 MB: within 2 x 1 MiB
    assert split_k(9216, 4096, 9, zen4) is None  # more rows: the tiled schedule
    assert split_k(9216, 4096, 0, zen4) is None  # rows known at run time only
    assert split_k(4097, 1000, 1, zen4) is None  # k not divisible by the cores
    one_core = CPU(**{**zen4.to_dict(), "cores": 1})
    assert split_k(9216, 4096, 1, one_core) is None


def test_column_gemv_with_a_batch_known_only_at_run_time():
    """A symbolic batch keeps one row at a time (the group of rows needs the batch's size); the
    head is still scheduled and exact at any batch."""
    from tvm_sparseconv.schedule_rules import ColumnGEMV
    from tvm_sparseconv.target import make_target

    target = make_target(None)
    b = tvm.tirx.Var("b", "int64")
    sch = ColumnGEMV().apply(_fused_head(b, 40, 24), target, False)
    assert sch is not None
    f = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=target)
    rng = np.random.default_rng(1)
    for rows in (1, 3):
        x, w, bias = (rng.standard_normal(s).astype("float32") for s in ((rows, 40), (40, 24), (24,)))
        y = tvm.runtime.tensor(np.zeros((rows, 24), "float32"))
        f["main"](*(tvm.runtime.tensor(a) for a in (x, w, bias)), y)
        np.testing.assert_allclose(y.numpy(), x.astype(np.float64) @ w + bias, rtol=1e-4, atol=1e-4)


def test_column_gemv_declines_what_it_cannot_vectorize():
    """An N with no divisor of a vector's size (a prime) and a weight laid out N x K (dlight's
    own GEMV takes it) are left to the next rule."""
    from tvm_sparseconv.schedule_rules import ColumnGEMV
    from tvm_sparseconv.target import make_target

    target = make_target(None)
    assert ColumnGEMV().apply(_fused_head(1, 64, 1009), target, False) is None
    nk = _legalized(lambda x: relax.op.matmul(x, relax.const(np.ones((32, 64), "float32"))), (1, 32))
    assert ColumnGEMV().apply(nk, target, False) is not None  # (1 x 32) @ (32 x 64): K x N
    x, w = te.placeholder((1, 32), name="x"), te.placeholder((64, 32), name="w")
    r = te.reduce_axis((0, 32), "r")
    kn = te.create_prim_func([x, w, te.compute((1, 64), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r))])
    assert ColumnGEMV().apply(kn, target, False) is None  # w is N x K: contiguous along k


def test_gemvs_left_to_tvm_compile_and_match_numpy():
    """1x1 convs at one pixel that no plan rewrote (TVM's conv2d, "direct"): an expanding one
    in a squeeze-and-excitation block (48 -> 1152, its sigmoid scaling a 7x7 map), which
    dlight's GEMV rule made into a function LLVM did not finish compiling (RowGEMV declines it),
    and a reducing one (1280 -> 1000). Both against NumPy float64 through
    tvm_sparseconv.compile."""
    import tvm_sparseconv

    rng = np.random.default_rng(0)
    shapes = {"se": (48, 1152), "head": (1280, 1000)}
    ws = {k: rng.standard_normal((n, c, 1, 1)).astype("float32") for k, (c, n) in shapes.items()}
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 1280, 7, 7), "float32"))
    with bb.function("main", [x]):  # the pooled x feeds the head, its first 48 channels the SE convs
        with bb.dataflow():
            p = bb.emit(relax.op.mean(x, axis=[2, 3], keepdims=True))
            se_in = bb.emit(relax.op.strided_slice(p, axes=[1], begin=[0], end=[48]))
            s = bb.emit(relax.op.sigmoid(relax.op.nn.conv2d(se_in, relax.const(ws["se"]))))
            fmap = bb.emit(relax.op.strided_slice(x, axes=[1], begin=[0], end=[1152]))
            y = bb.emit_output(relax.Tuple([relax.op.multiply(fmap, s), relax.op.nn.conv2d(p, relax.const(ws["head"]))]))
        bb.emit_func_output(y)
    vm = relax.VirtualMachine(tvm_sparseconv.compile(bb.get()), tvm.cpu())
    a = rng.standard_normal((1, 1280, 7, 7)).astype("float32")
    se, head = vm["main"](tvm.runtime.tensor(a))
    pooled = a.astype(np.float64).mean(axis=(2, 3)).reshape(1280)
    gate = 1 / (1 + np.exp(-(ws["se"][:, :, 0, 0] @ pooled[:48])))
    np.testing.assert_allclose(se.numpy(), a[:, :1152] * gate.reshape(1, 1152, 1, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.numpy().reshape(1000), ws["head"][:, :, 0, 0] @ pooled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,op,axes", [
    ((2, 37, 13, 11), "mean", [2, 3]),  # 143 elements per output: 13 partial sums (no tail)
    ((1, 20, 7, 7), "mean", [2, 3]),    # a squeeze-and-excitation pool at 7x7: 7 partial sums
    ((1, 24, 56, 56), "sum", [3]),      # one row per output: a whole vector of partial sums
    ((3, 40, 17, 16), "max", [2, 3]),
])
def test_row_reductions_in_lanes_match_numpy(shape, op, axes):
    """A reduction over contiguous elements (RowReduction: partial sums in vector lanes, then
    the lanes summed) through tvm_sparseconv.compile, against NumPy float64, with NaN and +-Inf
    in some outputs' elements (they must reach those outputs, and only those); the rule takes
    the function (its reduction has a parallel loop), and declines a reduction over channels,
    which are not contiguous in NCHW."""
    import tvm_sparseconv
    from tvm_sparseconv.schedule_rules import RowReduction

    reduce = getattr(relax.op, op)
    mod = _module(lambda x: reduce(x, axis=axes, keepdims=True), shape)
    rng = np.random.default_rng(1)
    a = rng.standard_normal(shape).astype("float32")
    a[0, 1, 2, 3], a[-1, 2, 0, 0], a[0, 3, -1, -1] = np.nan, np.inf, -np.inf
    got = relax.VirtualMachine(tvm_sparseconv.compile(mod), tvm.cpu())["main"](tvm.runtime.tensor(a)).numpy()
    # a max over a NaN is TVM's max (LLVM's maxnum): the other operand, with or without the rule
    want = (np.nanmax if op == "max" else getattr(np, op))(a.astype(np.float64), axis=tuple(axes), keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    with target:
        sch = RowReduction().apply(_legalized(lambda x: reduce(x, axis=axes, keepdims=True), shape), target, False)
        assert sch is not None and "T.parallel" in sch.mod.script()
        channels = _legalized(lambda x: reduce(x, axis=[1], keepdims=True), shape)
        assert RowReduction().apply(channels, target, False) is None


def test_row_reduction_declines_argmax():
    """An argmax reduces to an (index, value) pair: RowReduction declines it (partial sums of a
    pair are no sum), and it compiles to NumPy's argmax."""
    import tvm_sparseconv
    from tvm_sparseconv.schedule_rules import RowReduction

    mod = _module(lambda x: relax.op.argmax(x, axis=3), (2, 5, 9, 16))
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    with target:
        assert RowReduction().apply(_legalized(lambda x: relax.op.argmax(x, axis=3), (2, 5, 9, 16)), target, False) is None
    a = np.random.default_rng(0).standard_normal((2, 5, 9, 16)).astype("float32")
    got = relax.VirtualMachine(tvm_sparseconv.compile(mod), tvm.cpu())["main"](tvm.runtime.tensor(a)).numpy()
    np.testing.assert_array_equal(got, np.argmax(a, axis=3))



def _nhwc_mlp(bias_after_reshape: bool) -> tuple[tvm.IRModule, tuple]:
    """main(x: 1 x 4 x 4 x 8) as torch exports a Linear -> GELU -> Linear over an NHWC map to
    ONNX: each Linear flattens the pixels, multiplies and reshapes back, and GELU runs on the
    4-d view. With ``bias_after_reshape`` the first bias is added to the 4-d view as a
    1 x 1 x 1 x 12 tensor (it broadcasts: not a scalar). Also its weights (w1, b1, w2)."""
    rng = np.random.default_rng(3)
    weights = tuple(rng.standard_normal(s).astype("float32") for s in ((8, 12), (12,), (12, 8)))
    (w1, w2), b1 = (relax.const(weights[0]), relax.const(weights[2])), weights[1]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.matmul(bb.emit(relax.op.reshape(x, (16, 8))), w1))
            if bias_after_reshape:
                h = bb.emit(relax.op.add(bb.emit(relax.op.reshape(h, (1, 4, 4, 12))),
                                         relax.const(b1.reshape(1, 1, 1, 12))))
            else:
                h = bb.emit(relax.op.reshape(bb.emit(relax.op.add(h, relax.const(b1))), (1, 4, 4, 12)))
            g = bb.emit(_gelu(h))
            y = bb.emit(relax.op.matmul(bb.emit(relax.op.reshape(g, (16, 12))), w2))
            y = bb.emit_output(relax.op.add(x, bb.emit(relax.op.reshape(y, (1, 4, 4, 8)))))
        bb.emit_func_output(y)
    return bb.get(), weights


@pytest.mark.parametrize("bias_after_reshape", [False, True])
def test_sink_reshapes_moves_gelu_in_front_of_the_reshape(bias_after_reshape):
    """GELU on the 4-d view of a flattened matmul's output moves in front of the reshape, and
    the pair of reshapes around it goes: the chain reads the matmul's 2-d output, so Relax fuses
    it with the matmul. An operand that broadcasts (a 1 x 1 x 1 x 12 bias on the view) stops
    the move there. The module computes the same values as before, against NumPy float64."""
    from tvm_sparseconv.passes.sink_reshapes import SinkReshapes

    mod, (w1, b1, w2) = _nhwc_mlp(bias_after_reshape)
    sunk = SinkReshapes(mod)
    calls = [b.value for blk in sunk["main"].body.blocks for b in blk.bindings if isinstance(b.value, relax.Call)]
    names = [c.op.name for c in calls]
    erf = calls[names.index("relax.erf")]
    if bias_after_reshape:  # the bias blocks it: GELU stays on the 4-d view
        assert [int(d) for d in erf.args[0].ty.shape] == [1, 4, 4, 12]
    else:
        assert [int(d) for d in erf.args[0].ty.shape] == [16, 12]
        assert names.count("relax.reshape") == 2  # the first flatten and the last unflatten
    x = np.random.default_rng(4).standard_normal((1, 4, 4, 8)).astype("float32")
    outs = []
    for m in (mod, sunk):
        vm = relax.VirtualMachine(tvm.compile(relax.transform.LegalizeOps()(m), target="llvm"), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(outs[1], outs[0])
    x64 = x.astype(np.float64).reshape(16, 8)
    ref = x64 + _gelu_f64(x64 @ w1 + b1) @ w2
    np.testing.assert_allclose(outs[1].reshape(16, 8), ref, rtol=1e-5, atol=1e-5)


def _batch_norm_module(shape, params, axis=1, training=False, center=True, scale=True):
    """main(x) = batch_norm(x, *params)[0], the parameters bound as constants."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            bn = bb.emit(relax.op.nn.batch_norm(x, *(relax.const(p) for p in params), axis=axis, epsilon=1e-3,
                                                center=center, scale=scale, training=training))
            y = bb.emit_output(relax.TupleGetItem(bn, 0))
        bb.emit_func_output(y)
    return bb.get()


def _ops(mod) -> set[str]:
    out = set()
    relax.analysis.post_order_visit(mod["main"], lambda e: out.add(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return out


@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_batch_norm_as_affine_matches_numpy(center, scale):
    """An inference batch norm becomes x * scale + shift (per-channel constants); the result
    matches the batch norm's definition in NumPy float64, NaN and Inf kept."""
    from tvm_sparseconv.passes.batch_norm_as_affine import BatchNormAsAffine

    rng = np.random.default_rng(0)
    c = 6
    params = [rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.1, 3, c)]
    mod = BatchNormAsAffine(_batch_norm_module((2, c, 5, 7), [p.astype("float32") for p in params],
                                               center=center, scale=scale))
    assert _ops(mod) == {"relax.multiply", "relax.add"}
    x = rng.standard_normal((2, c, 5, 7)).astype("float32")
    x[0, 1, 2, 3], x[1, 4, 0, 0], x[1, 5, 4, 6] = np.nan, np.inf, -np.inf
    out = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    g, b, m, v = (p.astype(np.float64)[None, :, None, None] for p in params)
    ref = (x - m) / np.sqrt(v + 1e-3) * (g if scale else 1) + (b if center else 0)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{"training": True}, {"axis": 3}])
def test_batch_norm_as_affine_leaves_training_and_other_axes(kw):
    from tvm_sparseconv.passes.batch_norm_as_affine import BatchNormAsAffine

    c = 4
    params = [np.ones(c, "float32"), np.zeros(c, "float32"), np.zeros(c, "float32"), np.ones(c, "float32")]
    shape = (1, 3, 3, c) if kw.get("axis") == 3 else (1, c, 3, 3)
    mod = _batch_norm_module(shape, params, **kw)
    tvm.ir.assert_structural_equal(BatchNormAsAffine(mod), mod)


def test_variance_and_instance_norm_reduce_rows_in_lanes():
    """An instance norm as the ONNX importer writes it (a mean, a variance, then subtract,
    divide by sqrt(var + eps), scale, shift) through tvm_sparseconv.compile against NumPy
    float64, a NaN reaching its own channel only. RowReduction takes the variance's two
    reductions (the second reads the first's mean) in one parallel loop, with no buffer of x's
    size (the squared differences are computed where they are summed)."""
    import tvm_sparseconv
    from tvm_sparseconv.schedule_rules import RowReduction

    shape = (2, 6, 20, 24)
    rng = np.random.default_rng(2)
    gamma, beta = (rng.standard_normal((1, 6, 1, 1)).astype("float32") for _ in range(2))

    def instance_norm(x):
        mean = relax.op.mean(x, axis=[2, 3], keepdims=True)
        std = relax.op.sqrt(relax.op.add(relax.op.variance(x, axis=[2, 3], keepdims=True), relax.const(1e-5)))
        y = relax.op.divide(relax.op.subtract(x, mean), std)
        return relax.op.add(relax.op.multiply(y, relax.const(gamma)), relax.const(beta))

    a = (3.0 + rng.standard_normal(shape)).astype("float32")
    a[1, 4, 5, 6] = np.nan
    vm = relax.VirtualMachine(tvm_sparseconv.compile(_module(instance_norm, shape)), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a)).numpy()
    x = a.astype(np.float64)
    want = (x - x.mean(axis=(2, 3), keepdims=True)) / np.sqrt(x.var(axis=(2, 3), keepdims=True) + 1e-5) * gamma + beta
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got[1, 4]).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    with target:
        sch = RowReduction().apply(_legalized(lambda v: relax.op.variance(v, axis=[2, 3], keepdims=True), shape),
                                   target, False)
    assert sch is not None and "T.parallel" in sch.mod.script()
    func = sch.mod["main"]
    allocated = [b for blk in [func.body.block] for b in blk.alloc_buffers]
    assert all(int(np.prod([int(d) for d in b.shape])) < int(np.prod(shape)) for b in allocated)


def test_layer_norm_rows_keep_their_partial_sums_on_the_stack():
    """A layer norm over the channels of NHWC (ConvNeXt's) through tvm_sparseconv.compile
    against NumPy float64 (a NaN reaching its own pixel only); RowReduction's partial sums stay
    out of TVM's workspace allocator: a "local" buffer there was a TVMBackendAllocWorkspace call
    per output, 4x the layer norm's time."""
    import re

    import tvm_sparseconv
    from tvm_sparseconv.schedule_rules import RowReduction
    from tvm_sparseconv.target import make_target

    shape = (1, 14, 14, 48)
    rng = np.random.default_rng(3)
    gamma, beta = (rng.standard_normal(48).astype("float32") for _ in range(2))

    def layer_norm(x):
        return relax.op.nn.layer_norm(x, relax.const(gamma), relax.const(beta), axes=[-1], epsilon=1e-6)

    a = (1.0 + rng.standard_normal(shape)).astype("float32")
    a[0, 3, 4, 5] = np.nan
    got = relax.VirtualMachine(tvm_sparseconv.compile(_module(layer_norm, shape)), tvm.cpu())["main"](
        tvm.runtime.tensor(a)).numpy()
    x = a.astype(np.float64)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * gamma + beta
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got[0, 3, 4]).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    target = make_target(None)
    with target:
        sch = RowReduction().apply(_legalized(layer_norm, shape), target, False)
    assert sch is not None
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "f")}), target=target)
    assert not re.search(r"load ptr, ptr @__TVMBackendAllocWorkspace", lib.mod.inspect_source("ll"))


@pytest.mark.parametrize("classes", [4, 64, 1000])
def test_softmax_rows_through_the_row_reduction_rule(classes):
    """A softmax is two reductions over the same rows (the max, then the sum of exps) and an
    elementwise block: RowReduction takes it with a loop of steps per lane (64 and 1000
    classes), and declines a row of one vector (4 classes: a later reduction would have no
    loop of steps; VGG-16-tumor's head). Through tvm_sparseconv.compile it matches NumPy."""
    import tvm_sparseconv
    from tvm_sparseconv.schedule_rules import RowReduction

    shape = (3, classes)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    with target:
        sch = RowReduction().apply(_legalized(lambda v: relax.op.nn.softmax(v, axis=-1), shape), target, False)
    assert (sch is None) == (classes == 4)
    x = (4 * np.random.default_rng(classes).standard_normal(shape)).astype("float32")
    vm = relax.VirtualMachine(tvm_sparseconv.compile(_module(lambda v: relax.op.nn.softmax(v, axis=-1), shape)),
                              tvm.cpu())
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), e / e.sum(axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-7)
