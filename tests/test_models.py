"""Whole models: real VGG-16, half-width ResNet-50 and MobileNet-V2 on real images, against onnxruntime."""
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

from tvm_sparseconv.algorithms import ALGORITHMS, get_algorithm
from tvm_sparseconv.api import compile as tvms_compile
from tvm_sparseconv.compile import build, lower
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.layout import lanes_layout
from tvm_sparseconv.frontend import ModelError, load_model
from tvm_sparseconv.graph import find_conv_sites
from tvm_sparseconv.images import SAMPLE_IMAGES, ImageError, load_inputs
from tvm_sparseconv.models import known_labels, known_preprocess, model_path
from tvm_sparseconv.passes import LayoutGraph
from tvm_sparseconv.plan import Plan, PlanError
from tvm_sparseconv.profile import profile
from tvm_sparseconv.shipped import SHIPPED

from conftest import HOST, accepts

pytestmark = pytest.mark.slow

MODELS = ("vgg16-tumor", "resnet50-nsfw", "mobilenet-v2")
# per model, two photos: the first for the one-algorithm builds, the second for the mixed plan
IMAGES = {"vgg16-tumor": ("skimage:astronaut", "sklearn:china"),
          "resnet50-nsfw": ("skimage:astronaut", "sklearn:china"),
          "mobilenet-v2": ("skimage:chelsea", "skimage:coffee")}
# MobileNet-V2's top-1 ImageNet classes that a person would accept for a sample photo. The other
# photos get classes no one would call right (astronaut: bobsled, rocket: obelisk, flower:
# honeycomb): they are left out.
SENSIBLE = {"skimage:chelsea": ("tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"),
            "skimage:coffee": ("espresso", "cup", "coffee mug"),
            "skimage:camera": ("tripod", "reflex camera", "Polaroid camera"),
            "sklearn:china": ("monastery", "palace", "castle", "stupa", "bell cote", "church", "mosque")}


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    m = load_model(model_path(request.param))
    xs = load_inputs(m, IMAGES[request.param], preprocess=known_preprocess(request.param))
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
    np.testing.assert_array_equal(np.argmax(y, axis=-1), np.argmax(ref, axis=-1))


def conv_inputs_after_relu(m) -> list[bool]:
    """Per Conv of the static ONNX graph: is its input a ReLU's (Relu, or Clip from 0: ReLU6)
    output, through ops that keep zeros (max pooling, transposes, reshapes)? The other inputs
    are the image, a linear conv's output or a residual sum: dense."""
    g = onnx.load(m.onnx_path).graph
    producer = {o: n for n in g.node for o in n.output}
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    consts.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in g.node
                   if n.op_type == "Constant" and n.attribute[0].name == "value"})

    def after_relu(name):
        n = producer.get(name)
        while n is not None and n.op_type in ("MaxPool", "Transpose", "Reshape", "Identity"):
            n = producer.get(n.input[0])
        if n is not None and n.op_type == "Clip":
            low = consts.get(n.input[1]) if len(n.input) > 1 and n.input[1] else None
            return low is not None and float(low) == 0.0
        return n is not None and n.op_type == "Relu"

    return [after_relu(n.input[0]) for n in g.node if n.op_type == "Conv"]


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


def test_input_relu_matches_the_onnx_graph(model):
    """graph.ConvSite.input_relu (the default densities of predicted plans) against the ONNX graph."""
    _, m, _, _ = model
    assert [s.input_relu for s in m.sites] == conv_inputs_after_relu(m)


def test_profile_densities_equal_onnxruntime_zero_counts(model):
    name, m, xs, _ = model
    layers, acts, _ = profile(m, xs[:1])
    ref = ort_conv_input_densities(m, xs[0])
    assert len(layers) == len(ref)
    for l, a, d in zip(layers, acts, ref):
        n = a[0].size
        # float32 sums in another order may flip a pre-activation within ~1e-7 of zero: allow 1e-4
        assert abs(l.density_mean - d) * n <= max(2, 1e-4 * n), (l.key, l.density_mean, d)
    # past the image: a ReLU output is sparse (and not empty), a linear one dense
    relu = conv_inputs_after_relu(m)
    assert len(relu) == len(layers) and any(relu)
    for l, r in zip(layers[1:], relu[1:]):
        assert 0.05 < l.density_mean < 0.95 if r else l.density_mean > 0.95, (l.key, r, l.density_mean)


