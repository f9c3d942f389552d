"""Clip epilogues (ReLU6, any clip(0, a)), LeakyReLU, hard-swish and SiLU gates and residual adds without an
activation, in every kernel and as the graph matcher finds them in models imported from ONNX and
torch.

The kernel grid with a residual is test_residual.py; bias and ReLU alone are test_conformance.py.
"""
import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_sparseconv.algorithms import ALGORITHMS
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.api import compile as tvms_compile
from tvm_sparseconv.compile import lower, resolve_plan
from tvm_sparseconv.conv import GATES, Conv2DSpec, ConvSpecError, Epilogue
from tvm_sparseconv.frontend import load_model
from tvm_sparseconv.passes.clamps_as_ops import scalar_clamp
from tvm_sparseconv.plan import Plan, PlanLayer
from tvm_sparseconv.reference import dense_conv2d

from conftest import GRID, accepts, activation, assert_conv_close, grid_spec, weight

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


def test_clip_needs_relu_and_a_positive_bound():
    assert Epilogue(relu=True, clip=6.0).clip == 6.0
    for bad in (dict(clip=6.0), dict(relu=True, clip=0.0), dict(relu=True, clip=-1.0)):
        with pytest.raises(ConvSpecError, match="clip"):
            Epilogue(**bad)


def test_a_gate_is_known_and_replaces_relu():
    assert Epilogue(bias=True, gate="hard_sigmoid").gate == "hard_sigmoid"
    assert Epilogue(gate="sigmoid").gate == "sigmoid"
    for bad in (dict(gate="tanh"), dict(gate="hard_sigmoid", relu=True), dict(gate="sigmoid", relu=True, clip=6.0)):
        with pytest.raises(ConvSpecError, match="gate"):
            Epilogue(**bad)


def _bounded_case(algorithm):
    """(spec, x, w, bias, a residual with NaN, +Inf and -Inf in it) of GRID[1], x at density 0.5;
    an algorithm for grouped layers only gets the layer made depthwise (8 groups, 2 outputs each)."""
    spec = grid_spec(GRID[1])
    if not accepts(algorithm, spec):
        spec = Conv2DSpec.from_shapes(spec.x_shape, (spec.out_channels, 1, 3, 3), 1, 1, 1, spec.in_channels)
    res = np.random.default_rng(7).standard_normal(spec.y_shape).astype(np.float32)
    res.flat[[3, 11, 17]] = np.nan, np.inf, -np.inf
    return spec, activation(spec, 0.5), weight(spec), np.linspace(-1, 1, spec.out_channels).astype(np.float32), res


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_kernel_clips(algorithm):
    """bias + ReLU + clip(0, 0.5), then the same with a residual (NaN and Inf in it) before
    them: the bound cuts a large share of the outputs, NaN passes it, +Inf becomes the bound."""
    spec, x, w, bias, res = _bounded_case(algorithm)
    for r in (None, res):
        layer = CompiledLayer(algorithm, spec, w, bias, True, residual=r is not None, clip=0.5)
        y = layer(x) if r is None else layer(x, r)
        ref = dense_conv2d(spec, x, w, bias, True, residual=r, clip=0.5)
        assert (ref == 0.5).mean() > 0.1 and np.nanmax(y) <= 0.5
        assert np.isnan(y).sum() == np.isnan(ref).sum() == (0 if r is None else 1)
        assert_conv_close(y, ref, spec)


