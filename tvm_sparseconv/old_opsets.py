"""ONNX models below opset 11 brought to opset 13, the forms TVM's importer reads right.

TVM's importer refuses some forms of opsets 1 to 10 (Slice with starts and ends as attributes;
Resize-10; opset 9's Upsample, scales as an input; the experimental ImageScaler) and reads one
wrong (opset 7's Upsample: another rounding of nearest, a YOLO-like net's upsampled output
1.6 % off). ONNX's version converter rewrites every op of such a model in its opset-13 form;
what it leaves out is mended here:

- ImageScaler (no schema in the converter) becomes a Mul by its scale and an Add of its
  per-channel bias before the conversion;
- a Resize made from an Upsample or a Resize-10 keeps Resize's defaults (half_pixel, round
  prefer floor), where those ops map output pixels back asymmetrically (x_in = x_out / scale)
  and nearest takes the floor (the ceil on an axis scaled down, as onnxruntime computes them).

The conversion is checked: onnxruntime must give the original and the converted model the same
outputs on a random input. Where the conversion fails or changes the outputs, a model holding
one of the forms TVM cannot read right is refused (ConversionError); any other keeps its
original form, which TVM's importer reads.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class ConversionError(ValueError):
    """onnxruntime cannot run the model, or it holds a form TVM cannot read right and ONNX's
    conversion of it fails or changes its outputs."""


TARGET = 13
# ops whose form below opset 11 TVM's importer refuses or reads wrong
UNREADABLE = ("Upsample", "Resize", "Slice", "ImageScaler")


def opset(model) -> int:
    """The default ONNX domain's opset of ``model`` (a ModelProto)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def as_opset13(model, input_name: str, shape: Sequence[int]):
    """``model`` (ModelProto below opset 11, input ``input_name`` fixed at ``shape``) in its
    checked opset-13 form; the model itself where that fails and TVM reads it as it is."""
    import onnxruntime as ort
    from onnx import version_converter

    unreadable = sorted({n.op_type for n in model.graph.node} & set(UNREADABLE))
    old = opset(model)

    def keep_or_refuse(why: str):
        if unreadable:
            raise ConversionError(f"opset {old} with {', '.join(unreadable)}, which TVM's importer cannot "
                                  f"read right in that opset, and ONNX's conversion to opset {TARGET} {why}; "
                                  "export the model at opset 11 or later")
        return model

    x = _random_input(model, input_name, shape)

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {input_name: x})

    try:
        before = run(model)
    except Exception as e:
        raise ConversionError(f"onnxruntime cannot run it: {e}") from e
    try:
        converted = version_converter.convert_version(_without_image_scalers(model), TARGET)
        for n in converted.graph.node:  # below opset 11, every Resize was an Upsample or a Resize-10
            if n.op_type == "Resize":
                _asymmetric(n, _scales(converted, n))
        after = run(converted)
    except Exception as e:
        return keep_or_refuse(f"fails ({str(e).splitlines()[0][:200]})")
    for b, a in zip(before, after):
        scale = max(float(np.abs(b).max()), 1e-30)
        if b.shape != a.shape or not np.allclose(a, b, rtol=1e-5, atol=1e-5 * scale):
            return keep_or_refuse("changes the outputs")
    return converted


def _random_input(model, input_name: str, shape: Sequence[int]) -> np.ndarray:
    """A seeded random array for the graph input ``input_name``, in its element type (whole
    numbers 0-255 for an integer input, such as an image's bytes)."""
    from onnx import helper

    inp = next(i for i in model.graph.input if i.name == input_name)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
    rng = np.random.default_rng(0)
    if dtype.kind in "iub":
        return rng.integers(0, 2 if dtype.kind == "b" else 256, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _without_image_scalers(model):
    """A copy of ``model`` whose ImageScaler nodes (y = scale * x + bias[c], NCHW) are a Mul and an Add."""
    from onnx import helper, numpy_helper

    if not any(n.op_type == "ImageScaler" for n in model.graph.node):
        return model
    out = type(model)()
    out.CopyFrom(model)
    nodes = []
    for k, n in enumerate(out.graph.node):
        if n.op_type != "ImageScaler":
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        bias = np.asarray(attrs.get("bias", [0.0]), np.float32).reshape(-1, 1, 1)
        names = [f"{n.output[0]}.image_scaler.{k}.{s}" for s in ("scale", "bias", "scaled")]
        out.graph.initializer.extend([numpy_helper.from_array(np.float32(attrs.get("scale", 1.0)), names[0]),
                                      numpy_helper.from_array(bias, names[1])])
        nodes += [helper.make_node("Mul", [n.input[0], names[0]], [names[2]]),
                  helper.make_node("Add", [names[2], names[1]], list(n.output))]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _scales(model, node) -> np.ndarray | None:
    """The constant scales input of a converted Resize ``node``, if the graph holds it as one."""
    from onnx import numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        return None
    name = node.input[2]
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _asymmetric(node, scales: np.ndarray | None) -> None:
    """Give a Resize made from an Upsample or a Resize-10 their coordinates, in place: asymmetric,
    and nearest's floor (ceil where an axis is scaled down, as onnxruntime's opset-10 Resize)."""
    from onnx import helper

    down = scales is not None and bool((np.asarray(scales) < 1).any())
    kept = [a for a in node.attribute if a.name not in ("coordinate_transformation_mode", "nearest_mode")]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("coordinate_transformation_mode", "asymmetric"),
                           helper.make_attribute("nearest_mode", "ceil" if down else "floor")])
