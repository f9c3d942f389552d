"""Import a CNN as a Relax IRModule: an ONNX file, a torch.export program, or a Relax module.

ONNX graphs with dynamic dims (e.g. a free batch size that feeds Shape -> Reshape, which
TVM's importer rejects) are made static first: the input shape is fixed (the user's, or
the file's with a free batch set to 1; other free dims need the user's) and onnxruntime's
basic graph optimisation folds the constants. Weights become Relax constants and constant
expressions are folded, so each conv's bias is a plain constant the rewrite pass can fuse.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tvm
from tvm import relax

from . import old_opsets
from .cache import cache_dir, write_atomically

class ModelError(ValueError):
    """The model file is missing, corrupt, or cannot be imported."""


@dataclass
class Model:
    """A model ready for profiling and compiling.

    ``mod`` has one Relax function ``main`` taking one input of ``input_shape`` in
    ``layout`` (NHWC for Keras/tf2onnx exports, else NCHW); ``onnx_path`` is the static
    ONNX file the module was imported from (for onnxruntime comparisons), if any.
    """

    mod: tvm.IRModule
    input_name: str
    input_shape: tuple[int, ...]
    layout: str
    source: str
    onnx_path: str | None = None

    @functools.cached_property
    def sites(self) -> list:
        """The conv layers of ``main`` (graph.ConvSite, in binding order), found once per model."""
        from .graph import find_conv_sites

        return find_conv_sites(self.mod["main"])

    def __getstate__(self) -> dict:  # the sites hold Relax vars: found again after unpickling
        return {k: v for k, v in self.__dict__.items() if k != "sites"}


def guess_layout(shape: Sequence[int]) -> str:
    """NHWC when the last dim looks like image channels and the second does not."""
    if len(shape) == 4 and shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return "NHWC"
    return "NCHW"


_STATIC_FORMAT = 3  # in the cache key of static_onnx's files: a change to what it writes makes new ones


def static_onnx(path: str, input_shape: Sequence[int] | None = None, out_dir: str | None = None):
    """Fix the input shape, bring a model below opset 11 to opset 13 (old_opsets.as_opset13) and
    fold constants; returns (static .onnx path, input name, shape).

    The static file goes to ``out_dir`` when given, else to ``cache_dir()/static-onnx`` under a
    name keyed by the source file (path, size, mtime), the shape and onnxruntime's version: a
    model loaded again reuses it, and loads never pile up copies in the temporary directory."""
    import onnx
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise ModelError(f"model file not found: {path}")
    try:
        model = onnx.load(path)
    except Exception as e:
        raise ModelError(f"{path} is not a readable ONNX model: {e}") from e
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one graph input, found {[i.name for i in inputs]}")
    inp = inputs[0]
    dims = inp.type.tensor_type.shape.dim
    declared = [d.dim_value if d.dim_value > 0 else None for d in dims]
    if input_shape is None:
        # a free batch is 1; any other free dim (an image's height or width) has no default:
        # at 1 the model would compile for 1 x 1 images and refuse every real one
        free = [i for i, d in enumerate(declared) if d is None and i > 0]
        if free:
            raise ModelError(f"{path}: input {inp.name!r} is declared {tuple(d or '?' for d in declared)}, with free "
                             f"dims besides the batch: give the input shape (--input-shape, input_shape=)")
        shape = tuple(v or 1 for v in declared)
    else:
        shape = tuple(int(v) for v in input_shape)
        bad = len(shape) != len(declared) or any(d is not None and d != s for d, s in zip(declared, shape))
        if bad:
            raise ModelError(f"{path}: input {inp.name!r} is declared {tuple(d or '?' for d in declared)}, "
                             f"cannot use shape {shape}")
    for d, v in zip(dims, shape):
        d.ClearField("dim_param")
        d.dim_value = v
    stem = os.path.splitext(os.path.basename(path))[0]
    if out_dir is None:
        st = os.stat(path)
        key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:{shape}:{ort.__version__}:{_STATIC_FORMAT}"
        out_dir = str(cache_dir() / "static-onnx")
        out = os.path.join(out_dir, f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.static.onnx")
        if os.path.isfile(out):
            return out, inp.name, shape
    else:
        out = os.path.join(out_dir, stem + ".static.onnx")
    if old_opsets.opset(model) < 11:
        try:
            model = old_opsets.as_opset13(model, inp.name, shape)
        except old_opsets.ConversionError as e:
            raise ModelError(f"{path}: {e}") from e
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot write the static form of {path} into {out_dir} ({e}); set XDG_CACHE_HOME to a "
                         "writable directory") from e
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # written under a temporary name and renamed into place: a concurrent or interrupted load
    # never leaves a partial file under the name a later load would reuse
    fd, partial = tempfile.mkstemp(suffix=".onnx", dir=out_dir)
    os.close(fd)
    opts.optimized_model_filepath = partial
    try:
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        os.replace(partial, out)
    except Exception as e:
        raise ModelError(f"onnxruntime cannot load {path}: {e}") from e
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return out, inp.name, shape


def prepare_resizes(proto, path: str) -> None:
    """Put each Resize of ``proto`` (the static model: static_onnx's output) in the form TVM's
    importer reads as onnxruntime computes it, in place; raise ModelError for what it would
    compute differently.

    - roi, scales or sizes given as empty tensors (opset 11 always has the four inputs, the
      unused ones empty) become absent inputs: TVM takes an empty scales beside sizes for two
      given and refuses the model;
    - an ``axes`` attribute (opset 18) is expanded to scales or sizes of every axis (1, or the
      input's size, on the others): TVM reads them as given for every axis;
    - refused: scales that do not give a whole size (ONNX maps an output coordinate back
      through the scale, x_in = (x_out + 0.5) / scale - 0.5 for half_pixel; TVM through the
      ratio of the sizes, in / out; they agree only where in * scale is whole: 8 x 0.75 = 6, not
      10 x 0.75 = 7.5 -> 7, where the outputs differ by whole pixels' worth), and antialias on a
      downscaled axis, keep_aspect_ratio_policy other than stretch, or tf_crop_and_resize, which
      TVM's importer ignores (antialias: outputs 0.77 off on a linear halving of 16 x 12)."""
    import onnx
    from onnx import helper, numpy_helper

    resizes = [n for n in proto.graph.node if n.op_type == "Resize"]
    if not resizes:
        return
    consts = {t.name: t for t in proto.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.input, *inferred.value_info, *inferred.output]}

    def const(n, i):
        return numpy_helper.to_array(consts[n.input[i]]) if len(n.input) > i and n.input[i] in consts else None

    def refuse(n, why):
        raise ModelError(f"{path}: Resize {n.name or n.output[0]!r} {why}")

    for k, n in enumerate(resizes):
        for i in (1, 2, 3):
            v = const(n, i)
            if v is not None and v.size == 0:
                n.input[i] = ""
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        shape = shapes.get(n.input[0]) or []
        computed = any(len(n.input) > i and n.input[i] and n.input[i] not in consts for i in (2, 3))
        if "axes" in attrs and shape and None not in shape and not computed:
            axes = [a % len(shape) for a in attrs["axes"]]
            for i, fill in ((2, [1.0] * len(shape)), (3, list(shape))):
                v = const(n, i)
                if v is not None:
                    full = np.array(fill, v.dtype)
                    full[axes] = v
                    name = f"{n.input[i]}.all_axes.{k}"
                    proto.graph.initializer.append(numpy_helper.from_array(full, name))
                    consts[name] = proto.graph.initializer[-1]
                    n.input[i] = name
            n.attribute.remove(next(a for a in n.attribute if a.name == "axes"))
        if any(a.name == "axes" for a in n.attribute):
            continue  # scales or sizes computed in the graph: TVM's importer refuses the node
        if attrs.get("coordinate_transformation_mode", b"") == b"tf_crop_and_resize":
            refuse(n, "uses tf_crop_and_resize, which TVM's importer does not compute as onnxruntime does")
        if attrs.get("keep_aspect_ratio_policy", b"stretch") != b"stretch":
            refuse(n, "has a keep_aspect_ratio_policy other than stretch, which TVM's importer ignores")
        scales, sizes = const(n, 2), const(n, 3)
        if scales is not None:
            ratios = scales.astype(float).ravel()
        elif sizes is not None and shape and None not in shape and sizes.size == len(shape):
            ratios = sizes / np.array(shape, float)
        else:
            continue
        for axis, (size, sc) in enumerate(zip(shape, ratios)):
            if attrs.get("antialias", 0) and sc < 1:
                refuse(n, f"downscales axis {axis} with antialias, which TVM's importer ignores (a different result)")
            if scales is not None and size is not None and sc != 1 and abs(size * sc - round(size * sc)) > 1e-6:
                refuse(n, f"scales axis {axis} of size {size} by {sc:g}, which does not give a whole size; TVM's "
                          f"importer would resize by {size} / {int(size * sc)} instead of the scale onnxruntime "
                          "uses, a different result. Export the model with output sizes, or scales that divide "
                          "the input evenly")


def fold(mod: tvm.IRModule) -> tvm.IRModule:
    """Fold constant expressions (reshape(bias) -> bias) so patterns see plain constants, turn
    imported scalar clamps into Relax ops (passes/clamps_as_ops.py): one form for graph.py;
    turn transposed convs into convs and a depth-to-space (passes/conv_transpose_as_conv.py),
    layers the plan covers; turn unfolded inference batch norms into a multiply and an add
    (passes/batch_norm_as_affine.py), elementwise ops the rewrite computes in channel blocks; and move elementwise ops in front of
    reshapes (passes/sink_reshapes.py), so that they fuse with the matmul or conv before them."""
    from .passes.batch_norm_as_affine import BatchNormAsAffine
    from .passes.clamps_as_ops import ClampsAsOps
    from .passes.conv_transpose_as_conv import ConvTransposeAsConv
    from .passes.sink_reshapes import SinkReshapes

    folded = relax.transform.FoldConstant()(mod)
    return SinkReshapes(ClampsAsOps(BatchNormAsAffine(ConvTransposeAsConv(folded))))


def load_model(model, input_shape: Sequence[int] | None = None, layout: str | None = None) -> Model:
    """An ONNX path or ModelProto, a torch ExportedProgram or a Relax IRModule -> :class:`Model`."""
    if type(model).__name__ == "ModelProto":  # onnx's, in memory: read as the file it would be
        return load_model(_proto_file(model), input_shape, layout)
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.exists(path):
            raise ModelError(f"model file not found: {path}")
        if not path.endswith(".onnx"):
            raise ModelError(f"{path}: only ONNX files are read from disk (pass a torch ExportedProgram or a "
                             "Relax IRModule through the Python API)")
        static, name, shape = static_onnx(path, input_shape)
        import onnx
        from tvm.relax.frontend.onnx import from_onnx

        proto = onnx.load(static)
        prepare_resizes(proto, path)
        try:
            mod = from_onnx(proto, shape_dict={name: list(shape)}, keep_params_in_input=False)
        except Exception as e:
            raise ModelError(f"TVM cannot import {path}: {e}") from e
        return Model(fold(mod), name, shape, layout or guess_layout(shape), path, static)
    if isinstance(model, tvm.IRModule):
        return _from_relax(model, "<relax>", layout)
    if type(model).__name__ == "ExportedProgram":
        from tvm.relax.frontend.torch import from_exported_program

        try:
            mod = from_exported_program(model, keep_params_as_input=False, unwrap_unit_return_tuple=True,
                                        custom_convert_map={"adaptive_max_pool2d.default": _adaptive_max_pool2d})
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"TVM cannot import the torch.export program: {e}") from e
        return _from_relax(mod, "<torch.export>", layout)
    raise ModelError(f"cannot load a model from {type(model).__name__}: give an .onnx path or ModelProto, a torch "
                     "ExportedProgram or a Relax IRModule")


def _proto_file(proto) -> str:
    """An in-memory ONNX model saved under ``cache_dir()/onnx-proto``, named by the digest of its
    bytes (a model loaded again is not written again)."""
    data = proto.SerializeToString()
    out_dir = cache_dir() / "onnx-proto"
    path = out_dir / f"{hashlib.sha256(data).hexdigest()[:16]}.onnx"
    if not path.is_file():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(str(path), lambda f: f.write(data), binary=True)
        except OSError as e:
            raise ModelError(f"cannot write the ONNX model into {out_dir} ({e}); set XDG_CACHE_HOME to a writable "
                             "directory") from e
    return str(path)


def _adaptive_max_pool2d(node, importer) -> relax.Expr:
    """torch.export's adaptive_max_pool2d (N x C x H x W -> N x C x oh x ow, and the indices),
    which TVM's importer lacks: a max over H and W at 1 x 1 (as ONNX's GlobalMaxPool imports), a
    max_pool2d when the bins tile the map, else the max of each bin (rows floor(i H / oh) to
    ceil((i + 1) H / oh), as torch's). The indices are refused where anything reads them (their
    slot holds the values only for the unread getitem torch.export leaves)."""
    if any(getattr(u.target, "__name__", "") != "getitem" or (u.args[1] != 0 and u.users) for u in node.users):
        raise ModelError(f"torch.export node {node.name}: adaptive_max_pool2d's indices are used; "
                         "only its values are supported")
    x, size = importer.env[node.args[0]], node.args[1]
    h, w = (int(d) for d in list(x.ty.shape)[-2:])
    oh, ow = (s if s is not None else d for s, d in zip(size, (h, w)))
    bb, op = importer.block_builder, relax.op
    if (oh, ow) == (1, 1):
        out = op.max(x, axis=[-2, -1], keepdims=True)
    elif h % oh == 0 and w % ow == 0:
        out = op.nn.max_pool2d(x, (h // oh, w // ow), (h // oh, w // ow))
    else:
        def bins(n, o):
            return [(i * n // o, -(-(i + 1) * n // o)) for i in range(o)]
        rows = [bb.emit(op.concat([op.max(op.strided_slice(x, [-2, -1], [r0, c0], [r1, c1]), axis=[-2, -1],
                                          keepdims=True) for c0, c1 in bins(w, ow)], axis=-1))
                for r0, r1 in bins(h, oh)]
        out = op.concat(rows, axis=-2)
    out = bb.emit(out)
    return relax.Tuple([out, out])


def _from_relax(mod: tvm.IRModule, source: str, layout: str | None) -> Model:
    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise ModelError(f"{source}: the module has no Relax function 'main'")
    params = mod["main"].params
    if len(params) != 1:
        raise ModelError(f"{source}: main must take one input (bind the weights as constants); it takes "
                         f"{len(params)}")
    p = params[0]
    shape = tuple(int(v) for v in p.ty.shape)
    return Model(fold(mod), p.name, shape, layout or guess_layout(shape), source)


def at_batch(model: Model, batch: int) -> Model:
    """``model`` imported again with ``batch`` images per inference (the same ONNX file)."""
    if model.input_shape[0] == batch:
        return model
    if not model.onnx_path or not os.path.isfile(model.source):
        raise ModelError(f"{model.source}: only a model read from an ONNX file can be imported again at batch "
                         f"{batch}")
    return load_model(model.source, (batch, *model.input_shape[1:]), model.layout)
