"""The emulated ARM bench (tools/arm_rpc.sh) as the ARM tests use it: found, brought up, or a skip.

The tests marked ``arm`` run only when asked for (``-m arm``, or TVMS_ARM_TESTS=1 with any
selection): under qemu a kernel runs 10-50x slower than here and a model compiles for minutes,
which the default run must not pay. Asked for, they use

- a bench already up (its server or tracker answers on the ports tools/arm_rpc.sh uses): left up;
- else the cached arm64 root: brought up by ``tools/arm_rpc.sh up`` (about a minute: TVM's
  import under qemu) and taken down after the session;
- else, with TVMS_ARM_BUILD=1, the root is built first (about 5-10 minutes, then cached);
- otherwise they skip, saying which of these is missing.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "arm_rpc.sh"
TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 2}


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


PORT = int(_env("TVMS_ARM_PORT", "9190"))
TRACKER_PORT = int(_env("TVMS_ARM_TRACKER_PORT", "9290"))
KEY = _env("TVMS_ARM_KEY", "arm64")
ROOT = Path(_env("TVMS_ARM_ROOT", str(Path(_env("XDG_CACHE_HOME", str(Path.home() / ".cache")))
                                       / "tvm_sparseconv" / "arm64-root")))


def asked_for(config) -> bool:
    """The arm tests were selected by name (-m arm ...) or TVMS_ARM_TESTS=1."""
    return "arm" in (config.getoption("markexpr") or "") or os.environ.get("TVMS_ARM_TESTS") == "1"


def _server_answers() -> bool:
    from tvm import rpc

    try:
        rpc.connect("127.0.0.1", PORT, session_timeout=60).cpu().exist
        return True
    except Exception:
        return False


def _tracker_has_servers() -> bool:
    from tvm import rpc

    try:
        queue = rpc.connect_tracker("127.0.0.1", TRACKER_PORT).summary()["queue_info"]
        return queue.get(KEY, {}).get("free", 0) > 0
    except Exception:
        return False


@dataclass
class Bench:
    """Where the emulated ARM CPU answers: a server (host, port), or a tracker (host, port, key)."""

    host: str
    port: int
    key: str | None = None

    def connect(self):
        """An RPC session on an emulated server (from the tracker when there is one)."""
        from tvm import rpc

        if self.key is None:
            return rpc.connect(self.host, self.port, session_timeout=1200)
        return rpc.connect_tracker(self.host, self.port).request(self.key, priority=1, session_timeout=1200)


def bring_up(request, tracker: bool) -> Bench:
    """The bench of one mode (a plain server, or a tracker with two servers) for the session;
    skips with the reason when it cannot be had."""
    if not asked_for(request.config):
        pytest.skip("emulated-ARM test: runs with -m arm or TVMS_ARM_TESTS=1 (tools/arm_rpc.sh, docs/arm.md)")
    bench = Bench("127.0.0.1", TRACKER_PORT, KEY) if tracker else Bench("127.0.0.1", PORT)
    if (_tracker_has_servers if tracker else _server_answers)():
        return bench
    if os.geteuid() != 0:
        pytest.skip("no emulated ARM bench is up, and bringing one up (chroot, mount) needs root")
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        # every worker would start the one server on the same port and stop it when its own tests
        # end, under the other worker's session
        pytest.fail("the emulated ARM bench is not up and pytest-xdist runs several workers, which would each "
                    "bring it up and take it down: run the arm tests without -n")
    if not (ROOT / ".tvms-venv").is_file() and os.environ.get("TVMS_ARM_BUILD") != "1":
        pytest.skip(f"no emulated ARM bench is up and no arm64 root is cached at {ROOT}: build it with "
                    "`tools/arm_rpc.sh root` (5-10 minutes, once) or set TVMS_ARM_BUILD=1")
    mode = ["--tracker"] if tracker else []
    res = subprocess.run(["bash", str(SCRIPT), "up", *mode], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        pytest.fail(f"tools/arm_rpc.sh up {' '.join(mode)} failed:\n{res.stderr[-3000:]}")
    request.addfinalizer(lambda: subprocess.run(["bash", str(SCRIPT), "down", "--tracker" if tracker else "--server"],
                                                capture_output=True, timeout=300))
    return bench
