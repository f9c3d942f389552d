"""Residual adds fused into the conv epilogue: y = act(conv(x) + bias + res), against NumPy."""
import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_sparseconv.algorithms import ALGORITHMS, get_algorithm
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.api import compile as tvms_compile
from tvm_sparseconv.conv import Conv2DSpec, ConvSpecError, UnsupportedConvError
from tvm_sparseconv.graph import find_conv_sites
from tvm_sparseconv.compile import lower, resolve_plan
from tvm_sparseconv.frontend import Model
from tvm_sparseconv.reference import dense_conv2d

from conftest import GRID, accepts, activation, assert_conv_close, grid_spec, weight

FUSING = [a for a in ALGORITHMS if get_algorithm(a).fuses_residual]


def test_every_kernel_fuses():
    assert FUSING == list(ALGORITHMS)


@pytest.mark.slow  # a grid: the fast tier has test_conformance, the default run a covering sample
@pytest.mark.cover("algorithm", "knobs", "case", "density")
@pytest.mark.parametrize("algorithm,knobs", [(a, None) for a in FUSING] +
                         [("dense", {"kernel": "window", "pad": "copy"}), ("dense", {"c_block": 8})])
@pytest.mark.parametrize("case", [GRID[0], GRID[1], GRID[2], GRID[8]], ids=("k1", "k3", "k3s2batch2", "k1s2batch2"))
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_residual_epilogue(algorithm, knobs, case, density):
    spec = grid_spec(case)
    if not accepts(algorithm, spec):
        pytest.skip(f"{algorithm} does not compute groups=1 (test_grouped.py has its residual cases)")
    x, w = activation(spec, density), weight(spec)
    bias = np.linspace(-1, 1, spec.out_channels).astype(np.float32)
    res = np.random.default_rng(7).standard_normal(spec.y_shape).astype(np.float32)
    res.flat[[3, 11]] = np.nan, np.inf  # propagate through the add and the ReLU
    for b, relu, clip in ((None, False, None), (bias, True, None), (bias, True, 0.5)):
        layer = CompiledLayer(algorithm, spec, w, b, relu, knobs=knobs, residual=True, clip=clip)
        y = layer(x, res)
        ref = dense_conv2d(spec, x, w, b, relu, residual=res, clip=clip)
        assert np.isnan(y).sum() == np.isnan(ref).sum() > 0
        assert_conv_close(y, ref, spec)


def test_a_kernel_without_it_refuses_a_residual():
    class NoResidual(type(get_algorithm("im2col"))):  # not registered: the property alone differs
        fuses_residual = False

    spec = grid_spec(GRID[1])
    with pytest.raises(UnsupportedConvError, match="cannot fuse a residual add"):
        CompiledLayer(NoResidual(), spec, weight(spec), residual=True)


def test_residual_input_is_checked():
    spec = grid_spec(GRID[1])
    x, w = activation(spec, 0.5), weight(spec)
    fused = CompiledLayer("hybrid", spec, w, residual=True)
    with pytest.raises(ConvSpecError, match="call it with"):
        fused(x)
    with pytest.raises(ConvSpecError, match="res shape"):
        fused(x, np.zeros((1, 2, 3, 4), np.float32))
    with pytest.raises(ConvSpecError, match="takes no res input"):
        CompiledLayer("hybrid", spec, w)(x, np.zeros(spec.y_shape, np.float32))


def block_module(projection: bool, seed: int = 0):
    """A ResNet block's end: relu(conv_a(x) + b_a + s), s = x (identity) or conv_s(x) + b_s."""
    rng = np.random.default_rng(seed)
    wa = rng.standard_normal((8, 8, 3, 3)).astype("float32") * 0.2
    ws = rng.standard_normal((8, 8, 1, 1)).astype("float32") * 0.2
    ba, bs = (rng.standard_normal((1, 8, 1, 1)).astype("float32") for _ in range(2))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 9, 9), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(x, relax.const(wa), padding=1)), relax.const(ba)))
            s = x
            if projection:
                s = bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(x, relax.const(ws))), relax.const(bs)))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(a, s)))))
        bb.emit_func_output(out)

    def reference(xv):
        sa = Conv2DSpec.from_shapes(xv.shape, wa.shape, padding=1)
        s = xv if not projection else dense_conv2d(Conv2DSpec.from_shapes(xv.shape, ws.shape), xv, ws, bs.reshape(-1))
        return np.maximum(dense_conv2d(sa, xv, wa, ba.reshape(-1)) + s, 0)

    return bb.get(), reference


@pytest.mark.parametrize("projection", [False, True], ids=("identity", "projection"))
@pytest.mark.parametrize("algorithm", ["hybrid", "dense", "cpo"])
def test_block_add_fused_where_the_kernel_can(projection, algorithm):
    mod, reference = block_module(projection)
    sites = find_conv_sites(mod["main"])
    assert all(s.residual_add is not None and s.residual_add.relu for s in sites)
    model = Model(mod, "x", (1, 8, 9, 9), "NCHW", "block")
    target = {"kind": "llvm"}
    lowered, applied = lower(model, resolve_plan(model, None, algorithm, target), target)
    adds = [gv.name_hint for gv in lowered.functions if "add" in gv.name_hint]
    # fusing kernels absorb the add and the ReLU (in a projection block, the first conv claims it)
    assert (adds == []) == get_algorithm(algorithm).fuses_residual
    vm = relax.VirtualMachine(tvms_compile(mod, target, algorithm=algorithm), tvm.cpu())
    xv = np.random.default_rng(1).standard_normal((1, 8, 9, 9)).astype("float32")
    y = vm["main"](tvm.runtime.tensor(xv)).numpy()
    np.testing.assert_allclose(y, reference(xv), rtol=1e-4, atol=1e-4)
