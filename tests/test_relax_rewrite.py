"""The rewrite pass on small Relax modules: fusion, fallbacks, layouts, torch import.

bench on the same modules is test_bench.py; ParallelizeRest (the ops the rewrite leaves) is
test_parallelize_rest.py."""
import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_sparseconv.api import compile as tvms_compile
from tvm_sparseconv.conv import Conv2DSpec, UnsupportedConvError
from tvm_sparseconv.graph import find_conv_sites
from tvm_sparseconv.passes import LayerChoice, RewriteConv2D, applied_layers
from tvm_sparseconv.reference import dense_conv2d


def small_module(groups=1, data_layout="NCHW", relu=True, bias=True, seed=0, non_finite=False):
    """x -> conv(3x3, pad 1) [+ bias] [-> relu] -> conv(1x1, groups) -> relu; the weights from
    ``seed`` (the same module whatever ran before), with ``non_finite`` an Inf and a NaN in the
    second. test_bench and test_schedules use it too."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype("float32")
    w2 = rng.standard_normal((8, 8 // groups, 1, 1)).astype("float32")
    if non_finite:
        w2[1, 2, 0, 0], w2[3, 5, 0, 0] = np.inf, np.nan
    b1 = rng.standard_normal((1, 8, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    shape = (1, 4, 9, 9) if data_layout == "NCHW" else (1, 9, 9, 4)
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if data_layout == "NHWC":
                c = bb.emit(relax.op.nn.conv2d(x, relax.const(w1.transpose(2, 3, 1, 0)), padding=1,
                                               data_layout="NHWC", kernel_layout="HWIO"))
                if bias:
                    c = bb.emit(relax.op.add(c, relax.const(b1.reshape(1, 1, 1, 8))))
                out = bb.emit_output(bb.emit(relax.op.nn.relu(c)))
            else:
                c = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), padding=1))
                if bias:
                    c = bb.emit(relax.op.add(c, relax.const(b1)))
                if relu:
                    c = bb.emit(relax.op.nn.relu(c))
                c2 = bb.emit(relax.op.nn.conv2d(c, relax.const(w2), groups=groups))
                out = bb.emit_output(bb.emit(relax.op.nn.relu(c2)))
        bb.emit_func_output(out)
    return bb.get(), w1, w2, b1


def reference(x, w1, w2, b1, groups=1, bias=True, relu=True):
    s1 = Conv2DSpec.from_shapes(x.shape, w1.shape, padding=1)
    h = dense_conv2d(s1, x, w1, b1.reshape(-1) if bias else None, relu=relu)
    s2 = Conv2DSpec.from_shapes(h.shape, w2.shape, groups=groups)
    return dense_conv2d(s2, h, w2, relu=True)


def run(ex, x):
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_sites_fuse_bias_and_relu_only_when_they_feed_each_other():
    mod, *_ = small_module()
    s = find_conv_sites(mod["main"])
    assert [x.key for x in s] == ["conv000", "conv001"]
    assert s[0].bias is not None and s[0].relu and len(s[0].absorbed) == 2
    assert s[1].bias is None and s[1].relu


@pytest.mark.parametrize("algorithm", ["halo", "cpo", "im2col", "dense"])
def test_rewrite_matches_reference_and_removes_fused_ops(algorithm):
    mod, w1, w2, b1 = small_module()
    x = np.maximum(np.random.default_rng(1).standard_normal((1, 4, 9, 9)), 0).astype("float32")
    rw = RewriteConv2D({"conv000": LayerChoice(algorithm), "conv001": LayerChoice(algorithm)})
    new = rw(mod)
    ops = {b.value.op.name for block in new["main"].body.blocks for b in block.bindings
           if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)}
    assert not ops & {"relax.nn.conv2d", "relax.nn.relu", "relax.add"}
    ex = tvm.compile(new, target="llvm")
    np.testing.assert_allclose(run(ex, x), reference(x, w1, w2, b1), rtol=1e-4, atol=1e-4)


def test_grouped_conv_falls_back_to_direct_or_errors_when_strict():
    mod, w1, w2, b1 = small_module(groups=2)
    x = np.maximum(np.random.default_rng(2).standard_normal((1, 4, 9, 9)), 0).astype("float32")
    rw = RewriteConv2D({"conv000": LayerChoice("cpo"), "conv001": LayerChoice("cpo")})
    new = rw(mod)
    assert applied_layers(new, find_conv_sites(mod["main"])) == {"conv000": "cpo", "conv001": "direct"}
    np.testing.assert_allclose(run(tvm.compile(new, target="llvm"), x), reference(x, w1, w2, b1, groups=2),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(UnsupportedConvError, match="conv001.*groups=2"):
        RewriteConv2D({"conv001": LayerChoice("cpo")}, strict=True).select(mod["main"])


def test_a_layer_whose_weights_hold_nan_or_inf_runs_on_tvms_conv2d():
    """0 x Inf and 0 x NaN are NaN: the sparse kernels skip zero inputs and dense skips padded
    taps, so such a layer falls back to TVM's conv2d (the other layer keeps its algorithm). Its
    convolution is the float64 reference's, NaN and Inf where it has them (the Inf weight gives
    NaN where it meets a zero of the ReLU before, Inf elsewhere); the ReLU after it is then
    TVM's, which maps NaN to 0 (LLVM's maxnum), as TVM's ReLU does anywhere in a model."""
    mod, w1, w2, b1 = small_module(non_finite=True)
    x = np.maximum(np.random.default_rng(4).standard_normal((1, 4, 9, 9)), 0).astype("float32")
    s1 = Conv2DSpec.from_shapes(x.shape, w1.shape, padding=1)
    h = dense_conv2d(s1, x, w1, b1.reshape(-1), relu=True)
    conv = dense_conv2d(Conv2DSpec.from_shapes(h.shape, w2.shape), h, w2)
    assert np.isnan(conv[0, 1]).any() and np.isposinf(conv[0, 1]).any() and np.isnan(conv[0, 3]).all()
    want = np.where(np.isnan(conv), 0, np.maximum(conv, 0))
    rw = RewriteConv2D({"conv000": LayerChoice("hybrid"), "conv001": LayerChoice("hybrid")})
    assert applied_layers(rw(mod), find_conv_sites(mod["main"])) == {"conv000": "hybrid", "conv001": "direct"}
    with pytest.raises(UnsupportedConvError, match="conv001: the weight holds NaN or Inf"):
        RewriteConv2D({"conv001": LayerChoice("hybrid")}, strict=True).select(mod["main"])
    for algorithm in (None, "pixcsr", "dense"):  # None: the predicted plan
        y = run(tvms_compile(mod, algorithm=algorithm), x)
        np.testing.assert_array_equal(np.isposinf(y), np.isposinf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(y[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_a_plan_made_for_another_cpu_is_applied_with_a_warning():
    """A plan records the CPU it was made for; on another (name, ISA, vector width or cores)
    it computes the same, and compile says whose knobs they are."""
    import warnings

    from tvm_sparseconv.cpu import cpu_of
    from tvm_sparseconv.plan import Plan

    mod, w1, w2, b1 = small_module()
    x = np.maximum(np.random.default_rng(5).standard_normal((1, 4, 9, 9)), 0).astype("float32")
    target = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
    plan = Plan.uniform(find_conv_sites(mod["main"]), "hybrid")
    for made_for, warned in (("skylake-avx512", True), ("haswell", False), (None, False)):
        plan.cpu = made_for and cpu_of({**target, "mcpu": made_for}).to_dict()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ex = tvms_compile(mod, plan=plan, target=target)
        said = [str(w.message) for w in seen if "the plan was made for" in str(w.message)]
        assert len(said) == warned, said
        assert not warned or "made for skylake-avx512 (avx512, 16 lanes, 2 cores), the target is haswell" in said[0]
        np.testing.assert_allclose(run(ex, x), reference(x, w1, w2, b1), rtol=1e-4, atol=1e-4)


def test_nhwc_conv_is_rewritten_through_layout_transposes():
    mod, w1, w2, b1 = small_module(data_layout="NHWC")
    x = np.maximum(np.random.default_rng(3).standard_normal((1, 9, 9, 4)), 0).astype("float32")
    ex = tvms_compile(mod, algorithm="halo")
    s1 = Conv2DSpec.from_shapes((1, 4, 9, 9), w1.shape, padding=1)
    ref = dense_conv2d(s1, x.transpose(0, 3, 1, 2), w1, b1.reshape(-1), relu=True).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(run(ex, x), ref, rtol=1e-4, atol=1e-4)


def test_torch_exported_program():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)

        def forward(self, x):
            return torch.relu(self.c2(torch.relu(self.c1(x))))

    net = Net().eval()
    x = torch.rand(1, 3, 16, 16)
    ep = torch.export.export(net, (x,))
    ex = tvms_compile(ep, algorithm="halo")
    with torch.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(run(ex, x.numpy()), ref, rtol=1e-4, atol=1e-4)
