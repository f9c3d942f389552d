"""The tuning log: one JSON object per line, appended and flushed as each measurement ends.

Line 1 is a header naming the format, version, model, target and cache ("fresh", "warm" or
"cold": how candidates were timed, CompiledLayer.time); every later line is one
measured candidate: {"workload", "algorithm", "knobs", "time_ms", "encode_ms",
"multiply_ms", "max_abs_error", "error"}, a phase marker {"done": "<phase>"}, or the
interleaved re-timing of one workload's close candidates {"recheck": "<workload>", "rounds",
"candidates": [{"algorithm", "knobs", "times_ms": [one per round]} or {..., "error"}]}
(Tuner.recheck; ``timed`` gives the workload's records with those times), or the same with
"phase": "layouts", the re-timing of its fastest candidate per layout pair (Tuner.layouts). A crash
or Ctrl-C loses at most the measurement under way; ``--resume`` reads the log back and
repeats nothing it holds (a last line cut short by a kill is dropped, with a warning). A log
of another format, model, target or cache is refused.

The other files of a run folder are written whole or not at all (``cache.write_atomically``), and
the JSON-lines files that others append to (MetaSchedule's database) are mended the same way
on resume (``drop_torn_tail``).
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..cache import write_atomically

LOG_FORMAT = "tvm-sparseconv-tuning-log"
LOG_VERSION = 1


class TuningLogError(ValueError):
    """A corrupt or foreign tuning log."""


def knob_key(knobs: dict) -> str:
    return json.dumps(knobs, sort_keys=True)


def drop_torn_tail(path: str, warn=lambda s: None) -> None:
    """A JSON-lines file whose last line a kill cut short: that line is dropped (the file
    rewritten atomically) and ``warn`` told; a whole last line that lacks its newline gets one.
    Lines before the last are the reader's to check."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    head, _, last = data.rstrip(b"\n").rpartition(b"\n")
    if not last.strip():
        return
    try:
        json.loads(last)
        if data.endswith(b"\n"):
            return
        keep = data + b"\n"
    except (ValueError, UnicodeDecodeError):
        warn(f"{path}: its last line was cut short by an interrupt; dropped ({len(last)} bytes)")
        keep = head + b"\n" if head else b""
    write_atomically(path, lambda f: f.write(keep), binary=True)


