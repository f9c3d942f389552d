"""The Python API's compile: a model to a TVM Executable with a plan, by default the plan the
cost model predicts for the target (tune/predict.py), which sits above compile.py's builds."""
from __future__ import annotations

import tvm

from .compile import build, resolve_plan
from .frontend import Model, load_model
from .tune.predict import predict_plan


def compile(model, target=None, plan=None, algorithm: str | None = None, database=None,
            input_shape=None) -> tvm.runtime.Executable:
    """tvm.compile a model (ONNX path, ExportedProgram, Relax IRModule or Model) with a plan.

    ``plan`` is a Plan, a plan file or dict; or ``algorithm`` names one algorithm for every
    layer that supports it ("dense", "cpo", ...; "direct" = TVM's own conv2d everywhere), with
    its default knobs in NCHW. Neither: the plan predicted for the target
    (``predict_plan(model, target)``: the cost model, default densities), as the command line
    takes when no plan ships for the model.

    The result runs with ``relax.VirtualMachine(ex, tvm.cpu())`` and exports with
    ``ex.export_library("model.so")``; for a target of another architecture (``{"kind": "llvm",
    "mtriple": "aarch64-linux-gnu", ...}``) with ``tvm_sparseconv.export_library(ex, "model.so",
    target)``, which links it with a cross compiler (docs/arm.md).

    It compiles in this process, so a fatal LLVM error (an abort) ends the process. The
    ``tvm-sparseconv compile`` and ``profile`` commands build in a worker process instead
    (build_isolated), where such a crash is an error naming the layer or algorithm.
    """
    m = model if isinstance(model, Model) else load_model(model, input_shape)
    if plan is None and algorithm is None:
        plan = predict_plan(m, target)
    return build(m, resolve_plan(m, plan, algorithm, target), target, database).module
