"""A MetaSchedule database reaches the tunable stages of a rewritten model, although each of them
carries the layer attributes the tuned form has not (stages.apply_database)."""
import numpy as np
import pytest
import tvm
import tvm_ffi

from tvm_sparseconv.algorithms import get_algorithm
from tvm_sparseconv.compile import lower, resolve_plan
from tvm_sparseconv.conv import Conv2DSpec, Epilogue
from tvm_sparseconv.frontend import load_model
from tvm_sparseconv.stages import ALGORITHM_ATTR, LAYERS_ATTR, kernel_table
from tvm_sparseconv.target import make_target
from tvm_sparseconv.tune.metaschedule import tune_stages

from test_relax_rewrite import reference, small_module

pytestmark = pytest.mark.slow


def test_a_tuned_im2col_stage_replaces_the_untuned_one_in_the_model(tmp_path):
    mod, w1, w2, b1 = small_module()
    model = load_model(mod)
    target = make_target(None)
    site = model.sites[0]  # the 3x3 conv with bias and ReLU
    algo = get_algorithm("im2col")
    stages = algo.stages(site.spec, site.epilogue(), algo.knobs(site.spec), target)
    assert tune_stages(stages, target, str(tmp_path), trials=8) is not None
    plan = resolve_plan(model, None, "im2col", target)
    untuned, _ = lower(model, plan, target)
    tuned, applied = lower(model, plan, target, database=str(tmp_path))
    assert applied == {"conv000": "im2col", "conv001": "im2col"}
    assert kernel_table(tuned) == kernel_table(untuned)  # the attributes stay
    layer0 = [n for n, (layers, _) in kernel_table(tuned).items() if layers == ("conv000",)]
    assert layer0 and all(tuned[n].attrs[ALGORITHM_ATTR] == "im2col" and list(tuned[n].attrs[LAYERS_ATTR]) == ["conv000"]
                          for n in layer0)
    # the tuned layer's stages are the database's schedules, not the TE loop nests
    assert any(not tvm_ffi.structural_equal(tuned[n], untuned[n]) for n in layer0)
    x = np.maximum(np.random.default_rng(1).standard_normal((1, 4, 9, 9)), 0).astype("float32")
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(tuned, target=target), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), reference(x, w1, w2, b1),
                               rtol=1e-4, atol=1e-4)