@pytest.mark.cover("model", "algorithm")  # the default run: every algorithm on one model, each model once
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_on_every_eligible_layer(model, algorithm):
    name, m, xs, refs = model
    if not eligible(m) & {algorithm}:
        pytest.skip(f"{algorithm} computes no layer of {name}")
    ex = tvms_compile(m, algorithm=algorithm)
    assert_matches_onnxruntime(run(ex, xs[0]), refs[0])


def eligible(m) -> set[str]:
    """The algorithms that compute at least one conv layer of ``m`` (grouped: only where it has
    grouped or depthwise layers)."""
    return {a for a in ALGORITHMS if any(accepts(a, s.spec) for s in m.sites)}


def mixed_plan(m):
    """Every registered algorithm in turn over the layers (a new one is covered without a
    change here). A layer an algorithm cannot compute (its check raises UnsupportedConvError,
    e.g. groups) gets the first in turn that can, and only that one goes to the back of the
    turn: given the others, the rewrite would fall back to direct and the plan would claim a
    kernel that never ran; skipping them for good would leave MobileNet-V2, whose every third
    layer is depthwise (direct or grouped only), with a few algorithms."""
    sites = find_conv_sites(m.mod["main"])
    plan = Plan.uniform(sites, "direct")
    turn = list(ALGORITHMS)
    for l, s in zip(plan.layers, sites):
        for a in turn:
            if not accepts(a, s.spec):
                continue
            l.algorithm = a
            turn.remove(a)
            turn.append(a)
            break
    return plan


def test_mixed_plan_exported_library_runs_in_a_fresh_process(model, tmp_path):
    name, m, xs, refs = model
    plan = mixed_plan(m)
    assert {l.algorithm for l in plan.layers} == eligible(m)  # each at least once
    plan.save(str(tmp_path / "plan.json"))
    ex = tvms_compile(m, plan=str(tmp_path / "plan.json"))
    y = run(ex, xs[1])
    assert_matches_onnxruntime(y, refs[1])
    np.testing.assert_array_equal(run_exported_in_a_fresh_process(ex, xs[1], tmp_path), y)


def test_shipped_plans_fit_and_this_cpus_matches_onnxruntime(model):
    """Every plan shipped for the model (for any CPU) fits its layers; the one shipped for this
    machine's target key, which compile and bench take with no --plan, compiles here and gives
    onnxruntime's output on a real photo (the CPUs without one check the fit only)."""
    from tvm_sparseconv.shipped import shipped_plan

    name, m, xs, refs = model
    paths = sorted(SHIPPED.glob(f"*/{name}/plan.json"))
    assert paths
    for path in paths:
        Plan.load(str(path)).choices(m.sites)
    found = shipped_plan(name, None)
    if found is not None:
        assert_matches_onnxruntime(run(tvms_compile(m, plan=found[0]), xs[1]), refs[1])


def run_exported_in_a_fresh_process(ex, x, tmp_path) -> np.ndarray:
    """The output of ``ex`` exported and run on ``x`` by a fresh Python that imports only tvm."""
    lib = tmp_path / "model.so"
    ex.export_library(str(lib))
    np.save(tmp_path / "x.npy", x)
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
    return np.load(tmp_path / "y.npy")


def blocked_plan(m, name: str) -> Plan:
    """Every dense layer reading and writing channel blocks of this machine's lanes: ResNet-50's
    plan shipped for the Zen 5 (dense layers between hybrid ones, which read and write NCHW),
    MobileNet-V2 all dense (its depthwise layers on TVM's conv2d, NCHW). A layer's tile that
    the kernel does not take from blocks (gemm's vectors of pixels) gives way to the defaults."""
    from tvm_sparseconv.tune.layouts import pair_candidates

    if name == "resnet50-nsfw":
        plan = Plan.load(str(SHIPPED / "llvm-znver5-2c" / name / "plan.json"))
    else:
        plan = Plan.uniform(m.sites, "dense")
    blocked = lanes_layout(HOST)
    for l in plan.layers:
        if l.algorithm == "dense":
            spec = Conv2DSpec.from_dict(l.spec)
            l.knobs = pair_candidates(spec, get_algorithm("dense").knobs(spec, l.knobs), HOST)[(blocked, blocked)][0]
    return plan


