"""Shared test helpers: the layer grid, activations and the float tolerance."""
from __future__ import annotations

import os
import socket

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_sparseconv.algorithms import get_algorithm
from tvm_sparseconv.conv import Conv2DSpec, UnsupportedConvError
from tvm_sparseconv.cpu import cpu_of
from tvm_sparseconv.layer import synthesize_activation, synthesize_weight

DENSITIES = (0.0, 0.05, 0.3, 0.7, 1.0)

# (x shape, M, kernel, stride, padding, dilation): every kernel size, strides 1 and 2,
# symmetric and asymmetric padding, batch 1 and 2, dilation 2
GRID = [
    ((1, 8, 10, 10), 16, (1, 1), 1, 0, 1),
    ((1, 8, 10, 10), 16, (3, 3), 1, 1, 1),
    ((2, 6, 9, 11), 20, (3, 3), 2, (1, 0, 2, 1), 1),
    ((1, 5, 12, 12), 16, (5, 5), 1, 2, 1),
    ((1, 3, 15, 15), 16, (7, 7), 2, 3, 1),
    ((1, 8, 9, 13), 16, (1, 7), 1, (0, 3), 1),
    ((1, 8, 13, 9), 16, (7, 1), 1, (3, 0), 1),
    ((1, 8, 12, 12), 32, (3, 3), 1, 2, 2),
    ((2, 4, 8, 8), 8, (1, 1), 2, 0, 1),
]


# the two x86 ISAs the kernels are written for, as TVM targets (their LLVM cpus are the oldest
# of each kind, so the code runs on any host of that ISA)
AVX512_TARGET = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}
AVX2_TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
# no AVX: 4 lanes and no masked store, as NEON; the encoders compact lane by lane
SSE_TARGET = {"kind": "llvm", "mcpu": "x86-64-v2", "num-cores": 2}
HOST = cpu_of(None)


def isa_cases():
    """(id, target, runs here) for every x86 ISA but the host's own (which every other test
    uses): code for an ISA the host has runs; AVX-512 code on a host without it is only built."""
    if HOST.isa not in ("avx512", "avx2", "avx", "sse"):
        return []
    out = [("avx2", AVX2_TARGET, HOST.isa in ("avx512", "avx2")), ("sse", SSE_TARGET, True)]
    if HOST.isa != "avx512":
        out.append(("avx512", AVX512_TARGET, False))
    return [c for c in out if c[0] != HOST.isa]


def grid_spec(case) -> Conv2DSpec:
    xs, m, (kh, kw), stride, pad, dil = case
    return Conv2DSpec.from_shapes(xs, (m, xs[1], kh, kw), stride, pad, dil)


def grid_id(case) -> str:
    xs, m, k, s, p, d = case
    return f"x{'x'.join(map(str, xs))}-m{m}-k{k[0]}x{k[1]}-s{s}-p{p}-d{d}".replace(" ", "")


def accepts(algorithm: str, spec: Conv2DSpec) -> bool:
    """``algorithm`` computes ``spec`` (its check does not refuse it: grouped takes only groups > 1,
    most others only groups 1)."""
    try:
        get_algorithm(algorithm).check(spec)
    except UnsupportedConvError:
        return False
    return True


def activation(spec: Conv2DSpec, density: float, seed: int = 0) -> np.ndarray:
    return synthesize_activation(spec.x_shape, density, seed)


def weight(spec: Conv2DSpec, seed: int = 1) -> np.ndarray:
    return synthesize_weight(spec, seed)


def relu_like(shape, density, rng, zero_channels=0.1):
    """ReLU-like activation: smoothed noise thresholded at the (1 - density) quantile, so the
    zeros are spatially clustered; some channels all zero. Density 1: no zeros at all."""
    n, c, h, w = shape
    if density >= 1:
        return (np.abs(rng.standard_normal(shape)) + 0.1).astype(np.float32)
    z = rng.standard_normal((n, c, h + 2, w + 2))
    z = sum(z[:, :, a:a + h, b:b + w] for a in range(3) for b in range(3))
    x = np.where(z > np.quantile(z, 1 - density), z, 0).astype(np.float32) if density > 0 else np.zeros(shape, np.float32)
    x[:, rng.random(c) < zero_channels] = 0
    return x


