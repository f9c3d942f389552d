"""The peers users would pick instead: onnxruntime and PyTorch running the same conv layer."""
from __future__ import annotations

import time

import numpy as np

from .conv import Conv2DSpec


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
    import onnx
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

    torch.set_num_threads(threads)
    pt, pl, pb, pr = spec.padding
    xt, wt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.ascontiguousarray(w))

    def run():
        with torch.inference_mode():
            xi = F.pad(xt, (pl, pr, pt, pb)) if any(spec.padding) else xt
            return F.conv2d(xi, wt, stride=spec.stride, dilation=spec.dilation, groups=spec.groups)

    return run().numpy(), _median_ms(run, repeat)


PEERS = {"onnxruntime": onnxruntime_layer, "pytorch": pytorch_layer}


def run_peer(peer: str, spec: Conv2DSpec, x: np.ndarray, w: np.ndarray, threads: int, repeat: int = 7):
    """(output, median ms) of ``peer``, measured in a child process.

    TVM's thread pool and the peers' OpenMP pools both spin-wait; sharing one process on a
    2-core machine slows whichever runs second by 10x or more, so each peer gets its own.
    """
    import json
    import subprocess
    import sys
    import tempfile

    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    with tempfile.TemporaryDirectory(prefix="tvms-peer-") as d:
        np.save(f"{d}/x.npy", x)
        np.save(f"{d}/w.npy", w)
        with open(f"{d}/spec.json", "w") as f:
            json.dump(spec.to_dict(), f)
        proc = subprocess.run([sys.executable, "-m", "tvm_sparseconv.peers", d, peer, str(threads), str(repeat)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{peer} failed: {proc.stderr.strip()[-2000:]}")
        return np.load(f"{d}/y.npy"), float(open(f"{d}/ms.txt").read())


if __name__ == "__main__":  # child process of run_peer
    import json
    import sys

    d, peer, threads, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    spec = Conv2DSpec.from_dict(json.load(open(f"{d}/spec.json")))
    y, ms = PEERS[peer](spec, np.load(f"{d}/x.npy"), np.load(f"{d}/w.npy"), threads, repeat)
    np.save(f"{d}/y.npy", y)
    open(f"{d}/ms.txt", "w").write(repr(ms))


def available_peers() -> list[str]:
    import importlib.util

    mods = {"onnxruntime": ("onnxruntime", "onnx"), "pytorch": ("torch",)}
    return [p for p, ms in mods.items() if all(importlib.util.find_spec(m) for m in ms)]
