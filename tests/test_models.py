"""Whole models: real VGG-16 and half-width ResNet-50 on real images, against onnxruntime."""
import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

from tvm_sparseconv.algorithms import ALGORITHMS, get_algorithm
from tvm_sparseconv.compile import compile as tvms_compile, lower
from tvm_sparseconv.conv import UnsupportedConvError
from tvm_sparseconv.frontend import ModelError, load_model
from tvm_sparseconv.graph import find_conv_sites
from tvm_sparseconv.images import ImageError, load_inputs
from tvm_sparseconv.models import known_preprocess, model_path
from tvm_sparseconv.plan import Plan, PlanError
from tvm_sparseconv.profile import profile

pytestmark = pytest.mark.slow

MODELS = ("vgg16-tumor", "resnet50-nsfw")
IMAGES = ("skimage:astronaut", "sklearn:china")


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    m = load_model(model_path(request.param))
    xs = load_inputs(m, IMAGES, preprocess=known_preprocess(request.param))
    sess = ort.InferenceSession(m.onnx_path, providers=["CPUExecutionProvider"])
    refs = [sess.run(None, {m.input_name: x})[0] for x in xs]
    return request.param, m, xs, refs


def run(ex, x):
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def assert_matches_onnxruntime(y, ref):
    # softmax outputs: the same classes and scores to 1e-4 (float32 convs summed in other orders)
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-4)
    assert np.argmax(y) == np.argmax(ref)


def ort_conv_input_densities(m, x):
    """Exact non-zero shares of every Conv input, measured by onnxruntime (independent of TVM)."""
    g = onnx.load(m.onnx_path)
    names = [n.input[0] for n in g.graph.node if n.op_type == "Conv"]
    have = {o.name for o in g.graph.output}
    for nm in dict.fromkeys(names):
        if nm not in have:
            g.graph.output.append(onnx.helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {m.input_name: x})))
    return [np.count_nonzero(outs[nm]) / outs[nm].size for nm in names]


def test_profile_densities_equal_onnxruntime_zero_counts(model):
    name, m, xs, _ = model
    layers, acts, _ = profile(m, xs[:1])
    ref = ort_conv_input_densities(m, xs[0])
    assert len(layers) == len(ref)
    for l, a, d in zip(layers, acts, ref):
        n = a[0].size
        # float32 sums in another order may flip a pre-activation within ~1e-7 of zero: allow 1e-4
        assert abs(l.density_mean - d) * n <= max(2, 1e-4 * n), (l.key, l.density_mean, d)
    assert 0.05 < min(l.density_mean for l in layers[1:]) and max(l.density_mean for l in layers[1:]) < 0.95


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_on_every_eligible_layer(model, algorithm):
    name, m, xs, refs = model
    ex = tvms_compile(m, algorithm=algorithm)
    assert_matches_onnxruntime(run(ex, xs[0]), refs[0])


def mixed_plan(m):
    """Every registered algorithm in turn over the layers (a new one is covered without a
    change here). A layer an algorithm cannot compute (its check raises UnsupportedConvError,
    e.g. groups) gets the next one that can: given it, the rewrite would fall back to direct
    and the plan would claim a kernel that never ran."""
    sites = find_conv_sites(m.mod["main"])
    plan = Plan.uniform(sites, "direct")
    turn = itertools.cycle(ALGORITHMS)
    for l, s in zip(plan.layers, sites):
        for _ in ALGORITHMS:
            a = next(turn)
            try:
                get_algorithm(a).check(s.spec)
                l.algorithm = a
                break
            except UnsupportedConvError:
                pass
    return plan


def test_mixed_plan_exported_library_runs_in_a_fresh_process(model, tmp_path):
    name, m, xs, refs = model
    plan = mixed_plan(m)
    assert {l.algorithm for l in plan.layers} == set(ALGORITHMS)  # each at least once
    plan.save(str(tmp_path / "plan.json"))
    ex = tvms_compile(m, plan=str(tmp_path / "plan.json"))
    y = run(ex, xs[1])
    assert_matches_onnxruntime(y, refs[1])
    lib = tmp_path / "model.so"
    ex.export_library(str(lib))
    np.save(tmp_path / "x.npy", xs[1])
    code = textwrap.dedent(f"""
        import numpy as np, tvm, sys
        from tvm import relax
        assert not any(k.startswith("tvm_sparseconv") for k in sys.modules)
        vm = relax.VirtualMachine(tvm.runtime.load_module({str(lib)!r}), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(np.load({str(tmp_path / 'x.npy')!r})))
        np.save({str(tmp_path / 'y.npy')!r}, (out if hasattr(out, "numpy") else out[0]).numpy())
        assert "tvm_sparseconv" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path))
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), y)


def test_plan_for_another_model_is_refused(tmp_path):
    vgg = load_model(model_path("vgg16-tumor"))
    r50 = load_model(model_path("resnet50-nsfw"))
    plan = Plan.uniform(find_conv_sites(vgg.mod["main"]), "halo")
    with pytest.raises(PlanError, match="conv000"):
        tvms_compile(r50, plan=plan)


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "nope.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelError, match="bad.onnx"):
        load_model(str(bad))


def test_wrong_input_shape_and_bad_images(tmp_path):
    with pytest.raises(ModelError, match="cannot use shape"):
        load_model(model_path("resnet50-nsfw"), input_shape=(1, 3, 224, 224))
    m = load_model(model_path("resnet50-nsfw"))
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(ImageError, match="the model takes"):
        load_inputs(m, inputs=[str(tmp_path / "x.npy")])
    (tmp_path / "img.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="not a readable image"):
        load_inputs(m, images=[str(tmp_path / "img.png")])
    with pytest.raises(ImageError, match="not found"):
        load_inputs(m, images=[str(tmp_path / "missing.jpg")])
