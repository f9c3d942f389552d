"""The package's files on disk that can be made again: its cache folder, and the kernel cache.

The kernel cache keeps each built PrimFunc (TVM's JSON form), so that every process parses a
kernel once: the kernels are TVMScript, and parsing them is most of a model's compile time
(MobileNet-V2: 27 s of parsing, against 6 s for tvm.compile, on an AMD EPYC Zen 3). A tune's
workers, ``compile``, ``bench`` and the tests' processes then load what another built.

Entries: ``cache_dir()/kernels/<version>/<sha1 of the key>.json``, holding the key itself (a
file whose key differs is not used), the caller's JSON metadata and the functions. The
version is a digest of the package's Python source and TVM's version, so an entry is never
used with other kernel code than made it; a new version removes the folders of the others.
An entry that cannot be read is built again and replaced, and a failure to write one is
ignored: the cache only saves time. ``TVMS_KERNEL_CACHE=0`` turns it off.

The folder is capped at ``TVMS_KERNEL_CACHE_MB`` (default 1024; an entry is 50-500 KB, and a
long tune builds thousands): after a write that takes it past the cap, the entries used least
recently (a hit touches its file) go until it is under 3/4 of it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import tvm

_FORMAT = 1
DEFAULT_CAP_MB = 1024


def write_atomically(path: str, write, binary: bool = False) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, then rename it to ``path``: a kill
    leaves the old file or the new one, never a part (at worst a stray temp file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb" if binary else "w") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tvm_sparseconv`` (``~/.cache/tvm_sparseconv`` when it is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tvm_sparseconv"


@functools.lru_cache(maxsize=1)
def _version() -> str:
    """Digest of every .py file of the package (path and content) and of TVM's version."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha1(f"{_FORMAT} {tvm.__version__}".encode())
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _folder() -> Path | None:
    """This version's folder (made, and the other versions' removed, on first use); None when
    the cache is off or cannot be made."""
    if os.environ.get("TVMS_KERNEL_CACHE", "1") == "0":
        return None
    folder = cache_dir() / "kernels" / _version()
    if not folder.is_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        for other in folder.parent.iterdir():
            if other != folder:
                shutil.rmtree(other, ignore_errors=True)
    return folder


def cached_funcs(key: str, build: Callable[[], tuple[list, object]]) -> tuple[list, object]:
    """(PrimFuncs, JSON-able metadata) for ``key``: from the kernel cache, else ``build()``'s,
    then kept there."""
    folder = _folder()
    if folder is None:
        return build()
    cap = _cap_bytes()  # a bad setting is said before the build, not after
    path = folder / (hashlib.sha1(key.encode()).hexdigest() + ".json")
    try:
        with open(path) as f:
            entry = json.load(f)
        if entry["key"] == key:
            funcs = [tvm.ir.load_json(s) for s in entry["funcs"]]
            os.utime(path)  # used: the last to go when the folder is over its cap
            return funcs, entry["meta"]
    except Exception:  # absent, torn, from a colliding key or unreadable to this TVM: built again
        pass
    funcs, meta = build()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "meta": meta, "funcs": [tvm.ir.save_json(fn) for fn in funcs]}, f)
        os.replace(tmp, path)  # whole or not at all: another process may read it meanwhile
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    _trim(folder, cap)
    return funcs, meta


def _cap_bytes() -> int:
    try:
        mb = float(os.environ.get("TVMS_KERNEL_CACHE_MB", DEFAULT_CAP_MB))
    except ValueError:
        raise ValueError(f"TVMS_KERNEL_CACHE_MB must be a number of megabytes, "
                         f"got {os.environ['TVMS_KERNEL_CACHE_MB']!r}") from None
    return int(mb * 2**20)


def _trim(folder: Path, cap: int) -> None:
    """Remove the least recently used entries of ``folder`` until they total at most 3/4 of
    ``cap`` bytes, when they total more than ``cap`` (another process may remove them too)."""
    entries = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.endswith(".json"):
                    try:
                        st = e.stat()
                    except OSError:
                        continue
                    entries.append((st.st_mtime, st.st_size, e.path))
    except OSError:
        return
    total = sum(size for _, size, _ in entries)
    if total <= cap:
        return
    for _, size, path in sorted(entries):
        if total <= cap * 3 // 4:
            break
        try:
            os.remove(path)
        except OSError:
            pass
        total -= size
