"""worker.py: a crash, a hang or an exception in one job does not end the caller; layer and tune
measure candidates through it.

The jobs below are module-level functions of this test module: the spawned child imports it by
name, finding it because "spawn" gives the child this process's sys.path (tests/ is on it).
"""
import json
import os
import time

import numpy as np
import pytest

from conftest import activation, weight
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.frontend import Model
from tvm_sparseconv.layer import measure_algorithm, nonzero_macs, run_layer
from tvm_sparseconv.reference import dense_conv2d
from tvm_sparseconv.tune.tuner import TuneConfig, Tuner
from tvm_sparseconv.tune.workloads import Workload
from tvm_sparseconv.worker import Cached, CandidateCrash, Worker, last_error_line


def abort_like_llvm(note: str) -> None:
    """What LLVM's instruction selector does on a fatal error: a line on fd 2, then abort()."""
    os.write(2, f"some earlier noise\nLLVM ERROR: {note}\nPLEASE submit a bug report\n".encode())
    os.abort()


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def sleep_then(seconds: float, value):
    time.sleep(seconds)
    return value


def raise_value_error(msg: str):
    raise ValueError(msg)


def pid_and_sum(a: np.ndarray, b: np.ndarray) -> tuple:
    return os.getpid(), float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def worker():
    with Worker(timeout=60) as w:
        yield w


def test_abort_raises_candidate_crash_then_the_worker_recovers(worker):
    a = np.arange(6, dtype=np.float32)
    first, _ = worker.call(pid_and_sum, a, a)
    with pytest.raises(CandidateCrash) as e:
        worker.call(abort_like_llvm, "Cannot select: test")
    msg = str(e.value)
    assert msg == "worker killed by SIGABRT: LLVM ERROR: Cannot select: test" and "\n" not in msg
    assert worker.pid is None  # the dead child is gone; the next job starts a new one
    pid, total = worker.call(pid_and_sum, a, a)
    assert total == 30.0 and pid != first and pid != os.getpid()


def test_segfault_raises_candidate_crash(worker):
    with pytest.raises(CandidateCrash, match=r"^worker killed by SIGSEGV: Fatal Python error: Segmentation fault$"):
        worker.call(segfault)
    assert worker.call(sleep_then, 0, "back") == "back"


def test_timeout_kills_the_hung_job_then_the_worker_recovers(worker):
    worker.call(sleep_then, 0, None)  # started: the timeout below times the job, not TVM's import
    t0 = time.monotonic()
    with pytest.raises(CandidateCrash, match=r"^timed out after 0.5 s$"):
        worker.call(sleep_then, 30, None, timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert worker.call(sleep_then, 0, "back") == "back"


def test_exception_comes_back_and_keeps_the_child(worker):
    pid = worker.call(os.getpid)
    with pytest.raises(ValueError, match="bad knob"):
        worker.call(raise_value_error, "bad knob")
    assert worker.call(os.getpid) == pid == worker.pid


def test_cached_arrays_are_sent_once_and_replaced_when_they_change(worker):
    a, b = np.ones(1000, np.float32), np.full(3, 2.0, np.float32)
    assert worker.call(pid_and_sum, Cached(a), b)[1] == 1006.0
    held = dict(worker._held)
    assert list(held.values())[0] is a
    assert worker.call(pid_and_sum, Cached(a), b)[1] == 1006.0  # the child's copy of a
    c = np.zeros(1000, np.float32)
    assert worker.call(pid_and_sum, Cached(c), b)[1] == 6.0
    with pytest.raises(ValueError):  # after an error every Cached value is sent again
        worker.call(raise_value_error, Cached(c))
    assert worker.call(pid_and_sum, Cached(c), Cached(b))[1] == 6.0


def test_in_process_mode_runs_here():
    w = Worker(isolate=False)
    assert w.call(pid_and_sum, Cached(np.ones(2)), np.ones(1))[0] == os.getpid()
    assert w.pid is None


def test_last_error_line_prefers_llvm_then_errors():
    assert last_error_line("a\nLLVM ERROR: x\nFatal Python error: Aborted\n\n") == "LLVM ERROR: x"
    assert last_error_line("File errors.py\nTVMError: y\n  in _error_handler\n") == "TVMError: y"
    assert last_error_line("just\nthis\n") == "this" and last_error_line("") == ""


# -- through layer and tune -------------------------------------------------------------------

SPEC = Conv2DSpec.from_shapes((1, 8, 10, 10), (16, 8, 3, 3), 1, 1, 1)


def test_layer_through_the_worker_matches_numpy():
    x, w = activation(SPEC, 0.3), weight(SPEC)
    report = run_layer(SPEC, x, w, algorithms=("halo", "dense"), repeat=2)  # the shared worker
    assert [r["algorithm"] for r in report["results"]] == ["halo", "dense"]
    assert all(r["error"] is None and r["max_abs_error"] < 1e-4 and r["time_ms"] > 0 for r in report["results"])
    # the child compares with the reference it was sent: a shifted one shows as an error of 1
    ref = dense_conv2d(SPEC, x, w)
    with Worker(timeout=120) as wk:
        args = (SPEC, x, w)
        rec = measure_algorithm("pixcsr", *args, ref + 1, nonzero_macs(SPEC, x), worker=wk, repeat=2)
        assert rec.error is None and abs(rec.max_abs_error - 1) < 1e-4 and rec.knobs


def test_layer_records_a_hung_candidate_and_runs_the_others():
    x, w = activation(SPEC, 0.3), weight(SPEC)
    ref, said = dense_conv2d(SPEC, x, w), []
    with Worker(timeout=0.01) as wk:  # no build finishes in 10 ms: each candidate "hangs"
        rec = measure_algorithm("halo", SPEC, x, w, ref, 100, worker=wk, log=said.append)
        assert rec.error == "timed out after 0.01 s" and rec.time_ms is None and rec.knobs
        assert said and said[0].startswith("halo {") and said[0].endswith("candidate failed: timed out after 0.01 s")
        wk.timeout = 120
        assert measure_algorithm("halo", SPEC, x, w, ref, 100, worker=wk).max_abs_error < 1e-4


def test_tuner_records_a_crashed_candidate_and_goes_on(tmp_path):
    x, w = activation(SPEC, 0.3), weight(SPEC)
    model = Model(None, "x", SPEC.x_shape, "NCHW", "tiny")  # measure() reads only the trials log
    said = []
    t = Tuner(model, [x], str(tmp_path), config=TuneConfig(knob_trials=1, algorithms=("halo", "dense"),
                                                            candidate_timeout=0.01), log=said.append)
    wl = Workload("tiny", SPEC, False, ["conv0"], w, None, x, 0.3)
    t.measure([wl])
    recs = [json.loads(l) for l in open(tmp_path / "trials.jsonl").read().splitlines()[1:]]
    assert [r["algorithm"] for r in recs] == ["halo", "dense"]  # the second tried after the first crashed
    assert all(r["error"] == "CandidateCrash: timed out after 0.01 s" and "time_ms" not in r for r in recs)
    assert len(said) == 2 and all(s.startswith("tiny ") and "candidate crashed" in s for s in said)
    assert "tiny halo {" in said[0]
    # the same tuner goes on: with time enough the next candidates are measured
    t.cfg.candidate_timeout, t.cfg.algorithms = 300, ("pixcsr",)
    t.measure([wl])
    ok = [r for r in t.trials.records if r["algorithm"] == "pixcsr"]
    assert ok and all(r["time_ms"] > 0 and r["max_abs_error"] < 1e-4 for r in ok)
