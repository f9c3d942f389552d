"""A tune killed at any point and resumed loses at most the unit under way and repeats none of
the finished ones: the `tune` command, SIGKILLed at seeded random points (by time, and inside
refine) and interrupted once with SIGINT, resumed each time until it completes."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

from conftest import activation, weight
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.api import compile as tvms_compile
from tvm_sparseconv.frontend import Model
from tvm_sparseconv.plan import Plan
from tvm_sparseconv.tune.log import TuningLog, drop_torn_tail
from tvm_sparseconv.tune.tuner import TuneConfig, Tuner
from tvm_sparseconv.tune.workloads import Workload

SEED = int(os.environ.get("TVMS_INTERRUPT_SEED", "20261202"))  # a failure names its seed: rerun with it
# few candidates, refine with 2 rounds: the whole tune is about a minute on 2 cores
SPEC = Conv2DSpec.from_shapes((1, 8, 10, 10), (16, 8, 3, 3), 1, 1, 1)
TUNE = ["--images", "skimage:astronaut", "--knob-trials", "1", "--algorithms", "dense,halo", "--top-k", "2",
        "--refine-rounds", "2", "--recheck-rounds", "2"]


class Tune:
    """One `python -m tvm_sparseconv.cli tune` process; a thread collects its stderr lines."""

    def __init__(self, model: str, *args: str):
        # SIGINT at its default in the child: a pytest-xdist worker ignores it, and an ignored
        # signal stays ignored across exec (Python then installs no KeyboardInterrupt handler)
        self.proc = subprocess.Popen([sys.executable, "-m", "tvm_sparseconv.cli", "tune", model, *TUNE, *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.err: list[str] = []
        self.reader = threading.Thread(target=lambda: self.err.extend(iter(self.proc.stderr.readline, "")))
        self.reader.start()
        self.started = time.monotonic()

    def wait_for(self, ready, poll: float = 0.2) -> None:
        """Until ``ready()``; the test fails if the process ends first."""
        while not ready():
            assert self.proc.poll() is None, f"the tune ended before the kill point:\n{''.join(self.err)}"
            time.sleep(poll)

    def stop(self, sig: int) -> int:
        os.kill(self.proc.pid, sig)
        return self.finish()

    def finish(self) -> int:
        code = self.proc.wait(timeout=600)
        self.reader.join()
        return code


def records(run_dir) -> list[dict]:
    """The measurements in trials.jsonl (a last line a kill cut short left out; no phase marker or
    recheck)."""
    out = []
    for line in open(os.path.join(run_dir, "trials.jsonl")).read().splitlines()[1:]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "workload" in rec:
            out.append(rec)
    return out


def refine_units(run_dir) -> dict | None:
    """refine.json's units as the run left them ("progress"), or None (none yet, or finished)."""
    try:
        with open(os.path.join(run_dir, "refine.json")) as f:
            return json.load(f).get("progress")
    except (OSError, ValueError):
        return None


def count_units(u: dict | None) -> int:
    if u is None:
        return 0
    return len(u["builds"]) + sum(len(lap) for lap in u["laps"]) + (u["mix_ms"] is not None) + \
        len(u["round_ms"])


