"""Conformance: every registered algorithm on the same named edge cases, against the float64
NumPy reference, with and without the bias + ReLU epilogue.

Before each run every buffer the layer's stages write (the intermediates and "y") is filled
with NaN (CompiledLayer.poison), so a kernel that leaves an output element unwritten (a tile
tail it skips, a batch it forgets, an empty row it does not clear) shows as a NaN where the
reference has a number, whatever the buffer held before. A new algorithm joins the registry and is tested here.
"""
import numpy as np
import pytest

from tvm_sparseconv.algorithms import ALGORITHMS, get_algorithm
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.conv import Conv2DSpec, UnsupportedConvError
from tvm_sparseconv.reference import dense_conv2d

from conftest import activation, assert_conv_close, weight

# Oh = 7, Ow = 13 and M = 19 (primes): no pixel block, row band or M tile divides them, so
# every kernel ends its rows and output channels in a partial tile; 5 input channels: no
# channel block or vector divides C either. Padded (the border taps) ...
TAIL = Conv2DSpec.from_shapes((1, 5, 7, 13), (19, 5, 3, 3), stride=1, padding=1)
# ... and unpadded with batch 2 (Oh = 5, Ow = 11): at density 1 every candidate entry of a
# compressed format is stored, the worst case the buffers are sized for.
BATCH2 = Conv2DSpec.from_shapes((2, 5, 7, 13), (19, 5, 3, 3), stride=1, padding=0)
# The same rows and columns depthwise with a channel multiplier (19 channels, 38 outputs) and in
# two groups (10 -> 38), for the algorithms that compute groups > 1.
DEPTHWISE = Conv2DSpec.from_shapes((1, 19, 7, 13), (38, 1, 3, 3), stride=1, padding=1, groups=19)
GROUPS2 = Conv2DSpec.from_shapes((2, 10, 7, 13), (38, 5, 3, 3), stride=1, padding=1, groups=2)


def _single_nonzero(spec):
    x = np.zeros(spec.x_shape, np.float32)
    x[0, 3, 4, 12] = 1.5  # in the last input column: read by the row tails' outputs only
    return x


def _nan_inf(spec):
    x = activation(spec, 0.5, seed=4)
    x[0, 1, 3, 3], x[0, 2, 0, 12], x[0, 4, 6, 0] = np.nan, np.inf, -np.inf
    x[0, 0] = 0  # a NaN alone in an all-zero channel: stored for itself
    x[0, 0, 5, 7] = np.nan
    return x


# name -> (layer, input); each input from its own seed, whatever ran before
CASES = {
    "tile-tail": (TAIL, lambda s: activation(s, 0.5, seed=1)),
    "all-zero": (TAIL, lambda s: np.zeros(s.x_shape, np.float32)),
    "single-nonzero": (TAIL, _single_nonzero),
    "nan-inf": (TAIL, _nan_inf),
    "density-1": (BATCH2, lambda s: activation(s, 1.0, seed=2)),
    "batch-2": (BATCH2, lambda s: activation(s, 0.4, seed=3)),
    "depthwise": (DEPTHWISE, _nan_inf),
    "groups-2": (GROUPS2, lambda s: activation(s, 0.6, seed=5)),
}
EPILOGUES = {"plain": False, "bias-relu": True}


@pytest.fixture(scope="module")
def layers():
    """Compiled layers by (algorithm, spec, epilogue): the cases on one spec share them."""
    return {}


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_conformance(algorithm, case, epilogue, layers):
    spec, make_input = CASES[case]
    try:
        get_algorithm(algorithm).check(spec)
    except UnsupportedConvError as e:
        pytest.skip(str(e))
    w = weight(spec)
    bias = np.linspace(-1, 1, spec.out_channels).astype(np.float32) if EPILOGUES[epilogue] else None
    key = (algorithm, spec, epilogue)
    if key not in layers:
        layers[key] = CompiledLayer(algorithm, spec, w, bias=bias, relu=EPILOGUES[epilogue])
    layer = layers[key]
    x = make_input(spec)
    ref = dense_conv2d(spec, x, w, bias, relu=EPILOGUES[epilogue])  # accumulated in float64

    layer.poison()
    assert np.isnan(layer.buffers["y"].numpy()).all()
    layer.set_input(x)
    layer.run()
    y = layer.buffers["y"].numpy()

    unwritten = np.isnan(y) & ~np.isnan(ref)
    assert not unwritten.any(), \
        f"{int(unwritten.sum())} of {y.size} output elements never written, the first at {tuple(np.argwhere(unwritten)[0])}"
    assert_conv_close(y, ref, spec)


def test_the_cases_are_what_their_names_say():
    """The inputs and layers hold the property each case is named for."""
    x = {name: make(spec) for name, (spec, make) in CASES.items()}
    assert (TAIL.out_h, TAIL.out_w, TAIL.out_channels, BATCH2.out_h, BATCH2.out_w) == (7, 13, 19, 5, 11)  # primes
    assert not x["all-zero"].any() and np.count_nonzero(x["single-nonzero"]) == 1
    assert (x["density-1"] != 0).all() and BATCH2.padding == (0, 0, 0, 0)
    assert np.isnan(x["nan-inf"]).sum() == 2 and np.isposinf(x["nan-inf"]).sum() == np.isneginf(x["nan-inf"]).sum() == 1
    assert BATCH2.batch == 2 and not np.array_equal(x["batch-2"][0], x["batch-2"][1])
    assert 0 < np.count_nonzero(x["tile-tail"]) < x["tile-tail"].size
    assert DEPTHWISE.groups == DEPTHWISE.in_channels < DEPTHWISE.out_channels and 1 < GROUPS2.groups < GROUPS2.in_channels
