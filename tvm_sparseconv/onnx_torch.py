"""Run an ONNX CNN graph with PyTorch's own operators (the PyTorch peer for ONNX models).

A small interpreter over the ops that static CNN graphs use (Conv, Relu, pools, Gemm,
MatMul, elementwise, Transpose, Reshape, Flatten, Softmax, Concat, BatchNormalization);
any other op is refused by name. The convs run in torch's own kernels (oneDNN), which
is what a PyTorch user of the model would get.
"""
from __future__ import annotations

import numpy as np


class OnnxTorch:
    def __init__(self, onnx_path: str):
        import onnx
        import torch
        from onnx import numpy_helper

        m = onnx.load(onnx_path)
        self.graph = m.graph
        self.consts = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in m.graph.initializer}
        for n in m.graph.node:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = torch.from_numpy(numpy_helper.to_array(n.attribute[0].t).copy())
            elif n.op_type not in _OPS:
                raise NotImplementedError(f"the PyTorch peer does not run ONNX op {n.op_type}")
        self.input = [i.name for i in m.graph.input if i.name not in self.consts][0]

    def __call__(self, x):
        import onnx
        import torch

        env = dict(self.consts)
        env[self.input] = x
        with torch.inference_mode():
            for n in self.graph.node:
                if n.op_type == "Constant":
                    continue
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                ins = [env[i] if i else None for i in n.input]
                out = _OPS[n.op_type](ins, attrs)
                env[n.output[0]] = out
            return env[self.graph.output[0].name]


def _pads2d(pads):
    # ONNX (top, left, bottom, right) -> F.pad (left, right, top, bottom)
    t, l, b, r = pads
    return (l, r, t, b)


def _conv(ins, a):
    import torch.nn.functional as F

    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    pads = a.get("pads", [0, 0, 0, 0])
    if pads[0] != pads[2] or pads[1] != pads[3]:
        x, pad = F.pad(x, _pads2d(pads)), 0
    else:
        pad = (pads[0], pads[1])
    return F.conv2d(x, w, b, a.get("strides", [1, 1]), pad, a.get("dilations", [1, 1]), a.get("group", 1))


def _pool(kind):
    def run(ins, a):
        import torch.nn.functional as F

        x = ins[0]
        pads = a.get("pads", [0, 0, 0, 0])
        k, s = a["kernel_shape"], a.get("strides", [1, 1])
        if kind == "max":
            if any(pads):
                x = F.pad(x, _pads2d(pads), value=float("-inf"))
            return F.max_pool2d(x, k, s, 0, ceil_mode=bool(a.get("ceil_mode", 0)))
        if pads[0] != pads[2] or pads[1] != pads[3]:
            raise NotImplementedError("asymmetric AveragePool padding")
        return F.avg_pool2d(x, k, s, (pads[0], pads[1]), ceil_mode=bool(a.get("ceil_mode", 0)),
                            count_include_pad=bool(a.get("count_include_pad", 0)))
    return run


def _gemm(ins, a):
    x, w = ins[0], ins[1]
    if a.get("transA", 0):
        x = x.T
    if a.get("transB", 0):
        w = w.T
    y = a.get("alpha", 1.0) * (x @ w)
    if len(ins) > 2 and ins[2] is not None:
        y = y + a.get("beta", 1.0) * ins[2]
    return y


def _reshape(ins, a):
    shape = [int(v) for v in ins[1].tolist()]
    shape = [ins[0].shape[i] if v == 0 and not a.get("allowzero", 0) else v for i, v in enumerate(shape)]
    return ins[0].reshape(shape)


def _bn(ins, a):
    import torch.nn.functional as F

    return F.batch_norm(ins[0], ins[3], ins[4], ins[1], ins[2], False, 0.0, a.get("epsilon", 1e-5))


def _lazy(name):
    def run(ins, a):
        import torch

        return getattr(torch, name)(*ins)
    return run


_OPS = {
    "Conv": _conv,
    "Relu": lambda ins, a: ins[0].relu(),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda ins, a: ins[0].mean(dim=(2, 3), keepdim=True),
    "Gemm": _gemm,
    "MatMul": _lazy("matmul"),
    "Add": _lazy("add"),
    "Sub": _lazy("sub"),
    "Mul": _lazy("mul"),
    "Div": _lazy("div"),
    "Transpose": lambda ins, a: ins[0].permute(*a["perm"]),
    "Reshape": _reshape,
    "Flatten": lambda ins, a: ins[0].reshape(int(np.prod(ins[0].shape[:a.get("axis", 1)])), -1),
    "Softmax": lambda ins, a: ins[0].softmax(a.get("axis", -1)),
    "Concat": lambda ins, a: __import__("torch").cat(ins, a["axis"]),
    "BatchNormalization": _bn,
    "Identity": lambda ins, a: ins[0],
    "Constant": None,
}