@pytest.mark.slow
def test_tune_killed_at_random_points_resumes_to_a_valid_plan(small_model, tmp_path):
    path, m, xs = small_model
    rng = random.Random(SEED)
    out = str(tmp_path / "runs")
    said = []  # every run's stderr, for the failure message

    def runs_dir():
        dirs = os.listdir(out) if os.path.isdir(out) else []
        return os.path.join(out, dirs[0]) if dirs else None

    # 1: killed at a random time after the run folder has its log (profile or measure)
    t = Tune(path, "--out", out)
    t.wait_for(lambda: runs_dir() and os.path.exists(os.path.join(runs_dir(), "trials.jsonl")))
    run = runs_dir()
    time.sleep(rng.uniform(0, 15))
    kept = []  # (what, records before the kill)
    assert t.stop(signal.SIGKILL) == -signal.SIGKILL
    said += t.err
    kept.append(("kill 1", records(run)))
    profiled = os.path.exists(os.path.join(run, "profile.json"))

    # 2: resumed (a torn last line first: dropped with a warning), killed at a random time
    with open(os.path.join(run, "trials.jsonl"), "a") as f:
        f.write('{"workload": "1x3x224x224-m64')
    t = Tune(path, "--resume", run)
    time.sleep(rng.uniform(4, 18))
    assert t.stop(signal.SIGKILL) == -signal.SIGKILL
    said += t.err
    kept.append(("kill 2", records(run)))
    assert any("trials.jsonl: its last line was cut short by an interrupt; dropped" in l for l in t.err)
    assert not profiled or any(l.startswith("profile: done in an earlier run") for l in t.err), "".join(said)

    # 3: Ctrl-C at a random time once the tuner runs: a clean exit that says how to go on
    t = Tune(path, "--resume", run)
    t.wait_for(lambda: any(l.startswith("tuning ") for l in t.err))
    time.sleep(rng.uniform(1, 8))
    code = t.stop(signal.SIGINT)
    said += t.err
    assert code == 130, "".join(t.err)
    # the parent's last line; the worker shares the stderr pipe and may still be flushing a line of
    # its own when the parent exits, so the line is looked for among the last few
    said_last = [l.rstrip() for l in t.err[-3:]]
    assert f"interrupted: finished measurements are in {run}; continue with --resume {run}" in said_last, \
        "".join(t.err)
    assert not any("Traceback" in l for l in t.err), "".join(t.err)
    kept.append(("SIGINT", records(run)))

    # 4: killed inside refine, a seeded number of refine units (builds, laps, rounds) after
    # the point it reached before
    t = Tune(path, "--resume", run)
    before = count_units(refine_units(run))
    target = before + rng.randint(1, 4)
    t.wait_for(lambda: count_units(refine_units(run)) >= target)
    assert t.stop(signal.SIGKILL) == -signal.SIGKILL
    said += t.err
    units = refine_units(run)
    assert units is not None and count_units(units) >= target
    kept.append(("kill in refine", records(run)))

    for what, recs in kept:  # where the kills landed, shown when the test fails
        print(f"seed {SEED}: {what} with {len(recs)} measurements logged")
    print(f"seed {SEED}: killed in refine with {count_units(units)} units kept (from {before})")

    # 5: resumed to the end
    t = Tune(path, "--resume", run)
    code = t.finish()
    said += t.err
    assert code == 0, "".join(said)

    # no measurement twice, none lost
    final = records(run)
    keys = [(r["workload"], r["algorithm"], json.dumps(r["knobs"], sort_keys=True)) for r in final]
    assert len(keys) == len(set(keys)), "".join(said)
    for what, recs in kept:
        assert all(r in final for r in recs), f"{what}: a record lost (seed {SEED})"
    rechecked = [(r["recheck"], r.get("phase")) for line in open(os.path.join(run, "trials.jsonl")).read().splitlines()[1:]
                 for r in [json.loads(line)] if "recheck" in r]
    assert len(rechecked) == len(set(rechecked)), "".join(said)  # no layer re-timed twice in a phase
    # refine: the builds done before the kill were taken as they were, not compiled again
    report = json.load(open(os.path.join(run, "refine.json")))
    built = {b["name"]: b for b in report["builds"]}
    for name, rec in units["builds"].items():
        if "crash" not in rec:
            assert built[name]["built_at"] == rec["built_at"], f"{name} compiled again (seed {SEED}): " + "".join(t.err)
            assert any(l.rstrip().endswith(f"reused: {name}") for l in t.err)
            assert not any(l.rstrip().endswith(f"compiled: {name}") for l in t.err)
    for r, row in enumerate(units["round_ms"]):  # and the rounds timed before it kept
        assert all(report["round_ms"][n][r] == ms for n, ms in row.items())
    # the plan is whole and compiles to the model's output
    plan = Plan.load(os.path.join(run, "plan.json"))
    assert {l.algorithm for l in plan.layers} <= {"dense", "halo"}
    ex = tvms_compile(m, plan=plan)
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs[0])).numpy()
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {m.input_name: xs[0]})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)