@pytest.mark.parametrize("name", ["resnet50-nsfw", "mobilenet-v2"])
def test_blocked_layers_against_onnxruntime_and_in_a_fresh_process(name, tmp_path):
    """Dense layers in channel blocks, on chains of them (transforms only at the model's edges,
    around the layers in NCHW and before the ops that need it): the outputs on a real photo are
    onnxruntime's, and the exported library gives the same in a process that imports only tvm."""
    m = load_model(model_path(name))
    x = load_inputs(m, IMAGES[name][:1], preprocess=known_preprocess(name))[0]
    ref = ort.InferenceSession(m.onnx_path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: x})[0]
    plan = blocked_plan(m, name)
    nchw = sum(l.algorithm != "dense" for l in plan.layers)
    b = build(m, plan, None)
    assert sum(a != "dense" for a in b.applied.values()) == nchw
    # the transforms LayoutGraph counts (what the tuner weighs), only at the model's edges and
    # around the layers in NCHW: none between two dense layers
    graph = LayoutGraph(m.mod["main"], plan.choices(m.sites), m.sites)
    assert sorted(t for _, _, t in b.transforms) == sorted(f"{a}->{c}" for _, a, c in graph.transforms(plan.layouts()))
    assert 2 <= len(b.transforms) <= 2 + 2 * nchw, b.transforms
    y = run(b.module, x)
    assert_matches_onnxruntime(y, ref)
    np.testing.assert_array_equal(run_exported_in_a_fresh_process(b.module, x, tmp_path), y)


def test_mobilenet_batch8_top1_onnxruntime_and_mixed_plan():
    """MobileNet-V2 at batch 8 (every sample photo, and the cat mirrored): its top-1 class is a
    sensible one (SENSIBLE) in onnxruntime, and the mixed plan's build gives the same outputs."""
    name = "mobilenet-v2"
    labels = known_labels(name)
    assert all(c in labels for names in SENSIBLE.values() for c in names)  # no typo in SENSIBLE
    one = load_inputs(load_model(model_path(name)), SAMPLE_IMAGES, preprocess=known_preprocess(name))
    photos = [*SAMPLE_IMAGES, "skimage:chelsea"]
    x = np.ascontiguousarray(np.concatenate([*one, one[SAMPLE_IMAGES.index("skimage:chelsea")][..., ::-1]]))
    assert x.shape == (8, 3, 224, 224)
    m = load_model(model_path(name), input_shape=x.shape)
    ref = ort.InferenceSession(m.onnx_path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: x})[0]
    top = [labels[i] for i in np.argmax(ref, axis=1)]
    for photo, t in zip(photos, top):
        if photo in SENSIBLE:
            assert t in SENSIBLE[photo], (photo, t)
    plan = mixed_plan(m)
    assert {l.algorithm for l in plan.layers} == eligible(m) == set(ALGORITHMS)
    assert_matches_onnxruntime(run(tvms_compile(m, plan=plan), x), ref)


@pytest.mark.extended  # about 5 minutes: 17 grouped kernels of each kind (the mixed plan has grouped too)
def test_mobilenet_depthwise_layers_on_grouped_the_rest_on_dense():
    """MobileNet-V2 as a user would build it without tuning: dense on its 1x1 and stem layers,
    grouped (both kernels, in turn) on its 17 depthwise 3x3 layers, each with its ReLU6 fused;
    on a real photo it matches onnxruntime."""
    name = "mobilenet-v2"
    m = load_model(model_path(name))
    x = load_inputs(m, IMAGES[name][:1], preprocess=known_preprocess(name))[0]
    ref = ort.InferenceSession(m.onnx_path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: x})[0]
    plan = Plan.uniform(m.sites, "dense")
    depthwise = [l for l, s in zip(plan.layers, m.sites) if s.spec.groups > 1]
    assert len(depthwise) == 17 and all(s.spec.groups == s.spec.in_channels for s in m.sites if s.spec.groups > 1)
    for i, l in enumerate(depthwise):
        l.algorithm, l.knobs = "grouped", {"vector": ("channels", "width")[i % 2]}
    lowered, applied = lower(m, plan, None)
    assert [applied[s.key] for s in m.sites] == ["grouped" if s.spec.groups > 1 else "dense" for s in m.sites]
    assert_matches_onnxruntime(run(tvms_compile(m, plan=plan), x), ref)


