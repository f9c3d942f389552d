"""Targets and threads: TVM's conventions (dict targets) with this machine's defaults."""
from __future__ import annotations

import json
import os
import platform
import shutil

import tvm

CROSS_CC_ENV = "TVMS_CROSS_CC"  # the compiler that links libraries for a target of another architecture


class CrossCompilerError(RuntimeError):
    """A library for another architecture cannot be linked here: no cross compiler."""


def host_cpu() -> str:
    """LLVM's name for this CPU (``"native"`` would silently build generic code)."""
    return tvm.target.codegen.llvm_get_system_cpu()


def default_target(num_cores: int | None = None) -> dict:
    """This CPU as a dict target; MetaSchedule needs ``num-cores``."""
    return {"kind": "llvm", "mcpu": host_cpu(), "num-cores": int(num_cores or os.cpu_count() or 1)}


def make_target(target=None) -> tvm.target.Target:
    """None -> the environment's TVMS_TARGET (a JSON dict) if set, else this CPU; a dict, a JSON
    string, a kind ("llvm") or a Target.

    An llvm target of this machine's architecture without ``mcpu`` is this CPU: it gets
    host_cpu() as its mcpu, which is what cpu_of describes (without it LLVM builds generic
    x86-64 code for the vectors the kernels are written for: pixcsr from "llvm" on an AVX2 host
    aborted the process, "LLVM ERROR: Do not know how to split the result"), and this
    machine's cores as num-cores unless it names them.

    TVMS_TARGET lets a whole run (the tests, say) build for another CPU than the host's, e.g.
    '{"kind": "llvm", "mcpu": "haswell"}' for AVX2 code on an AVX-512 machine."""
    if target is None:
        env = os.environ.get("TVMS_TARGET", "").strip()
        return make_target(env) if env else tvm.target.Target(default_target())
    target = _as_dict(target)
    if target.get("kind") == "llvm":
        if host_arch(target.get("mtriple")):  # never the host's cpu name in a foreign triple
            target.setdefault("mcpu", host_cpu())
        target.setdefault("num-cores", os.cpu_count() or 1)
    return tvm.target.Target(target)


def target_json(text: str) -> dict:
    """The dict target a JSON string gives; a ValueError that shows the string when it is not
    JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the target {text!r} is not valid JSON ({e})") from e


def _as_dict(target) -> dict:
    """A dict, JSON string, kind or Target as a new dict; a Target's without the features TVM
    derived from its mcpu (another mcpu derives its own)."""
    if isinstance(target, str):
        target = target_json(target) if target.strip().startswith("{") else tvm.target.Target(target)
    if isinstance(target, tvm.target.Target):  # TVM 0.27 prints a target as its JSON
        return {k: v for k, v in json.loads(str(target)).items() if not k.startswith("feature.")}
    return dict(target)


def as_compiled(target) -> tvm.target.Target:
    """``target`` as tvm.compile builds for it: an llvm target without mcpu is LLVM's generic
    CPU there (SSE2 on x86-64), where make_target makes it this CPU. cpu_of of the result is
    the CPU to write kernels for that tvm.compile builds with ``target``."""
    target = _as_dict(target)
    if names_no_mcpu(target):
        target["mcpu"] = "generic"
    return make_target(target)


def names_no_mcpu(target) -> bool:
    """An llvm target without mcpu: tvm.compile builds LLVM's generic CPU for it (as_compiled)."""
    target = _as_dict(target)
    return target.get("kind") == "llvm" and not target.get("mcpu")


def host_arch(triple) -> bool:
    """An LLVM triple (or none: the host's) of this machine's architecture."""
    if not triple:
        return True
    arch, host = str(triple).split("-")[0], platform.machine()
    return arch == host or {arch, host} <= {"aarch64", "arm64"}


def runs_here(target) -> bool:
    """Code for ``target`` is of this machine's architecture (it loads here; whether this CPU
    has every instruction the target's mcpu/mattr allow is not checked)."""
    return host_arch(make_target(target).attrs.get("mtriple"))


def target_triple(target) -> str:
    """The target's LLVM triple (its ``mtriple``, else this machine's)."""
    t = make_target(target)
    return str(t.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())


def cross_compiler(target=None, cc: str | None = None):
    """The ``fcompile`` that ``export_library`` needs to link a library of ``target``: None when
    the target is this machine's architecture (TVM's default: the host's compiler), else TVM's
    cross_compiler around ``cc``, the environment's TVMS_CROSS_CC, or the first of
    ``<mtriple>-gcc`` and ``<arch>-linux-gnu-gcc`` found on PATH (Debian's
    gcc-aarch64-linux-gnu is ``aarch64-linux-gnu-gcc``). Raises CrossCompilerError naming what
    to install or set when none is found.

    A fresh function per call: TVM's cross_compiler appends each call's options to the list it
    was made with."""
    t = make_target(target)
    if host_arch(t.attrs.get("mtriple")) and not cc:
        return None
    from tvm.support import cc as tvm_cc

    triple = target_triple(t)
    named = cc or os.environ.get(CROSS_CC_ENV, "").strip()
    if named:
        if shutil.which(named.split()[0]) is None:
            source = "" if cc else f" (from {CROSS_CC_ENV})"
            raise CrossCompilerError(f"cross compiler {named!r}{source} is not on PATH")
        compiler = named.split()
        return tvm_cc.cross_compiler(compiler[0], options=compiler[1:])
    arch = triple.split("-")[0]
    tried = list(dict.fromkeys([f"{triple}-gcc", f"{arch}-linux-gnu-gcc"]))
    for name in tried:
        if shutil.which(name):
            return tvm_cc.cross_compiler(name, options=[])
    package = " (Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu)" if arch in ("aarch64", "arm64") else ""
    raise CrossCompilerError(f"the target's triple {triple} is not this machine's ({platform.machine()}): linking its "
                       f"library needs a cross compiler, and none of {', '.join(tried)} is on PATH{package}; "
                       f"or name one with {CROSS_CC_ENV}=COMPILER")


def export_library(module, path: str, target=None, cc: str | None = None) -> str:
    """``module.export_library(path)`` (an Executable or a runtime Module), linked for ``target``
    (None: make_target's default) by cross_compiler(target, cc) when it is another
    architecture's. Returns ``path``."""
    fcompile = cross_compiler(target, cc)
    if fcompile is None:
        module.export_library(path)
    else:
        module.export_library(path, fcompile=fcompile)
    return path


def target_key(target) -> str:
    """A folder name for a target: kind-mcpu-Ncores (used for shipped schedules)."""
    t = make_target(target)
    mcpu = t.attrs.get("mcpu", "generic")
    cores = t.attrs.get("num-cores", 0)
    return f"{t.kind.name}-{mcpu}-{int(cores)}c"


def set_num_threads(n: int | None) -> int:
    """Use ``n`` threads in TVM's pool (None or 0: all cores). TVM defaults to half the vCPUs on x86."""
    if n is not None and (isinstance(n, bool) or int(n) < 0):
        raise ValueError(f"threads must be a count of threads (0: all cores), got {n!r}")
    n = int(n or os.cpu_count() or 1)
    os.environ["TVM_NUM_THREADS"] = str(n)
    # the pool is created lazily; once it exists it can only be re-sized by config_threadpool
    tvm.get_global_func("runtime.config_threadpool")(0, n)
    return n
