"""worker.py: a crash, a hang or an exception in one job does not end the caller; layer and tune
measure candidates through it.

The jobs below are module-level functions of this test module: the spawned child imports it by
name, finding it because "spawn" gives the child this process's sys.path (tests/ is on it).
"""
import importlib
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


def test_a_parent_killed_while_its_child_starts_leaves_no_file(tmp_path):
    """The child's stderr file has no name from the start: a parent killed with SIGKILL while its
    child imports TVM (a tune killed outright) leaves no file in the temp folder."""
    import signal
    import subprocess
    import sys

    script = ("import sys, tempfile, numpy as np; tempfile.tempdir = sys.argv[1]\n"
              "from tvm_sparseconv.worker import Worker\n"
              "if __name__ == '__main__':\n"
              "    print('calling', flush=True); Worker(timeout=60).call(np.add, 1, 2)\n")
    p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "calling"
    time.sleep(0.3)  # the child is importing TVM (seconds): the window the file used to have a name
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    time.sleep(1)  # the child dies with its parent
    assert not list(tmp_path.iterdir())


def test_a_child_that_never_starts_is_an_error_and_leaves_nothing(monkeypatch, tmp_path):
    """A spawn that fails before the child exists (a script without the __main__ guard) raises
    its error; the worker closes cleanly after it (it used to fail at exit, joining a process
    that never started), leaves no stderr file, and starts a child on the next job."""
    import multiprocessing.context
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real = multiprocessing.context.SpawnProcess.start

    def refuse(self):
        raise RuntimeError("An attempt has been made to start a new process before ...")

    w = Worker(timeout=60)
    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", refuse)
    with pytest.raises(RuntimeError, match="start a new process"):
        w.call(pid_and_sum, np.ones(2, np.float32), np.ones(2, np.float32))
    assert w.pid is None and not list(tmp_path.iterdir())
    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", real)
    pid, total = w.call(pid_and_sum, np.ones(2, np.float32), np.ones(2, np.float32))
    assert total == 4.0 and pid != os.getpid()
    w.close()
    w.close()  # twice: nothing left to stop


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
                                                            search="exhaustive", candidate_timeout=0.01),
              log=said.append)
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


# -- whole-model builds: the compile and profile commands --------------------------------------

COMPILE = importlib.import_module("tvm_sparseconv.compile")  # the package's `compile` is the function

def abort_in_codegen(model, plan, target, database, path, cc=None):
    """compile._compile_to with tvm.compile replaced, in this child (which then dies), by LLVM's
    fatal error in the function of layer conv001, as LLVM reports one ("In function: ...")."""
    import tvm

    from tvm_sparseconv.stages import kernel_table

    def fatal(mod, target=None, **kwargs):
        name = next(n for n, (layers, _) in kernel_table(mod).items() if "conv001" in layers)
        abort_like_llvm(f"Cannot select: t7: v16f32 = X86ISD::VPERMV3 t2, t4, t6\nIn function: {name}_compute_")

    tvm.compile = fatal
    return COMPILE._compile_to(model, plan, target, database, path, cc)


def abort_at_once(*args):
    abort_like_llvm("Cannot select: test")


def run_main(args, capsys) -> tuple[int, list[str]]:
    from tvm_sparseconv.cli import main

    code = main(args)
    return code, capsys.readouterr().err.splitlines()


def test_compile_command_survives_an_llvm_abort_and_names_the_layer(tmp_path, monkeypatch, capsys):
    from conftest import small_onnx

    model = small_onnx(tmp_path / "small.onnx")
    monkeypatch.setattr(COMPILE, "_compile_to", abort_in_codegen)
    out = tmp_path / "out" / "model.so"
    code, err = run_main(["compile", model, "--algorithm", "dense", "-o", str(out)], capsys)
    assert code == 1
    first = next(i for i, l in enumerate(err) if l.startswith("tvm-sparseconv: error:"))
    assert err[first] == ("tvm-sparseconv: error: building layer conv001 (dense): worker killed by SIGABRT: "
                          "LLVM ERROR: Cannot select: t7: v16f32 = X86ISD::VPERMV3 t2, t4, t6")
    tail = err[first + 1:]
    assert tail[0] == "the worker's last lines on stderr:"
    assert tail[1].startswith("  LLVM ERROR: Cannot select: t7") and tail[2].startswith("  In function: dense_")
    assert tail[2].endswith("_compute_") and tail[3] == "  PLEASE submit a bug report"
    assert not any("Traceback" in l for l in err)
    assert os.listdir(out.parent) == []  # neither a library nor the build's temp folder


def test_profile_command_survives_an_llvm_abort(tmp_path, monkeypatch, capsys):
    from conftest import small_onnx

    model = small_onnx(tmp_path / "small.onnx")
    np.save(tmp_path / "x.npy", np.ones((1, 4, 9, 9), np.float32))
    monkeypatch.setattr(COMPILE, "_compile_to", abort_at_once)
    code, err = run_main(["profile", model, "--inputs", str(tmp_path / "x.npy")], capsys)
    assert code == 1
    # no kernel table yet: what is known is the plan's algorithm (profile builds the model dense)
    assert "tvm-sparseconv: error: building the model (dense): worker killed by SIGABRT: " \
           "LLVM ERROR: Cannot select: test" in err
    tail = err[err.index("the worker's last lines on stderr:") + 1:]
    # from LLVM's message on, then the Python stack faulthandler dumped at the abort
    assert tail[:3] == ["  LLVM ERROR: Cannot select: test", "  PLEASE submit a bug report",
                        "  Fatal Python error: Aborted"]
    assert any("abort_at_once" in l for l in tail)


