"""passes/stack_scratch.py: the kernels' small scratch buffers on the stack, not in TVM's
workspace pool, by the TIR pipeline every build of the package uses."""
from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from test_residual import block_module
from tvm_sparseconv.build import CompiledLayer, stage_module
from tvm_sparseconv.api import pipeline
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.layer import synthesize_activation, synthesize_weight
from tvm_sparseconv.passes.stack_scratch import STACK_BUFFER_BYTES, STACK_FRAME_BYTES, TIR_PIPELINE
from tvm_sparseconv.reference import dense_conv2d
from tvm_sparseconv.target import make_target

# LLVM IR of a TVMBackendAllocWorkspace call (through the pointer the module loads): its size
_WORKSPACE_CALL = re.compile(r"call ptr %\d+\(i32 1, i32 %dev_id, i64 (\d+)")


def _workspace_sizes(executable) -> list[int]:
    return sorted(int(n) for n in _WORKSPACE_CALL.findall(executable.mod.inspect_source("ll")))


_SPEC = Conv2DSpec(1, 32, 12, 12, 64, 3, 3, (1, 1), (1, 1, 1, 1))
_WEIGHT = synthesize_weight(_SPEC)


def _window_layer(layout: str) -> CompiledLayer:
    knobs = {"kernel": "window", "block": 8, "m_tile": 32, "c_block": 0, "split": "row_outer", "pad": "inplace",
             "layout_in": layout, "layout_out": layout}
    return CompiledLayer("dense", _SPEC, _WEIGHT, knobs=knobs)


def test_a_register_tile_stays_out_of_the_workspace():
    """The dense kernel's accumulators for 8 pixels x 32 channels (1 KB: LowerTVMBuiltin keeps
    only "global" buffers under 1 KB on the stack) are on the stack in a CompiledLayer in
    channel blocks; with TVM's default TIR pipeline the same module allocates them per task.
    From NCHW the kernel has SCRATCH_IN_WORKSPACE: its accumulators stay in the workspace. The
    outputs match NumPy float64."""
    x = synthesize_activation((1, 32, 12, 12), 0.6)
    layers = {layout: _window_layer(layout) for layout in ("nchw16c", "nchw")}
    for layout, layer in layers.items():
        np.testing.assert_allclose(layer(x), dense_conv2d(_SPEC, x, _WEIGHT), rtol=1e-4, atol=1e-4)
        kept = [n for n in _workspace_sizes(layer.executable) if n <= STACK_BUFFER_BYTES]
        assert kept == ([] if layout == "nchw16c" else [8 * 32 * 4]), layout
    blocked = layers["nchw16c"]
    default = tvm.compile(stage_module(blocked.name, blocked.stages), target=blocked.target)
    assert _workspace_sizes(default) == [8 * 32 * 4]


@T.prim_func
def _six_live_buffers(x: T.Buffer((4, 4096), "float32"), y: T.Buffer((4, 4096), "float32")):
    """Per task, six buffers live at once (StorageRewrite merges none): one of 16 KB + 16
    bytes, five of 16 KB."""
    T.func_attr({"tirx.noalias": True})
    for t in T.parallel(4):
        big = T.alloc_buffer((4100,), "float32", scope="local")
        a0 = T.alloc_buffer((4096,), "float32", scope="local")
        a1 = T.alloc_buffer((4096,), "float32", scope="local")
        a2 = T.alloc_buffer((4096,), "float32", scope="local")
        a3 = T.alloc_buffer((4096,), "float32", scope="local")
        a4 = T.alloc_buffer((4096,), "float32", scope="local")
        for i in range(4100):
            big[i] = x[t, i % 4096]
        for i in range(4096):
            a0[i] = x[t, i] * T.float32(1)
            a1[i] = x[t, i] * T.float32(2)
            a2[i] = x[t, i] * T.float32(3)
            a3[i] = x[t, i] * T.float32(4)
            a4[i] = x[t, i] * T.float32(5)
        for i in range(4096):
            y[t, i] = big[i + 4] + a0[i] + a1[i] + a2[i] + a3[i] + a4[i]


def test_the_caps_per_buffer_and_per_function():
    """A buffer over STACK_BUFFER_BYTES stays in the workspace; of five of 16 KB live at once,
    four fit STACK_FRAME_BYTES and the fifth is allocated from the workspace. Each thread's
    buffers are its own: the sums are right."""
    assert STACK_BUFFER_BYTES == 16384 and STACK_FRAME_BYTES == 4 * 16384
    ex = tvm.compile(tvm.IRModule({"main": _six_live_buffers}), target=make_target(None), tir_pipeline=TIR_PIPELINE)
    assert _workspace_sizes(ex) == [16384, 16400]
    x = np.random.default_rng(0).standard_normal((4, 4096)).astype("float32")
    y = tvm.runtime.tensor(np.zeros_like(x))
    ex.mod["main"](tvm.runtime.tensor(x), y)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(y.numpy(), np.roll(x64, -4, axis=1) + 15 * x64, rtol=1e-5, atol=1e-5)


def test_a_relax_module_through_tvm_compile_with_either_tir_pipeline():
    """A user's Relax module (a residual block) through ``tvm.compile(mod, target,
    relax_pipeline=pipeline(...))``: with tir_pipeline "tvm_sparseconv" and with TVM's default,
    the NumPy float64 reference's output."""
    mod, reference = block_module(projection=True)
    x = np.random.default_rng(2).standard_normal((1, 8, 9, 9)).astype("float32")
    for tir_pipeline in (TIR_PIPELINE, "default"):
        ex = tvm.compile(mod, target=make_target(None), relax_pipeline=pipeline(algorithm="dense"),
                         tir_pipeline=tir_pipeline)
        y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(y, reference(x), rtol=1e-4, atol=1e-4)