def test_a_leaky_slope_needs_relu_no_clip_and_a_fraction():
    assert Epilogue(relu=True, slope=0.1).slope == 0.1
    for bad in (dict(slope=0.1), dict(relu=True, slope=0.0), dict(relu=True, slope=1.5),
                dict(relu=True, clip=6.0, slope=0.1)):
        with pytest.raises(ConvSpecError, match="slope"):
            Epilogue(**bad)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_kernel_leaks(algorithm):
    """bias + LeakyReLU (slope 0.1), then the same with a residual (NaN and Inf in it) before it:
    negative outputs scaled, not zeroed; NaN passes, -Inf stays -Inf."""
    spec, x, w, bias, res = _bounded_case(algorithm)
    for r in (None, res):
        layer = CompiledLayer(algorithm, spec, w, bias, True, residual=r is not None, slope=0.1)
        y = layer(x) if r is None else layer(x, r)
        ref = dense_conv2d(spec, x, w, bias, True, residual=r, slope=0.1)
        assert (ref < 0).mean() > 0.1
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
        assert_conv_close(y, ref, spec)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_kernel_gates(algorithm, gate):
    """bias + the gate (hard-swish, SiLU), then a residual (NaN and Inf in it) before the gate,
    on inputs of densities 0, 0.5 and 1 with a NaN, +Inf and -Inf in x: outputs on both sides of
    the hard sigmoid's bounds (v <= -3: exactly 0; v >= 3: v itself), where SiLU is near 0 and
    near v; -Inf * 0 is NaN, as in the graph's own ops."""
    spec = grid_spec(GRID[1])
    if not accepts(algorithm, spec):
        spec = Conv2DSpec.from_shapes(spec.x_shape, (spec.out_channels, 1, 3, 3), 1, 1, 1, spec.in_channels)
    w = weight(spec) * 8  # outputs spread over [-3, 3] and beyond
    bias = np.linspace(-2, 2, spec.out_channels).astype(np.float32)
    res = np.random.default_rng(7).standard_normal(spec.y_shape).astype(np.float32)
    res.flat[[3, 11]] = np.nan, np.inf
    for density, r in ((0.0, None), (0.5, None), (1.0, res), (0.5, res)):
        x = activation(spec, density)
        if density > 0:
            x.flat[[0, 5, 9]] = np.nan, np.inf, -np.inf
        layer = CompiledLayer(algorithm, spec, w, bias, residual=r is not None, gate=gate)
        y = layer(x) if r is None else layer(x, r)
        ref = dense_conv2d(spec, x, w, bias, residual=r, gate=gate)
        if density == 0.5 and r is None:
            low = (ref == 0) if gate == "hard_sigmoid" else (ref < -0.1)  # SiLU's dip: -0.28 at v = -1.28
            assert low.mean() > 0.05 and (ref >= 3).mean() > 0.05, "the grid misses a bound of the gate"
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
        assert_conv_close(y, ref, spec)


