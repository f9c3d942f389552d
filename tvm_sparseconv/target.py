"""Targets and threads: TVM's conventions (dict targets) with this machine's defaults."""
from __future__ import annotations

import json
import os
import platform

import tvm


def host_cpu() -> str:
    """LLVM's name for this CPU (``"native"`` would silently build generic code)."""
    return tvm.target.codegen.llvm_get_system_cpu()


def default_target(num_cores: int | None = None) -> dict:
    """This CPU as a dict target; MetaSchedule needs ``num-cores``."""
    return {"kind": "llvm", "mcpu": host_cpu(), "num-cores": int(num_cores or os.cpu_count() or 1)}


def make_target(target=None) -> tvm.target.Target:
    """None -> the environment's TVMS_TARGET (a JSON dict) if set, else this CPU; a dict, a JSON
    string, a bare kind ("llvm") or a Target.

    TVMS_TARGET lets a whole run (the tests, say) build for another CPU than the host's, e.g.
    '{"kind": "llvm", "mcpu": "haswell"}' for AVX2 code on an AVX-512 machine."""
    if target is None:
        env = os.environ.get("TVMS_TARGET", "").strip()
        return make_target(env) if env else tvm.target.Target(default_target())
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str) and target.strip().startswith("{"):
        target = json.loads(target)
    if isinstance(target, dict) and target.get("kind") == "llvm":
        target = dict(target)
        if host_arch(target.get("mtriple")):  # never the host's cpu name in a foreign triple
            target.setdefault("mcpu", host_cpu())
        target.setdefault("num-cores", os.cpu_count() or 1)
    return tvm.target.Target(target)


def host_arch(triple) -> bool:
    """An LLVM triple (or none: the host's) of this machine's architecture."""
    if not triple:
        return True
    arch, host = str(triple).split("-")[0], platform.machine()
    return arch == host or {arch, host} <= {"aarch64", "arm64"}


def target_key(target) -> str:
    """A folder name for a target: kind-mcpu-Ncores (used for shipped schedules)."""
    t = make_target(target)
    mcpu = t.attrs.get("mcpu", "generic")
    cores = t.attrs.get("num-cores", 0)
    return f"{t.kind.name}-{mcpu}-{int(cores)}c"


def set_num_threads(n: int | None) -> int:
    """Use ``n`` threads in TVM's pool (None: all cores). TVM defaults to half the vCPUs on x86."""
    n = int(n or os.cpu_count() or 1)
    os.environ["TVM_NUM_THREADS"] = str(n)
    # the pool is created lazily; once it exists it can only be re-sized by config_threadpool
    tvm.get_global_func("runtime.config_threadpool")(0, n)
    return n