def test_plan_for_another_model_is_refused(tmp_path):
    vgg = load_model(model_path("vgg16-tumor"))
    r50 = load_model(model_path("resnet50-nsfw"))
    plan = Plan.uniform(find_conv_sites(vgg.mod["main"]), "halo")
    with pytest.raises(PlanError, match="conv000"):
        tvms_compile(r50, plan=plan)


def test_an_onnx_model_in_memory_loads_as_its_file(tmp_path, monkeypatch):
    """An onnx.ModelProto (what TVM's own from_onnx takes) loads as the file it came from, written
    once into the cache under the digest of its bytes, and matches onnxruntime."""
    from conftest import small_onnx

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = small_onnx(tmp_path / "small.onnx", batch="n")
    m = load_model(onnx.load(path))
    assert m.source.startswith(str(tmp_path / "xdg")) and m.input_shape == load_model(path).input_shape == (1, 4, 9, 9)
    assert load_model(onnx.load(path)).source == m.source
    assert len(os.listdir(tmp_path / "xdg" / "tvm_sparseconv" / "onnx-proto")) == 1
    x = np.random.default_rng(2).standard_normal(m.input_shape).astype(np.float32)
    got = run(tvms_compile(m, algorithm="hybrid"), x)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "nope.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelError, match="bad.onnx"):
        load_model(str(bad))


def test_static_onnx_is_cached_per_file_and_shape(tmp_path, monkeypatch):
    """A model loaded again reuses its static form; a changed file or shape gets a new one,
    and nothing is left in the temporary directory."""
    import shutil

    from tvm_sparseconv.frontend import static_onnx

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    src = tmp_path / "m.onnx"
    shutil.copy(model_path("resnet50-nsfw"), src)
    first, _, shape = static_onnx(str(src))
    assert first.startswith(str(tmp_path / "xdg")) and shape[0] == 1
    mtime = os.stat(first).st_mtime_ns
    assert static_onnx(str(src))[0] == first and os.stat(first).st_mtime_ns == mtime
    assert static_onnx(str(src), (2, *shape[1:]))[0] != first
    os.utime(src, ns=(mtime + 10**9, mtime + 10**9))
    assert static_onnx(str(src))[0] != first
    assert os.listdir(tmp_path / "tmp") == []
    assert all(f.endswith(".static.onnx") for f in os.listdir(tmp_path / "xdg" / "tvm_sparseconv" / "static-onnx"))


def test_static_onnx_unwritable_cache_is_a_model_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(ModelError, match="cannot write the static form.*XDG_CACHE_HOME"):
        load_model(model_path("resnet50-nsfw"))


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


def test_free_image_dims_need_the_input_shape(tmp_path):
    """A free batch is 1; a free height or width has no default (at 1 the model would compile
    for 1 x 1 images): a ModelError until the shape is given, then the model matches
    onnxruntime at it."""
    from onnx import helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("Relu", ["c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    path = str(tmp_path / "free.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    with pytest.raises(ModelError, match=r"declared \('\?', 3, '\?', '\?'\).*give the input shape"):
        load_model(path)
    x = np.random.default_rng(1).standard_normal((1, 3, 7, 5)).astype(np.float32)
    m = load_model(path, input_shape=x.shape)
    got = relax.VirtualMachine(tvms_compile(m, algorithm="hybrid"), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_the_python_api_example_runs_as_a_script(tmp_path):
    """examples/python_api.py (the README's Python API, on ResNet-50-half) run as a user runs it:
    profile and compile build in worker processes that import the script again, so it needs its
    __main__ guard; its library classifies the photo as onnxruntime does."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "python_api.py")
    out = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    probs = [float(v) for v in re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?", out.stdout.split("sfw/nsfw:", 1)[1])]
    path = model_path("resnet50-nsfw")
    m = load_model(path)
    x = load_inputs(m, ["skimage:astronaut"], preprocess=known_preprocess("resnet50-nsfw"))[0]
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ref = s.run(None, {s.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(np.array(probs), ref.ravel(), atol=1e-4)
    assert (tmp_path / "resnet50_nsfw.so").is_file()