# -- the graph: ONNX and torch forms ---------------------------------------------------------------
def _draw_parameters(module, seed: int, scale: float) -> None:
    """Every weight and bias of ``module`` drawn from a seeded normal distribution times scale."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * scale


class Inverted(torch.nn.Module):
    """A MobileNet-V2-like block: 1x1 expand + ReLU6, 3x3 + ReLU6, 1x1 project, + the input
    (no activation after the add), then a conv + clip(0, 2) and a conv + clamp(min=0)."""

    def __init__(self):
        super().__init__()
        self.expand = torch.nn.Conv2d(8, 24, 1)
        self.mid = torch.nn.Conv2d(24, 24, 3, padding=1)
        self.project = torch.nn.Conv2d(24, 8, 1)
        self.tail = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.last = torch.nn.Conv2d(8, 8, 1)
        _draw_parameters(self, seed=0, scale=0.3)

    def forward(self, x):
        h = torch.nn.functional.relu6(self.expand(x))
        h = torch.nn.functional.relu6(self.mid(h))
        y = self.project(h) + x
        y = torch.clamp(self.tail(y), 0.0, 2.0)
        return torch.clamp(self.last(y), min=0.0)


SHAPE = (1, 8, 10, 10)


@pytest.fixture(scope="module")
def inverted_onnx(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("epi") / "inverted.onnx")
    torch.onnx.export(Inverted().eval(), (torch.zeros(SHAPE),), path, dynamo=False, opset_version=13,
                      input_names=["x"])
    return path


def expected_sites(sites):
    got = [(s.relu, s.clip, s.residual_add is not None) for s in sites]
    assert got == [(True, 6.0, False), (True, 6.0, False), (False, None, True), (True, 2.0, False),
                   (True, None, False)]
    fused = sites[2].residual_add
    assert not fused.relu and fused.clip is None


def test_onnx_clips_and_residual_are_found(inverted_onnx):
    expected_sites(load_model(inverted_onnx).sites)


def test_torch_clips_and_residual_are_found():
    ep = torch.export.export(Inverted().eval(), (torch.zeros(SHAPE),))
    expected_sites(load_model(ep).sites)


def test_a_clip_that_is_not_an_activation_stays_in_the_graph():
    """clip(-1, 1), a clip of a conv whose output is used again, and a per-channel maximum are
    not absorbed: the conv keeps its plain epilogue."""
    rng = np.random.default_rng(0)
    w = relax.const(rng.standard_normal((4, 4, 1, 1)).astype(np.float32))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 5), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.clip(bb.emit(relax.op.nn.conv2d(x, w)), -1.0, 1.0))
            c2 = bb.emit(relax.op.nn.conv2d(a, w))
            c = bb.emit(relax.op.add(bb.emit(relax.op.clip(c2, 0.0, 6.0)), c2))
            d = bb.emit(relax.op.maximum(bb.emit(relax.op.nn.conv2d(c, w)),
                                         relax.const(np.zeros((1, 4, 1, 1), np.float32))))
            out = bb.emit_output(d)
        bb.emit_func_output(out)
    sites = load_model(bb.get()).sites
    assert [(s.relu, s.clip, len(s.absorbed)) for s in sites] == [(False, None, 0)] * 3


def test_only_scalar_clamps_become_ops(inverted_onnx):
    """The ONNX import's TE max/min against a scalar constant are recognised; other TE
    PrimFuncs (an add of two tensors) are not."""
    import onnx as onnx_
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(onnx_.load(inverted_onnx), shape_dict={"x": list(SHAPE)}, keep_params_in_input=False)
    kinds = {gv.name_hint: scalar_clamp(f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert {tvm.tirx.Max, tvm.tirx.Min} <= set(kinds.values())
    bb = relax.BlockBuilder()
    a, b = relax.Var("a", relax.TensorType((2, 3), "float32")), relax.Var("b", relax.TensorType((2, 3), "float32"))
    with bb.function("main", [a, b]):
        out = bb.emit_te(tvm.topi.add, a, b)
        bb.emit_func_output(out)
    assert all(scalar_clamp(f) is None for _, f in bb.get().functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def _run_model(path, algorithm, mixed=None):
    """(output, onnxruntime's, the graph's own ops left in main, the applied algorithms):
    ``algorithm`` on every layer, or ``mixed[i]`` on layer i. The ops are the names of the
    functions main calls besides the kernels' stages (Relax has fused and legalized them:
    "fused_add_maximum", say), and of any op not legalized."""
    model = load_model(path)
    plan = None if mixed is None else Plan([PlanLayer(s.key, s.spec.to_dict(), a) for s, a in zip(model.sites, mixed)])
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32) * 2
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    target = {"kind": "llvm"}
    plan = resolve_plan(model, plan, algorithm, target)
    lowered, applied = lower(model, plan, target)
    called = [c.args[0].name_hint if c.op.same_as(CALL_TIR) else c.op.name
              for c in _calls(lowered["main"]) if isinstance(c.op, tvm.ir.Op)]
    ops = [n for n in called if not n.startswith(tuple(f"{a}_" for a in ALGORITHMS))]
    vm = relax.VirtualMachine(tvms_compile(model, target, plan=plan), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    return y, want, ops, applied


CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _calls(func):
    out = []
    relax.analysis.post_order_visit(func.body, lambda e: out.append(e) if isinstance(e, relax.Call) else None)
    return out


def test_mixed_plan_fuses_every_activation_and_the_add(inverted_onnx):
    """One algorithm per layer (dense, a sparse CSR, CPO, im2col, MEC): every clip, the ReLU and the
    residual add go into the kernels, and the model matches onnxruntime."""
    y, want, ops, applied = _run_model(inverted_onnx, None, ["dense", "pixcsr", "cpo", "im2col", "mec"])
    assert set(applied.values()) == {"dense", "pixcsr", "cpo", "im2col", "mec"}
    assert not ops, ops
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # one model build per algorithm: the default run has the two MobileNet's plans use
@pytest.mark.parametrize("algorithm", [a if a in ("dense", "grouped") else pytest.param(a, marks=pytest.mark.extended)
                                       for a in ALGORITHMS])
def test_every_algorithm_on_the_block(inverted_onnx, algorithm):
    if not any(accepts(algorithm, s.spec) for s in load_model(inverted_onnx).sites):
        pytest.skip(f"{algorithm} computes none of the block's layers (groups 1)")
    y, want, ops, applied = _run_model(inverted_onnx, algorithm)
    assert set(applied.values()) == {algorithm}
    if algorithm == "direct":  # TVM's conv2d is left to Relax: its FuseOps takes each layer's epilogue in
        assert len(ops) == len(applied) and all(n.startswith("fused_conv2d") for n in ops), ops
    else:
        assert not ops, ops
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


class _GatedConvs(torch.nn.Module):
    """A 1x1 expand 8 -> 16, a depthwise 3x3, a 1x1 project 16 -> 8 and a last 1x1, drawn with
    the subclass's SEED: the convs the gate blocks put their activations between."""

    SEED = 0

    def __init__(self):
        super().__init__()
        self.expand = torch.nn.Conv2d(8, 16, 1)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = torch.nn.Conv2d(16, 8, 1)
        self.last = torch.nn.Conv2d(8, 8, 1)
        _draw_parameters(self, seed=self.SEED, scale=0.6)


class HardSwishBlock(_GatedConvs):
    """conv + hard-swish, depthwise conv + hard-swish (ONNX HardSwish), a 1x1 conv whose output
    gets x * hardsigmoid(x) (ONNX HardSigmoid with HardSwish's constants: the same ops), and a
    1x1 conv with the hard-swish written as x * relu6(x + 3) / 6, which is not fused."""

    SEED = 1

    def forward(self, x):
        h = torch.nn.functional.hardswish(self.expand(x))
        h = torch.nn.functional.hardswish(self.dw(h))
        y = self.project(h)
        y = y * torch.nn.functional.hardsigmoid(y)
        z = self.last(y)
        return z * torch.clamp(z + 3, 0, 6) / 6


