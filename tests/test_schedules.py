"""MetaSchedule on a whole Relax module that holds the hand-scheduled kernels."""
import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_sparseconv.passes import LayerChoice, RewriteConv2D
from tvm_sparseconv.target import make_target
from tvm_sparseconv.tune.metaschedule import import_tensor_intrinsics

from test_relax_rewrite import reference, small_module

pytestmark = pytest.mark.slow


def test_tuning_a_module_keeps_the_kernels_as_written(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    mod, w1, w2, b1 = small_module()
    rewritten = RewriteConv2D({"conv000": LayerChoice("halo"), "conv001": LayerChoice("dense")})(mod)
    target = make_target(None)
    import_tensor_intrinsics()  # as the tuner does: the pipeline's TuneContext imports them, slower
    with target:  # one trial: TVM's builder spends half a minute per batch importing its intrinsics
        tuned = relax.pipeline.static_shape_tuning_pipeline(total_trials=1, target=target,
                                                            work_dir=str(tmp_path))(rewritten)
    # MetaSchedule saw the kernels (their custom rule gave it their one design space) ...
    db = ms.database.JSONDatabase(work_dir=str(tmp_path))
    names = {r.workload.mod["main"].attrs.get("global_symbol", "") for r in db.get_all_tuning_records()}
    texts = [r.workload.mod.script() for r in db.get_all_tuning_records()]
    assert any("tvms_kernel" in t for t in texts), names
    # ... and the tuned module computes the same convolution
    x = np.maximum(np.random.default_rng(1).standard_normal((1, 4, 9, 9)), 0).astype("float32")
    y = relax.VirtualMachine(tvm.compile(tuned, target=target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(y, reference(x, w1, w2, b1), rtol=1e-4, atol=1e-4)
