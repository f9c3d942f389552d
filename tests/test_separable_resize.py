"""passes/separable_resize: bilinear resize legalized as a row pass and an output pass over
index tables, against NumPy float64 (ONNX's definition of each coordinate mode), with NaN and
Inf, and the resizes it does not take left to TVM's legalization."""
import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_sparseconv.passes.separable_resize import MODES, legalize_map
from tvm_sparseconv.target import make_target

KERNEL = "resize2d_bilinear"


def _build(shape, size, legalization=None, **attrs):
    """(the legalized module, its VM) of x (``shape``) -> resize2d to ``size``."""
    bb = relax.BlockBuilder()
    v = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [v]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.image.resize2d(v, size, **attrs))
        bb.emit_func_output(y)
    target = make_target(None)
    mod = relax.transform.LegalizeOps(legalize_map() if legalization is None else legalization)(bb.get())
    return mod, relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())


def _run(vm, x: np.ndarray) -> np.ndarray:
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _names(mod) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _coordinate(o: np.ndarray, in_size: int, out_size: int, mode: str) -> np.ndarray:
    """ONNX Resize's source coordinate of output indices ``o`` (float64)."""
    if mode == "align_corners":
        return o * (in_size - 1) / (out_size - 1) if out_size > 1 else np.zeros_like(o)
    if mode == "pytorch_half_pixel" and out_size == 1:
        return np.zeros_like(o)
    scale = in_size / out_size
    return o * scale if mode == "asymmetric" else (o + 0.5) * scale - 0.5


def _bilinear(x: np.ndarray, size, mode: str) -> np.ndarray:
    """x (N, C, H, W) resized to ``size`` bilinearly, in float64: each row interpolated between
    its two source columns, then each output between its two source rows (index clamped to the
    edge)."""
    x = x.astype(np.float64)

    def taps(out_size, in_size):
        c = _coordinate(np.arange(out_size, dtype=np.float64), in_size, out_size, mode)
        lo = np.floor(c).astype(int)
        return np.clip(lo, 0, in_size - 1), np.clip(lo + 1, 0, in_size - 1), c - lo

    (y0, y1, wy), (x0, x1, wx) = taps(size[0], x.shape[2]), taps(size[1], x.shape[3])
    with np.errstate(invalid="ignore"):  # Inf * 0 is NaN, as it is meant to be
        rows = x[..., x0] * (1 - wx) + x[..., x1] * wx
        return rows[:, :, y0] * (1 - wy)[:, None] + rows[:, :, y1] * wy[:, None]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,size", [((1, 3, 7, 9), (28, 36)), ((2, 2, 5, 7), (11, 13)), ((1, 2, 12, 10), (7, 6)),
                                        ((1, 1, 2, 2), (1, 1)), ((1, 2, 1, 1), (3, 4)), ((1, 4, 6, 6), (6, 6))])
def test_bilinear_resize_matches_numpy(mode, shape, size):
    """Up by 4, up by odd ratios, down (under 2x), to and from one pixel, the same size, batch 2."""
    mod, vm = _build(shape, size, coordinate_transformation_mode=mode)
    assert KERNEL in _names(mod)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = _run(vm, x)
    assert out.shape == shape[:2] + size
    np.testing.assert_allclose(out, _bilinear(x, size, mode), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_nan_and_inf_propagate_as_in_the_reference(mode):
    """NaN, +Inf and -Inf among the inputs of a 2x upsample: each output is NaN, infinite or the
    number exactly where the float64 reference is (an Inf taken with a zero weight is NaN, as in
    TVM's and onnxruntime's sums)."""
    shape, size = (1, 2, 6, 8), (12, 16)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    x[0, 0, 2, 3], x[0, 1, 0, 0], x[0, 1, 5, 7], x[0, 0, 4, 1] = np.nan, np.inf, -np.inf, np.inf
    mod, vm = _build(shape, size, coordinate_transformation_mode=mode)
    out, ref = _run(vm, x), _bilinear(x, size, mode)
    assert np.isnan(ref).any() and np.isinf(ref).any()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(out[finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_the_result_is_tvms_own_where_tvm_is_defined():
    """The DeepLab-like head's upsample (21 x 56 x 56 -> 224 x 224): the same values as TVM's
    legalization, up to contraction into fused multiply-adds."""
    shape, size = (1, 21, 56, 56), (224, 224)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    mod, vm = _build(shape, size)
    theirs_mod, theirs = _build(shape, size, legalization={})
    assert KERNEL in _names(mod) and KERNEL not in _names(theirs_mod)
    np.testing.assert_allclose(_run(vm, x), _run(theirs, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,size,attrs", [
    ((1, 2, 6, 6), (12, 12), {"method": "nearest_neighbor", "rounding_method": "floor"}),
    ((1, 2, 6, 6), (12, 12), {"method": "cubic"}),
    ((1, 6, 6, 2), (12, 12), {"layout": "NHWC"}),
    ((1, 2, 20, 20), (6, 6), {}),  # more than 2x down: most row passes would go unread
    ((1, 2, 6, 6), (12, 12), {"coordinate_transformation_mode": "tf_half_pixel_for_nn", "method": "nearest_neighbor"}),
])
def test_other_resizes_keep_tvms_legalization(shape, size, attrs):
    """A resize the two passes do not take is legalized by TVM exactly as without them."""
    mod, vm = _build(shape, size, **attrs)
    theirs_mod, theirs = _build(shape, size, legalization={}, **attrs)
    assert KERNEL not in _names(mod)
    tvm.ir.assert_structural_equal(mod, theirs_mod)
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(_run(vm, x), _run(theirs, x))