def test_hard_swish_is_fused_into_the_kernels(tmp_path):
    """The three HardSwish forms TVM's ONNX importer writes as x * clip(x / 6 + 1/2, 0, 1) go into
    the convs before them (dense, grouped, a sparse CSR); the hand-written form stays in the
    graph. The model matches onnxruntime."""
    path = str(tmp_path / "hswish.onnx")
    torch.onnx.export(HardSwishBlock().eval(), (torch.zeros(SHAPE),), path, dynamo=False, opset_version=14,
                      input_names=["x"])
    assert [s.gate for s in load_model(path).sites] == ["hard_sigmoid", "hard_sigmoid", "hard_sigmoid", None]
    y, want, ops, applied = _run_model(path, None, ["dense", "grouped", "pixcsr", "dense"])
    assert set(applied.values()) == {"dense", "grouped", "pixcsr"}
    assert len(ops) == 1 and "divide" in ops[0], ops
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


class SiLUBlock(_GatedConvs):
    """conv + SiLU, depthwise conv + sigmoid(x) * x (the operands the other way round), a 1x1
    conv whose sigmoid also feeds the output (not a gate: it stays in the graph), and a last conv
    + SiLU."""

    SEED = 2

    def forward(self, x):
        h = torch.nn.functional.silu(self.expand(x))
        h = self.dw(h)
        h = torch.sigmoid(h) * h
        y = self.project(h)
        s = torch.sigmoid(y)
        return torch.nn.functional.silu(self.last(y * s)) + s


def test_silu_is_fused_into_the_kernels(tmp_path):
    """SiLU as ONNX exporters write it (x * Sigmoid(x), either order) goes into the convs before
    it (dense, grouped, a sparse CSR) as the "sigmoid" gate; a sigmoid that feeds more than the
    multiply stays in the graph. The model matches onnxruntime; torch.export's nn.silu is found
    alike."""
    path = str(tmp_path / "silu.onnx")
    torch.onnx.export(SiLUBlock().eval(), (torch.zeros(SHAPE),), path, dynamo=False, opset_version=14,
                      input_names=["x"])
    assert [s.gate for s in load_model(path).sites] == ["sigmoid", "sigmoid", None, "sigmoid"]
    ep = torch.export.export(SiLUBlock().eval(), (torch.zeros(SHAPE),))
    assert [s.gate for s in load_model(ep).sites] == ["sigmoid", "sigmoid", None, "sigmoid"]
    y, want, ops, applied = _run_model(path, None, ["dense", "grouped", "pixcsr", "pixcsr"])
    assert set(applied.values()) == {"dense", "grouped", "pixcsr"}
    assert sorted(ops) == ["add", "multiply", "tir_sigmoid"], ops  # the shared sigmoid, y * s and + s
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


class LeakyBlock(torch.nn.Module):
    """conv + LeakyReLU(0.1), a conv + the input + LeakyReLU(0.2) (after a residual add), and a
    conv + LeakyReLU(1.5), which is no leak below 0 (slope over 1) and stays in the graph."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 1)
        self.c = torch.nn.Conv2d(8, 8, 3, padding=1)
        _draw_parameters(self, seed=3, scale=0.5)

    def forward(self, x):
        h = torch.nn.functional.leaky_relu(self.a(x), 0.1)
        h = torch.nn.functional.leaky_relu(self.b(h) + x, 0.2)
        return torch.nn.functional.leaky_relu(self.c(h), 1.5)


def test_leaky_relu_is_fused_into_the_kernels(tmp_path):
    """ONNX's LeakyRelu (and torch.export's) after a conv, or after its residual add, goes into
    the kernels; a slope over 1 stays in the graph. The model matches onnxruntime."""
    path = str(tmp_path / "leaky.onnx")
    torch.onnx.export(LeakyBlock().eval(), (torch.zeros(SHAPE),), path, dynamo=False, opset_version=14,
                      input_names=["x"])
    exported = torch.export.export(LeakyBlock().eval(), (torch.zeros(SHAPE),))
    for sites in (load_model(path).sites, load_model(exported).sites):
        assert [(s.relu, s.slope) for s in sites] == [(True, pytest.approx(0.1)), (False, None), (False, None)]
        assert sites[1].residual_add is not None and sites[1].residual_add.slope == pytest.approx(0.2)
    y, want, ops, applied = _run_model(path, None, ["pixcsr", "dense", "dense"])
    assert set(applied.values()) == {"dense", "pixcsr"}
    assert ops == ["leaky_relu"], ops
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