def test_compile_command_writes_a_library_that_runs_alone(tmp_path, capsys):
    """The library `compile` exported from its worker, run in a fresh process with its sidecar,
    against the same plan compiled in this process and against onnxruntime."""
    import subprocess
    import sys

    import onnxruntime as ort
    import tvm
    from tvm import relax

    from conftest import small_onnx
    from tvm_sparseconv.api import compile as tvms_compile

    model = small_onnx(tmp_path / "small.onnx")
    x = activation(Conv2DSpec.from_shapes((1, 4, 9, 9), (8, 4, 3, 3), 1, 1), 0.5)
    np.save(tmp_path / "x.npy", x)
    lib = tmp_path / "out" / "model.so"
    code, _ = run_main(["compile", model, "--algorithm", "halo", "-o", str(lib)], capsys)
    assert code == 0
    assert sorted(os.listdir(lib.parent)) == ["model.so", "model.so.json"]
    assert json.loads((tmp_path / "out" / "model.so.json").read_text())["layers"] == \
        {"conv000": "halo", "conv001": "halo"}
    run = ("import sys, numpy as np; from tvm_sparseconv.runner import load; "
           "np.save(sys.argv[3], load(sys.argv[1])(np.load(sys.argv[2])))")
    subprocess.run([sys.executable, "-c", run, str(lib), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   check=True)
    y = np.load(tmp_path / "y.npy")
    here = relax.VirtualMachine(tvms_compile(model, algorithm="halo"), tvm.cpu())["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose(y, here.numpy(), rtol=1e-6, atol=1e-6)
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)

    # `run` on a library cut short (dlopen would die of SIGBUS), on a file that is no library,
    # and on the library with its sidecar corrupt: clear errors
    bad = tmp_path / "bad" / "model.so"
    bad.parent.mkdir()
    whole = lib.read_bytes()
    for content, said in ((whole[:4096], "is cut short (its headers reach byte"), (whole[:-1], "is cut short"),
                          (b"not a library", "is not a library this TVM can run: ")):
        bad.write_bytes(content)
        code, err = run_main(["run", str(bad), "--inputs", str(tmp_path / "x.npy")], capsys)
        assert code == 2 and err[-1].startswith(f"tvm-sparseconv: error: {bad} {said}"), err[-3:]
    (tmp_path / "out" / "model.so.json").write_text("{not json")
    code, err = run_main(["run", str(lib), "--inputs", str(tmp_path / "x.npy")], capsys)
    assert code == 2 and err[-1].startswith(f"tvm-sparseconv: error: {lib}.json is not a tvm-sparseconv model "
                                            "description")


def meet_then_compile(rendezvous: str, model, plan, target, database, path, cc=None):
    """compile._compile_to that first waits (up to 2 minutes) until the other build has started
    too, so that both can get past it only side by side; then a plan with a halo layer dies as
    LLVM does, and the others compile."""
    open(os.path.join(rendezvous, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 120
    while len(os.listdir(rendezvous)) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the other build never started")
        time.sleep(0.05)
    if any(l["algorithm"] == "halo" for l in plan["layers"]):
        abort_like_llvm("Cannot select: build_many test")
    return COMPILE._compile_to(model, plan, target, database, path, cc)


def test_build_many_compiles_side_by_side_and_keeps_what_one_crash_does_not_stop(tmp_path, monkeypatch):
    import functools

    import onnxruntime as ort
    import tvm

    from conftest import small_onnx
    from tvm_sparseconv.compile import build_jobs, build_many, resolve_plan
    from tvm_sparseconv.frontend import load_model

    if build_jobs(2) < 2:
        pytest.skip("one core, or jobs in this process: build_many builds one at a time")
    path = small_onnx(tmp_path / "small.onnx")
    m = load_model(path)
    (tmp_path / "meet").mkdir()
    monkeypatch.setattr(COMPILE, "_compile_to", functools.partial(meet_then_compile, str(tmp_path / "meet")))
    plans = {"halo": resolve_plan(m, None, "halo"), "dense": resolve_plan(m, None, "dense")}
    out = {name: b for name, b, seconds in build_many(m, plans, None, paths={"dense": str(tmp_path / "d.so")})}
    assert len(os.listdir(tmp_path / "meet")) == 2  # two processes, each waiting for the other
    assert isinstance(out["halo"], CandidateCrash) and "LLVM ERROR: Cannot select: build_many test" in str(out["halo"])
    x = np.random.default_rng(1).standard_normal((1, 4, 9, 9)).astype("float32")
    y = out["dense"].vm()["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert os.path.isfile(tmp_path / "d.so") and out["dense"].applied == {"conv000": "dense", "conv001": "dense"}