class TuningLog:
    """The log at ``path`` (read back if it exists); ``warn`` hears of a dropped torn line."""

    def __init__(self, path: str, header: dict, warn=lambda s: None):
        self.path = path
        self.warn = warn
        self.header = {"format": LOG_FORMAT, "version": LOG_VERSION, **header}
        self.records: list[dict] = []
        self.done_phases: set[str] = set()
        self.rechecks: dict[str, tuple[int, dict]] = {}  # workload -> (len(records) when it was logged, record)
        self.layout_rechecks: dict[str, dict] = {}  # workload -> its "phase": "layouts" recheck record
        if os.path.exists(path):
            self._read()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_atomically(path, lambda f: f.write(json.dumps(self.header) + "\n"))

    @classmethod
    def read(cls, path: str) -> "TuningLog":
        """An existing log, whatever model and target it was made for."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tuning log not found: {path}")
        try:
            with open(path) as f:
                head = json.loads(f.readline())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TuningLogError(f"{path} is not a tvm-sparseconv tuning log (bad header: {e})") from e
        if not isinstance(head, dict):
            raise TuningLogError(f"{path} is not a tvm-sparseconv tuning log")
        return cls(path, {k: v for k, v in head.items() if k not in ("format", "version")})

    def _read(self) -> None:
        drop_torn_tail(self.path, self.warn)
        with open(self.path) as f:
            lines = f.read().split("\n")
        try:
            head = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError) as e:
            raise TuningLogError(f"{self.path} is not a tvm-sparseconv tuning log (bad header: {e})") from e
        if not isinstance(head, dict) or head.get("format") != LOG_FORMAT:
            raise TuningLogError(f"{self.path} is not a tvm-sparseconv tuning log")
        if head.get("version") != LOG_VERSION:
            raise TuningLogError(f"{self.path} has log version {head.get('version')}, this reads {LOG_VERSION}")
        head.setdefault("cache", "warm")  # logs from before --cold were timed warm
        for k in ("model", "target", "cache"):
            if k in self.header and head.get(k) != self.header.get(k):
                hint = f"resume with --cache {head[k]}" if k == "cache" else "use another --out or run dir"
                raise TuningLogError(f"{self.path} was made for {k} {head.get(k)!r}, not {self.header.get(k)!r}: {hint}")
        body = [l for l in lines[1:] if l.strip()]
        for i, line in enumerate(body):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TuningLogError(f"{self.path}: line {i + 2} is corrupt ({e})") from e
            if "done" in rec:
                self.done_phases.add(rec["done"])
            elif "recheck" in rec:
                if not _is_recheck(rec):
                    raise TuningLogError(f"{self.path}: line {i + 2} is not a recheck record")
                self._add_recheck(rec)
            elif not {"workload", "algorithm", "knobs"} <= set(rec):
                raise TuningLogError(f"{self.path}: line {i + 2} is not a measurement record")
            else:
                self.records.append(rec)

    def append(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if "done" in rec:
            self.done_phases.add(rec["done"])
        elif "recheck" in rec:
            self._add_recheck(rec)
        else:
            self.records.append(rec)

    def _add_recheck(self, rec: dict) -> None:
        if rec.get("phase") == "layouts":
            self.layout_rechecks[rec["recheck"]] = rec
        else:
            self.rechecks[rec["recheck"]] = (len(self.records), rec)

    def find(self, workload: str, algorithm: str, knobs: dict) -> dict | None:
        k = knob_key(knobs)
        for r in self.records:
            if r["workload"] == workload and r["algorithm"] == algorithm and knob_key(r["knobs"]) == k:
                return r
        return None

    def _rounds(self, rec: dict, layouts: bool = True) -> list[float] | None:
        """The recheck rounds of a measured record ({"workload", "algorithm", "knobs"}), None if
        it had none: those of the layouts phase's recheck if it was in it (the later) and
        ``layouts``, else those of Tuner.recheck."""
        key = knob_key(rec["knobs"])
        entry = self.rechecks.get(rec["workload"])
        for r in ([self.layout_rechecks.get(rec["workload"])] if layouts else []) + [entry[1] if entry else None]:
            found = next((c["times_ms"] for c in (r["candidates"] if r else []) if c.get("times_ms")
                          and c["algorithm"] == rec["algorithm"] and knob_key(c["knobs"]) == key), None)
            if found:
                return found
        return None

    def median_ms(self, rec: dict, layouts: bool = True) -> float | None:
        """A measured record's time: the median of its recheck rounds if it was re-timed (those
        of the layouts phase only with ``layouts``), else its single time."""
        rounds = self._rounds(rec, layouts)
        return float(np.median(rounds)) if rounds else rec.get("time_ms")

    def timed(self, workload: str) -> list[dict]:
        """The records of ``workload``, as the selection sees them: where its close candidates were
        re-timed in rounds (Tuner.recheck), those candidates, each with the median of its rounds as
        "time_ms" ("single_ms": its first time, "rounds_ms": the rounds), in place of every record
        logged before the recheck (those it left out were further from the fastest than its band);
        the records logged after it (a resumed run with more budget) as they are."""
        mine = [r for r in self.records if r["workload"] == workload]
        at, rec = self.rechecks.get(workload, (0, {"candidates": []}))
        if not any(c.get("times_ms") for c in rec["candidates"]):
            return mine  # none, or it failed as a whole: the single times stand
        before = {id(r) for r in self.records[:at]}
        out = []
        for r in mine:
            rounds = self._rounds(r, layouts=False)
            if id(r) not in before:
                out.append(r)
            elif rounds:
                out.append({**r, "time_ms": float(np.median(rounds)), "single_ms": r.get("time_ms"),
                            "rounds_ms": rounds})
        return out

    def mark_done(self, phase: str) -> None:
        if phase not in self.done_phases:
            self.append({"done": phase})


def _is_recheck(rec: dict) -> bool:
    c = rec.get("candidates")
    return isinstance(rec["recheck"], str) and rec.get("phase", "layouts") == "layouts" and isinstance(c, list) and all(
        isinstance(x, dict) and isinstance(x.get("algorithm"), str) and isinstance(x.get("knobs"), dict)
        and (isinstance(x.get("times_ms"), list) or "error" in x) for x in c)
