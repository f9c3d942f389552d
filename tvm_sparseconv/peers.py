"""The peers users would pick instead: onnxruntime and PyTorch running the same conv layer."""
from __future__ import annotations

import time

import numpy as np

from .conv import Conv2DSpec
from .measure import joined_outputs


def _median_ms(fn, repeat: int, min_time_s: float = 0.05) -> float:
    fn()  # warm-up (first-run allocation, kernel selection)
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    number = max(1, int(min_time_s / once))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return float(np.median(samples)) * 1e3


def conv_onnx_model(spec: Conv2DSpec, w: np.ndarray, bias: np.ndarray | None = None):
    """A one-Conv ONNX model of the layer (input ``x`` NCHW, weights as initializers)."""
    from onnx import TensorProto, helper, numpy_helper

    pt, pl, pb, pr = spec.padding
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], kernel_shape=[spec.kernel_h, spec.kernel_w],
                            strides=list(spec.stride), pads=[pt, pl, pb, pr], dilations=list(spec.dilation),
                            group=spec.groups)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, spec.x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, spec.y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def onnxruntime_layer(spec: Conv2DSpec, x: np.ndarray, w: np.ndarray, threads: int, repeat: int = 7):
    """(output, median ms) of onnxruntime on ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(conv_onnx_model(spec, w).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    feed = {"x": np.ascontiguousarray(x, np.float32)}
    y = sess.run(None, feed)[0]
    return y, _median_ms(lambda: sess.run(None, feed), repeat)


def pytorch_layer(spec: Conv2DSpec, x: np.ndarray, w: np.ndarray, threads: int, repeat: int = 7):
    """(output, median ms) of torch.nn.functional.conv2d on ``threads`` threads."""
    import torch
    import torch.nn.functional as F

    if threads > 0:  # 0: torch's default, as onnxruntime's intra_op_num_threads = 0
        torch.set_num_threads(threads)
    pt, pl, pb, pr = spec.padding
    xt, wt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.ascontiguousarray(w))

    def run():
        with torch.inference_mode():
            xi = F.pad(xt, (pl, pr, pt, pb)) if any(spec.padding) else xt
            return F.conv2d(xi, wt, stride=spec.stride, dilation=spec.dilation, groups=spec.groups)

    return run().numpy(), _median_ms(run, repeat)


PEERS = {"onnxruntime": onnxruntime_layer, "pytorch": pytorch_layer}


def onnxruntime_model(onnx_path: str, x: np.ndarray, threads: int, repeat: int = 7):
    """(measure.joined_outputs, median ms) of a whole ONNX model in onnxruntime."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)}
    return joined_outputs(sess.run(None, feed)), _median_ms(lambda: sess.run(None, feed), repeat, 0.5)


def pytorch_model(onnx_path: str, x: np.ndarray, threads: int, repeat: int = 7):
    """(measure.joined_outputs, median ms) of the ONNX model's graph run with PyTorch's operators."""
    import torch

    from .onnx_torch import OnnxTorch

    if threads > 0:
        torch.set_num_threads(threads)
    m = OnnxTorch(onnx_path)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    return joined_outputs(m(xt)), _median_ms(lambda: m(xt), repeat, 0.5)


MODEL_PEERS = {"onnxruntime": onnxruntime_model, "pytorch": pytorch_model}


class PeerError(RuntimeError):
    """A peer could not run a model or a layer: it refused it, raised, or its process died.
    str() is the reason, one line; callers show the peer as skipped."""


def _failure(returncode: int, stderr: str, limit: int = 300) -> str:
    """Why a child process failed, in one line: the signal that killed it, else the last line of
    its stderr (a traceback's, the exception), at most ``limit`` characters."""
    import signal

    if returncode < 0:
        try:
            return f"crashed: {signal.Signals(-returncode).name}"
        except ValueError:
            return f"crashed: signal {-returncode}"
    lines = [l.strip() for l in stderr.splitlines() if l.strip()]
    why = lines[-1] if lines else f"exited with code {returncode}"
    return why if len(why) <= limit else why[:limit - 3] + "..."


def _child(arrays: dict, meta: dict):
    """Run ``python -m tvm_sparseconv.peers`` on saved inputs; returns (output, ms). A child that
    fails or dies raises PeerError."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tvms-peer-") as d:
        for k, v in arrays.items():
            np.save(f"{d}/{k}.npy", v)
        with open(f"{d}/meta.json", "w") as f:
            json.dump(meta, f)
        proc = subprocess.run([sys.executable, "-m", "tvm_sparseconv.peers", d], capture_output=True, text=True)
        if proc.returncode != 0:
            raise PeerError(_failure(proc.returncode, proc.stderr))
        return np.load(f"{d}/y.npy"), float(open(f"{d}/ms.txt").read())


def run_peer(peer: str, spec: Conv2DSpec, x: np.ndarray, w: np.ndarray, threads: int, repeat: int = 7):
    """(output, median ms) of ``peer`` on one layer, measured in a child process; PeerError when
    the peer cannot run it.

    TVM's thread pool and the peers' OpenMP pools both spin-wait; sharing one process on a
    2-core machine slows whichever runs second by 10x or more, so each peer gets its own.
    """
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    return _child({"x": x, "w": w}, {"kind": "layer", "peer": peer, "spec": spec.to_dict(),
                                         "threads": threads, "repeat": repeat})


def run_model_peer(peer: str, onnx_path: str, x: np.ndarray, threads: int, repeat: int = 7):
    """(output, median ms) of ``peer`` on a whole ONNX model, in a child process; PeerError when
    the peer cannot run it (the PyTorch peer refuses ops it does not have, onnx_torch)."""
    if peer not in MODEL_PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(MODEL_PEERS)}")
    return _child({"x": x}, {"kind": "model", "peer": peer, "onnx": onnx_path, "threads": threads,
                                 "repeat": repeat})


def available_peers() -> list[str]:
    """The peers whose packages are installed."""
    import importlib.util

    mods = {"onnxruntime": ("onnxruntime", "onnx"), "pytorch": ("torch",)}
    return [p for p, ms in mods.items() if all(importlib.util.find_spec(m) for m in ms)]


if __name__ == "__main__":  # the child process of _child
    import json
    import sys

    d = sys.argv[1]
    meta = json.load(open(f"{d}/meta.json"))
    x = np.load(f"{d}/x.npy")
    if meta["kind"] == "layer":
        y, ms = PEERS[meta["peer"]](Conv2DSpec.from_dict(meta["spec"]), x, np.load(f"{d}/w.npy"),
                                    meta["threads"], meta["repeat"])
    else:
        y, ms = MODEL_PEERS[meta["peer"]](meta["onnx"], x, meta["threads"], meta["repeat"])
    np.save(f"{d}/y.npy", y)
    open(f"{d}/ms.txt", "w").write(repr(ms))
