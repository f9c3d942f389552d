"""pixcsr and hybrid reading and writing channel blocks (NCHWc), against NumPy float64: every
(layout_in, layout_out) pair with the whole epilogue on partial blocks, and the encoding of a
blocked x equal to the NumPy encoder's of the NCHW one (the format does not depend on x's
layout)."""
import numpy as np
import pytest

from tvm_sparseconv.algorithms import KnobError, get_algorithm
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.cpu import cpu_of
from tvm_sparseconv.layout import NCHW, lanes_layout

from conftest import HOST, activation, isa_cases, weight
from test_nchwc import PAIR_IDS, PAIRS, check_layer
from test_output_stationary_kernels import assert_encoding_equals_reference

LAYERS = {
    # C and M not whole blocks, batch 2
    "3x3": Conv2DSpec.from_shapes((2, 20, 6, 9), (24, 20, 3, 3), padding=1),
    "1x1": Conv2DSpec.from_shapes((1, 40, 7, 9), (40, 40, 1, 1)),
    "3x3-s2-asym": Conv2DSpec.from_shapes((1, 36, 9, 10), (20, 36, 3, 3), stride=2, padding=(0, 1, 1, 0)),
}
KNOBS = {  # channel blocks of whole x blocks and not; M tiles of whole y blocks and not
    "pixcsr": [{"c_block": 16, "m_tile": 32, "rows": 2}, {"c_block": 12, "m_tile": 48, "rows": 3}],
    "hybrid": [{"c_block": 32, "m_tile": 32, "block": 2}, {"c_block": 20, "m_tile": 48, "block": 3, "dense_from": 2}],
}
CASES = [(a, i) for a in KNOBS for i in range(len(KNOBS[a]))]


@pytest.mark.parametrize("lin,lout", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("algorithm,i", CASES, ids=[f"{a}-{i}" for a, i in CASES])
def test_every_layout_pair(algorithm, i, name, lin, lout):
    spec = LAYERS[name]
    layer = check_layer(spec, {**KNOBS[algorithm][i], "layout_in": lin, "layout_out": lout}, algorithm=algorithm)
    assert (layer.layout_in, layer.layout_out) == (lin, lout)
    x = activation(spec, 0.4)
    layer(x, np.zeros(spec.y_shape, np.float32))
    assert_encoding_equals_reference(layer, x)


@pytest.mark.parametrize("isa,target,runs", [c[:3] for c in isa_cases()], ids=[c[0] for c in isa_cases()])
@pytest.mark.parametrize("algorithm", list(KNOBS))
def test_other_isas(algorithm, isa, target, runs):
    """Built for the other x86 ISAs, in blocks of their lanes (the encoders' vectors too)."""
    spec = LAYERS["3x3"]
    layout = lanes_layout(cpu_of(target))
    knobs = {**KNOBS[algorithm][0], "layout_in": layout, "layout_out": layout}
    if not runs:
        CompiledLayer(algorithm, spec, weight(spec), target=target, knobs=knobs)
        pytest.skip(f"built for {isa} without running it: this host ({HOST.name}) has no {isa}")
    check_layer(spec, knobs, target, densities=(0.5,), algorithm=algorithm)


@pytest.mark.parametrize("algorithm", list(KNOBS))
def test_layout_knobs(algorithm):
    """NCHW by default; a bad layout is refused naming the algorithm and the knob."""
    algo, spec = get_algorithm(algorithm), LAYERS["1x1"]
    assert algo.layouts(spec, algo.knobs(spec)) == (NCHW, NCHW)
    for bad in ({"layout_in": "nhwc"}, {"layout_out": "nchw3c"}):
        with pytest.raises(KnobError, match=f"{algorithm}: layout_"):
            algo.constants(spec, weight(spec), None, algo.knobs(spec, bad))
