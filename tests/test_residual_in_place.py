"""ResidualInPlace: a layer writes its output over its residual only when nothing reads the
residual after it, and the result is the same as with a fresh output (against NumPy)."""
import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_sparseconv.algorithms import ALGORITHMS, get_algorithm
from tvm_sparseconv.compile import build, lower, resolve_plan
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.frontend import Model
from tvm_sparseconv.measure import time_calls
from tvm_sparseconv.reference import dense_conv2d

C, HW = 8, 9
X_SHAPE = (1, C, HW, HW)
TARGET = {"kind": "llvm"}


def _weights(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((C, C, 3, 3)).astype("float32") * 0.2,
             rng.standard_normal((1, C, 1, 1)).astype("float32")) for _ in range(n)]


def _conv(bb, v, wb, res=None):
    """relu(conv3x3(v) + b [+ res]) as Relax emits it from ONNX."""
    y = bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(v, relax.const(wb[0]), padding=1)), relax.const(wb[1])))
    if res is not None:
        y = bb.emit(relax.op.add(y, res))
    return bb.emit(relax.op.nn.relu(y))


def _ref(v, wb, res=None):
    spec = Conv2DSpec.from_shapes(v.shape, wb[0].shape, padding=1)
    y = dense_conv2d(spec, v.astype(np.float64), wb[0].astype(np.float64), wb[1].reshape(-1).astype(np.float64))
    return np.maximum(y + (0 if res is None else res), 0)


def block_module(case: str):
    """main(x) with one block whose last conv adds the block's input s:
    s = conv0(x); t = conv1(s); out = conv2(t) + s, where
    - "fresh": s is written by a conv and read by conv1 before the add: it may be overwritten;
    - "read_after": out * s is returned, so s is read after the add;
    - "param": s is x, the caller's tensor;
    - "view": s is a reshape of conv0's output u (a view of it), and u is read after the add.
    Returns (module, NumPy reference of main, whether the add's layer may write over s)."""
    ws = _weights(3)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(X_SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            u = x if case == "param" else _conv(bb, x, ws[0])
            s = bb.emit(relax.op.reshape(bb.emit(relax.op.reshape(u, (1, -1))), X_SHAPE)) if case == "view" else u
            out = _conv(bb, _conv(bb, s, ws[1]), ws[2], s)
            if case == "read_after":
                out = bb.emit(relax.op.multiply(out, s))
            if case == "view":
                out = bb.emit(relax.op.add(out, u))
            out = bb.emit_output(out)
        bb.emit_func_output(out)

    def reference(xv):
        u = xv if case == "param" else _ref(xv, ws[0])
        out = _ref(_ref(u, ws[1]), ws[2], u)
        return out * u if case == "read_after" else out + u if case == "view" else out

    return bb.get(), reference, case == "fresh"


def _run(mod, algorithm: str):
    model = Model(mod, "x", X_SHAPE, "NCHW", "block")
    plan = resolve_plan(model, None, algorithm, TARGET)
    lowered, _ = lower(model, plan, TARGET)
    b = build(model, plan, TARGET)
    xv = np.random.default_rng(3).standard_normal(X_SHAPE).astype("float32")
    xv[0, 0, 0, :2] = np.nan, np.inf  # through the convs into the residual
    y = b.vm()["main"](tvm.runtime.tensor(xv)).numpy()
    return lowered["main"].script().count("R.call_tir_inplace"), y, xv, b


# "direct" in a plan leaves the layer to TVM's conv2d, which FuseOps fuses with the add its own way
FUSING = [a for a in ALGORITHMS if get_algorithm(a).fuses_residual and a != "direct"]


@pytest.mark.parametrize("algorithm", FUSING)
def test_every_fusing_kernel_writes_over_a_residual_nothing_reads_after(algorithm):
    mod, reference, _ = block_module("fresh")
    n, y, xv, _ = _run(mod, algorithm)
    assert n == 1
    ref = reference(xv.astype(np.float64))
    assert np.array_equal(np.isnan(y), np.isnan(ref)) and np.isnan(y).any()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["read_after", "param", "view"])
def test_a_residual_read_later_or_not_its_own_stays(case):
    mod, reference, _ = block_module(case)
    n, y, xv, _ = _run(mod, "dense")
    assert n == 0
    np.testing.assert_allclose(y, reference(xv.astype(np.float64)), rtol=1e-4, atol=1e-4)


def test_a_kernel_shared_by_a_layer_in_place_and_one_not_names_each_call():
    """Two blocks of the same shapes: the first adds the input x (not in place), the second the
    first's output (in place). Their kernels are one function before the pass; afterwards each
    call's function lists its own layer, so per-call times still map to layers."""
    ws = _weights(4, seed=5)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(X_SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            o1 = _conv(bb, _conv(bb, x, ws[0]), ws[1], x)
            o2 = bb.emit_output(_conv(bb, _conv(bb, o1, ws[2]), ws[3], o1))
        bb.emit_func_output(o2)
    n, y, xv, b = _run(bb.get(), "dense")
    assert n == 1
    o1 = _ref(_ref(xv, ws[0]), ws[1], xv)
    np.testing.assert_allclose(y, _ref(_ref(o1, ws[2]), ws[3], o1), rtol=1e-4, atol=1e-4)
    table = b.kernels  # {function: (layer keys in call order, algorithm)}
    assert sorted(k for layers, _ in table.values() for k in layers) == ["conv000", "conv001", "conv002", "conv003"]
    (inplace,) = [layers for name, (layers, _) in table.items() if name.endswith("_inplace")]
    assert inplace == ("conv003",)
    called = [name for name, _ in time_calls(b.vm(), tvm.runtime.tensor(xv), 1) if name in table]
    keys, count = [], {}  # the j-th call of a function computes the j-th layer it lists
    for c in called:
        keys.append(table[c][0][count.get(c, 0)])
        count[c] = count.get(c, 0) + 1
    assert keys == ["conv000", "conv001", "conv002", "conv003"]
