"""Ctrl-C that reaches us as another error.

A KeyboardInterrupt raised while TVM runs Python code of ours (a Relax pass, a schedule callback)
or checks for signals inside its C++ comes back to the caller as a RuntimeError with an empty
message: tvm-ffi forwards a Python error by kind and has none for KeyboardInterrupt. A handler
that catches a failed candidate or an unschedulable loop (``except Exception``) would then take
the Ctrl-C for that failure and go on. ``watching()`` installs a SIGINT handler that remembers
the signal before raising as Python's own does; ``check()``, called first in such handlers,
raises the KeyboardInterrupt again once one was seen.
"""
from __future__ import annotations

import contextlib
import signal
import threading

_seen = False


def _handler(signum, frame):
    global _seen
    _seen = True
    signal.default_int_handler(signum, frame)


def check() -> None:
    """Raise KeyboardInterrupt if SIGINT arrived while watching (whatever error TVM made of it)."""
    if _seen:
        raise KeyboardInterrupt


@contextlib.contextmanager
def watching():
    """SIGINT remembered (for check) inside the block; the handler that was there is restored
    after. Only in the main thread, and only over Python's default handler: a program that
    installed its own keeps it."""
    global _seen
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _seen = False
    signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _seen = False
