"""A progress line with ETA for long work (stderr; one line per update when not a terminal)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, phase: str, total: int, stream=None):
        self.phase, self.total, self.done = phase, max(int(total), 0), 0
        self.start = time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def eta_s(self) -> float | None:
        if self.done == 0:
            return None
        return (time.monotonic() - self.start) / self.done * (self.total - self.done)

    def step(self, what: str = "", n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        el = time.monotonic() - self.start
        eta = self.eta_s()
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        msg = (f"[{self.phase}] [{bar}] {self.done}/{self.total} elapsed {_hms(el)} ETA "
               f"{_hms(eta) if eta is not None else '?'} {what}")
        if self.tty:
            self.stream.write("\r" + msg[:150].ljust(150))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