def test_a_ctrl_c_that_tvm_hands_back_as_a_runtime_error_is_a_ctrl_c():
    """SIGINT inside a Python pass that TVM runs reaches the caller as a RuntimeError (tvm-ffi has
    no KeyboardInterrupt kind); under interrupt.watching, check() makes it a KeyboardInterrupt
    again, so that `except Exception` handlers (a failed candidate) do not swallow it."""
    from tvm_sparseconv import interrupt

    @tvm.transform.module_pass(opt_level=0, name="interrupted")
    def interrupted(mod, ctx):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)  # the handler runs here and raises
        return mod

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own (a pytest-xdist worker ignores it)
    try:
        interrupt.check()  # nothing seen: nothing raised
        with interrupt.watching():
            with pytest.raises(Exception) as e:
                interrupted(tvm.IRModule())
            assert not isinstance(e.value, KeyboardInterrupt)  # what TVM makes of it
            with pytest.raises(KeyboardInterrupt):
                interrupt.check()
        interrupt.check()  # outside the block it is forgotten
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    p = tmp_path / "log.jsonl"
    said = []
    torn = '{"c": '
    p.write_text('{"a": 1}\n{"b": 2}\n' + torn)
    drop_torn_tail(str(p), said.append)
    assert p.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert said == [f"{p}: its last line was cut short by an interrupt; dropped ({len(torn)} bytes)"]
    p.write_text('{"a": 1}\n{"b": 2}')  # whole, only its newline missing: kept, the newline added
    drop_torn_tail(str(p), said.append)
    assert p.read_text() == '{"a": 1}\n{"b": 2}\n' and len(said) == 1
    drop_torn_tail(str(tmp_path / "none.jsonl"), said.append)  # no file: nothing to do
    assert not (tmp_path / "none.jsonl").exists()
    # the tuning log too: a record cut short is dropped, the ones before it kept
    log = TuningLog(str(tmp_path / "trials.jsonl"), {"model": "m", "target": "t"})
    log.append({"workload": "w", "algorithm": "halo", "knobs": {"block": 2}, "time_ms": 1.0})
    torn = '{"workload": "w", "algorithm": "dense", "kn'
    with open(tmp_path / "trials.jsonl", "a") as f:
        f.write(torn)
    again = TuningLog(str(tmp_path / "trials.jsonl"), {"model": "m", "target": "t"}, warn=said.append)
    assert again.records == log.records and said[-1].endswith(f"dropped ({len(torn)} bytes)")


def test_metaschedule_resumes_with_the_trials_its_database_leaves(tmp_path, monkeypatch):
    """The MetaSchedule phase of a resumed run counts the records its database holds (a line
    cut short dropped) and asks MetaSchedule for the rest, with another seed; with none left it
    is done. MetaSchedule itself is replaced by a recorder: it is TVM's, and slow."""
    import tvm_sparseconv.tune.metaschedule as ms_mod

    calls = []
    monkeypatch.setattr(ms_mod, "tune_stages", lambda stages, target, work_dir, trials, seed, runner, names:
                        calls.append((len(stages), trials, seed)))
    x, w = activation(SPEC, 0.3), weight(SPEC)
    wl = Workload("tiny", SPEC, False, ["conv0"], w, None, x, 0.3)
    model = Model(None, "x", SPEC.x_shape, "NCHW", "tiny")  # the phase reads only the workloads
    db = tmp_path / "database"
    db.mkdir()
    (db / "database_workload.json").write_text('["w0"]\n')
    (db / "database_tuning_record.json").write_text("[0, [1]]\n[0, [2]]\n[0, [3]]\n[0, [4")

    def tuner(trials):
        said = []
        cfg = TuneConfig(trials=trials, algorithms=("direct",), seed=7)
        return Tuner(model, [x], str(tmp_path), config=cfg, log=said.append), said

    t, said = tuner(10)
    t.metaschedule([wl])
    assert calls == [(1, 7, 10)]  # the direct conv's one TE stage: 10 trials less the 3 whole records
    assert any("database_tuning_record.json: its last line was cut short" in s for s in said)
    assert (db / "database_tuning_record.json").read_text() == "[0, [1]]\n[0, [2]]\n[0, [3]]\n"
    assert "metaschedule" in t.trials.done_phases
    # a run killed with all its trials in the database: done, MetaSchedule not called
    (tmp_path / "trials.jsonl").unlink()
    t, said = tuner(3)
    t.metaschedule([wl])
    assert len(calls) == 1 and "metaschedule" in t.trials.done_phases
    assert said == ["MetaSchedule: done in an earlier run (3 trials in database/)"]
