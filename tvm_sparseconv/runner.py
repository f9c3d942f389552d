"""Run a compiled model: from an Executable or an exported library, with its sidecar metadata.

``compile ... -o model.so`` writes ``model.so`` (the TVM runtime alone loads and runs it)
and ``model.so.json`` (input shape, layout, preprocessing, labels, plan applied) so that
``tvm-sparseconv run model.so --images ...`` knows how to feed it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct

import numpy as np
import tvm
from tvm import relax

from .images import Preprocess

SIDECAR_FORMAT = "tvm-sparseconv-model"


def sidecar_path(lib_path: str) -> str:
    return lib_path + ".json"


def write_sidecar(path: str, model, preprocess: Preprocess | None, labels, applied: dict, target) -> None:
    """The sidecar of the library at ``path``: input shape, layout, preprocessing, labels, and
    ``applied`` ({layer key: algorithm})."""
    meta = {"format": SIDECAR_FORMAT, "version": 1, "source": model.source, "input_name": model.input_name,
            "input_shape": list(model.input_shape), "layout": model.layout,
            "preprocess": dataclasses.asdict(preprocess) if preprocess else None,
            "labels": list(labels) if labels else None, "target": str(target), "layers": applied}
    tmp = sidecar_path(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, sidecar_path(path))


@dataclasses.dataclass
class LoadedModel:
    vm: relax.VirtualMachine
    input_shape: tuple
    layout: str
    preprocess: Preprocess | None
    labels: tuple | None
    meta: dict

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if x.shape != tuple(self.input_shape):
            raise ValueError(f"input shape {x.shape} does not match the model's {tuple(self.input_shape)}")
        out = self.vm["main"](tvm.runtime.tensor(x))
        return (out if hasattr(out, "numpy") else out[0]).numpy()  # a tuple result: its first field

    def latency_ms(self, x: np.ndarray, repeat: int = 10, min_repeat_ms: float = 200) -> float:
        """Median end-to-end latency of main (time_evaluator, first call discarded)."""
        fe = self.vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
        return float(np.median(fe(tvm.runtime.tensor(np.ascontiguousarray(x, np.float32))).results)) * 1e3


def elf_cut_short(path: str) -> str | None:
    """Why the ELF file at ``path`` is shorter than its own headers say (a copy or download cut
    short), else None; None for a file that is not a 64-bit little-endian ELF (dlopen then says
    what it is). The dynamic loader maps a truncated library's segments past the end of the file
    and the process dies of SIGBUS on the first read, so this is checked before it is loaded."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:6] != b"\x7fELF\x02\x01":  # ELF, 64-bit, little endian
            return None
        phoff, shoff = struct.unpack_from("<QQ", head, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 54)
        ends = [phoff + phentsize * phnum, shoff + shentsize * shnum]
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(len(table) // phentsize if phentsize >= 56 else 0):
            offset, filesz = struct.unpack_from("<Q16xQ", table, i * phentsize + 8)  # p_offset, p_filesz
            ends.append(offset + filesz)
    end = max(ends)
    return f"its headers reach byte {end}, the file has {size}" if end > size else None


def load(path: str) -> LoadedModel:
    """Load an exported library (and its sidecar, when there is one)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"library not found: {path}")
    short = elf_cut_short(path)
    if short:
        raise ValueError(f"{path} is cut short ({short}): compile or copy it again")
    try:
        vm = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
    except (RuntimeError, AttributeError) as e:  # TVM's: a truncated file, another architecture, no Relax VM
        raise ValueError(f"{path} is not a library this TVM can run: {str(e).strip().splitlines()[-1]}") from e
    meta = {}
    if os.path.isfile(sidecar_path(path)):
        with open(sidecar_path(path)) as f:
            try:
                meta = json.load(f)
            except ValueError as e:
                raise ValueError(f"{sidecar_path(path)} is not a tvm-sparseconv model description ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"{sidecar_path(path)} is not a tvm-sparseconv model description")
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocess"].items()}) \
        if meta.get("preprocess") else None
    return LoadedModel(vm, tuple(meta.get("input_shape") or ()), meta.get("layout", "NCHW"), pre,
                       tuple(meta["labels"]) if meta.get("labels") else None, meta)


def top_k(probs: np.ndarray, labels=None, k: int = 5) -> list[tuple[str, float]]:
    """The k highest scores of a 1 x classes output, with their labels (or indices)."""
    p = np.asarray(probs).reshape(-1)
    idx = np.argsort(-p)[:k]
    return [((labels[i] if labels and i < len(labels) else str(int(i))), float(p[i])) for i in idx]
