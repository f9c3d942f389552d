"""The Python API's entry points to TVM's compile: ``compile`` (a model to a TVM Executable) and
the Relax pipeline ``"tvm_sparseconv"`` (``pipeline``), each with a plan, by default the plan the
cost model predicts for the target (tune/predict.py, which sits above compile.py's builds)."""
from __future__ import annotations

import warnings

import tvm
from tvm import relax

from .compile import build, resolve_plan, rewrite
from .frontend import Model, load_model
from .cpu import cpu_of
from .target import as_compiled, host_cpu, make_target, names_no_mcpu
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


@relax.register_pipeline("tvm_sparseconv")
def pipeline(plan=None, algorithm: str | None = None, database=None) -> tvm.transform.Pass:
    """The tvm-sparseconv Relax pipeline: ``tvm.compile(mod, target,
    relax_pipeline=pipeline(plan), tir_pipeline="tvm_sparseconv")``, or
    ``relax_pipeline="tvm_sparseconv"`` for the default plan.

    ``mod``'s ``main`` has its conv layers rewritten per ``plan`` (a Plan, plan file or dict
    made for this module) or with ``algorithm`` on every layer that supports it, as in
    ``compile``, the rest of the graph scheduled, then TVM's default pipeline. Neither: the plan
    predicted for the target, on ``main`` as ``load_model`` imports it (one input of static
    shape; the weights bound as constants). The kernels are built for the target tvm.compile
    is given. ``tir_pipeline="tvm_sparseconv"`` (passes/stack_scratch.py) puts the kernels'
    scratch buffers on the stack; with TVM's default TIR pipeline they compute the same, more
    slowly."""

    @tvm.transform.module_pass(opt_level=0, name="tvm_sparseconv")
    def run(mod: tvm.IRModule, ctx) -> tvm.IRModule:
        given = tvm.target.Target.current(allow_none=True)
        target = make_target(None) if given is None else as_compiled(given)
        if given is not None and names_no_mcpu(given):
            warnings.warn(f"tvm.compile's target names no mcpu: LLVM builds generic code, and the kernels are "
                          f'written for it ({cpu_of(target)}); {{"kind": "llvm", "mcpu": "{host_cpu()}"}} is this CPU')
        chosen = plan
        if plan is None and algorithm is None:
            m = load_model(mod)
            mod, chosen = m.mod, predict_plan(m, target)
        return relax.get_pipeline("default")(rewrite(mod, chosen, algorithm, target, database))

    return run