def random_sparse(shape, density, rng):
    """Uniformly scattered non-zeros of both signs (coverage rather than realism)."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) >= density] = 0
    return x


def assert_conv_close(y: np.ndarray, ref: np.ndarray, spec: Conv2DSpec) -> None:
    """Float32 sums in another order: tolerance grows with the reduction length, scaled by the
    largest finite output (an Inf or NaN in ref must not make every finite element pass). NaN
    and +-Inf must sit where ref has them."""
    red = (spec.in_channels // spec.groups) * spec.kernel_h * spec.kernel_w
    scale = np.abs(ref[np.isfinite(ref)]).max(initial=1.0)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.sqrt(red) * scale, equal_nan=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it), for an RPC tracker or server: a fixed
    port would collide with another run on the same machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _covering(items, names) -> list:
    """The items (in collection order) that first show some value of one of ``names`` (the
    parametrize names): a sample in which every value of every axis appears at least once."""
    seen, keep = set(), []
    for item in items:
        values = {(n, repr(item.callspec.params.get(n))) for n in names}
        if not values <= seen:
            keep.append(item)
            seen |= values
    return keep


def extended_asked_for(config) -> bool:
    """The extended tests were selected by name (-m extended ...) or TVMS_EXTENDED=1."""
    return "extended" in (config.getoption("markexpr") or "") or os.environ.get("TVMS_EXTENDED") == "1"


def pytest_collection_modifyitems(config, items):
    """Tiers (README "Tests"): a test marked ``cover(*names)`` keeps in the default run only the
    items of a covering sample of its grid (_covering), the rest being ``extended``; extended tests
    are deselected unless asked for (extended_asked_for): the default run is CI's, the extended
    one adds the exhaustive grids and long campaigns."""
    by_function = {}
    for item in items:
        if item.get_closest_marker("cover") and hasattr(item, "callspec"):
            by_function.setdefault(item.function, []).append(item)
    for group in by_function.values():
        kept = set(map(id, _covering(group, group[0].get_closest_marker("cover").args)))
        for item in group:
            if id(item) not in kept:
                item.add_marker(pytest.mark.extended)
                item.add_marker(pytest.mark.slow)
    if extended_asked_for(config):
        return
    dropped = [i for i in items if i.get_closest_marker("extended")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if not i.get_closest_marker("extended")]


@pytest.fixture(params=GRID, ids=grid_id)
def grid_case(request):
    return grid_spec(request.param)


def save_onnx(path, name: str, nodes, x_shape, y_shape, init) -> str:
    """Graph ``name``: float32 x (``x_shape``) -> ``nodes`` -> y (``y_shape``), ``init`` (TensorProtos)
    as initializers; opset 13, IR version 8. Saved at ``path``; returns it as a str."""
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return str(path)


def small_onnx(path, batch=1):
    """x (batch, 4, 9, 9) -> conv 3x3 + bias -> relu -> conv 1x1 -> relu; ``batch`` a size, or a
    name for a free batch dimension (fixed when the model is imported)."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype("float32"), n)
            for n, s in (("w1", (8, 4, 3, 3)), ("b1", (8,)), ("w2", (8, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c2"], ["y"])]
    return save_onnx(path, "small", nodes, [batch, 4, 9, 9], [batch, 8, 9, 9], init)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """ResNet-50 (open_nsfw) cut after its 3rd conv's ReLU: stem 7x7/2, 1x1, 3x3 at 56x56."""
    from tvm_sparseconv.frontend import load_model, static_onnx
    from tvm_sparseconv.images import load_inputs
    from tvm_sparseconv.models import known_preprocess, model_path

    d = tmp_path_factory.mktemp("small")
    p, inp, _ = static_onnx(model_path("resnet50-nsfw"), out_dir=str(d))
    g = onnx.load(p)
    convs = [n for n in g.graph.node if n.op_type == "Conv"]
    relu = next(n for n in g.graph.node if n.op_type == "Relu" and
                any(convs[2].output[0] in m.input for m in g.graph.node if m.output[0] == n.input[0]) or
                (n.op_type == "Relu" and n.input[0] == convs[2].output[0]))
    out = str(d / "r50_first3.onnx")
    onnx.utils.extract_model(p, out, [inp], [relu.output[0]])
    m = load_model(out)
    xs = load_inputs(m, ["skimage:astronaut"], preprocess=known_preprocess("resnet50-nsfw"))
    return out, m, xs
