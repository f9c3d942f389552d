"""Run candidate kernels in a child process, so that no candidate can end a long run.

Building or timing one candidate can end its process outright: LLVM's instruction selector
calls abort() (``LLVM ERROR: Cannot select ...``), a wrong kernel segfaults, a schedule hangs.
MetaSchedule runs its builders and runners in child processes for the same reason; ``layer``
and ``tune`` run each candidate's build, check and timing through a :class:`Worker`, and
``compile``, ``profile``, ``bench`` and ``refine`` each whole-model build (compile.build_isolated).

A Worker keeps one child process (multiprocessing "spawn": TVM's thread pool does not survive
a fork; it inherits the environment, TVM_NUM_THREADS included) and reuses it across jobs, as
starting it and importing TVM takes seconds. A job is a module-level function and picklable
arguments (targets as JSON strings, arrays as NumPy arrays); :meth:`Worker.call` returns its
result, and an exception the job raises is raised again in the caller, the child kept. When
the child dies (abort, segfault) or a job overruns its timeout, the call raises
:class:`CandidateCrash`, one line naming the signal and the child's last error line on stderr
(which goes to a nameless temp file for that, open in both processes; the exception's
``tail`` holds its last lines), and the next job starts a fresh child. On Linux the child dies
with the thread that started it (the first job's caller; the main thread in this package), so
that a tune killed outright leaves no child compiling on, nor a file behind.

Environment: ``TVMS_IN_PROCESS=1`` runs jobs in the calling process instead (debugging,
profilers); ``TVMS_CANDIDATE_TIMEOUT`` is the default per-job timeout in seconds (600).
"""
from __future__ import annotations

import atexit
import faulthandler
import fcntl
import math
import multiprocessing
import multiprocessing.util  # noqa: F401 (imported first so that our atexit hook runs before its)
from multiprocessing import reduction
import os
import pickle
import re
import signal
import sys
import tempfile
import traceback
import weakref

DEFAULT_TIMEOUT_S = 600.0
START_TIMEOUT_S = 120.0
_ERROR_LINE = re.compile(r"(?i)error\b")


class CandidateCrash(RuntimeError):
    """The child process died or hung running a job (the message is one line); the job's
    candidate failed, the caller goes on and the next job gets a fresh child. ``tail``: the
    last lines the child wrote to stderr ("" when there were none)."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


class Cached:
    """A job argument the child keeps between jobs: sent once while the same object is passed
    again (it is known by identity, so it must not change in place between jobs). For the
    arrays that every candidate of one layer shares: activation, weight, reference output."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class _Ref:
    """Stands for a Cached value in a job message: the child looks ``key`` up."""

    __slots__ = ("key",)

    def __init__(self, key: int):
        self.key = key


class Worker:
    """One child process that runs jobs (see the module docstring); a context manager.

    ``timeout``: default seconds per job (None: TVMS_CANDIDATE_TIMEOUT, else 600; inf: none).
    ``isolate``: False runs jobs in this process (None: unless TVMS_IN_PROCESS=1).
    """

    def __init__(self, timeout: float | None = None, isolate: bool | None = None):
        self.timeout = float(os.environ.get("TVMS_CANDIDATE_TIMEOUT", DEFAULT_TIMEOUT_S)) if timeout is None \
            else float(timeout)
        self.isolate = isolated() if isolate is None else bool(isolate)
        self._proc = self._conn = self._log = None
        self._held: dict = {}  # Cached values the child holds, by id (held here too: ids stay unique)
        _LIVE.add(self)

    @property
    def pid(self) -> int | None:
        """The child's process id (None when no child is running)."""
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def call(self, fn, *args, timeout: float | None = None, **kwargs):
        """``fn(*args, **kwargs)`` in the child; Cached arguments are unwrapped there."""
        if not self.isolate:
            return fn(*[_plain(a) for a in args], **{k: _plain(v) for k, v in kwargs.items()})
        limit = self.timeout if timeout is None else float(timeout)
        if self.pid is None:
            self._stop(kill=True)  # a child that died between jobs: its pipe and file
            self._start()
        msg, held = self._message(fn, args, kwargs)
        try:
            self._conn.send_bytes(msg)
            self._held = held
            if not self._conn.poll(limit if math.isfinite(limit) else None):
                self._stop(kill=True)
                raise CandidateCrash(f"timed out after {limit:g} s")
            status, *reply = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):  # the child died: the pipe broke or closed
            raise self._crash() from None
        except BaseException:  # Ctrl-C (the child ignores it) or our own timeout: the child's state is unknown
            self._stop(kill=True)
            raise
        self._forward_stderr()
        if status == "ok":
            return reply[0]
        self._held = {}  # the child may not have taken the message's values: send them all next time
        raise _remote_error(*reply)

    def close(self) -> None:
        """Ask the child to exit (killed if it does not within 5 s) and close its stderr file."""
        self._stop(kill=False)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _start(self) -> None:
        """A fresh child, waited for while it imports TVM (not part of any job's time)."""
        limit = max(self.timeout, START_TIMEOUT_S)
        ctx = multiprocessing.get_context("spawn")
        # nameless from the start (and the child writes to the same open file), so no end of
        # either process, a kill -9 included, leaves a file behind
        self._log = tempfile.TemporaryFile(prefix="tvms-worker-", suffix=".stderr")
        self._conn, child = ctx.Pipe()
        # daemon: multiprocessing's own exit hook terminates it should ours not have run
        self._proc = ctx.Process(target=_serve, args=(child, _ChildFd(self._log.fileno()), os.getpid()),
                                 name="tvms-worker", daemon=True)
        # SIGINT blocked while the child is made: it starts with the signal blocked (the mask
        # survives exec), so a Ctrl-C to the process group while it imports TVM is the parent's
        # alone; the parent gets it when the mask is restored
        masked = hasattr(signal, "pthread_sigmask")
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if masked else None
        try:
            self._proc.start()
        except BaseException:  # it never started (spawn refuses a __main__ without its guard):
            # nothing to join; the pipe and the file go now, or closing at exit would fail
            child.close()
            self._conn.close()
            self._proc = self._conn = None
            self._stop(kill=True)
            raise
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        child.close()
        try:
            if not self._conn.poll(limit if math.isfinite(limit) else None):
                self._stop(kill=True)
                raise CandidateCrash(f"worker did not start within {limit:g} s")
            self._conn.recv_bytes()
        except (EOFError, OSError):
            raise self._crash() from None
        except BaseException:  # Ctrl-C while it starts
            self._stop(kill=True)
            raise

    def _message(self, fn, args, kwargs) -> tuple[bytes, dict]:
        """The pickled job, each Cached value the child holds replaced by its key; and the
        values the child will hold once it has the message."""
        held, new = {}, {}

        def ref(a):
            if not isinstance(a, Cached):
                return a
            key = id(a.value)
            if key not in self._held:
                new[key] = a.value
            held[key] = a.value
            return _Ref(key)

        args, kwargs = [ref(a) for a in args], {k: ref(v) for k, v in kwargs.items()}
        return pickle.dumps((fn, args, kwargs, list(held), new), protocol=pickle.HIGHEST_PROTOCOL), held

    def _crash(self) -> CandidateCrash:
        """The child is dead or dying: its exit status and last error line, as one line."""
        self._proc.join(5)
        code = self._proc.exitcode
        tail = self._stderr_tail()
        self._stop(kill=True)
        if code is None:
            how = "worker stopped answering"
        elif code < 0:
            try:
                how = f"worker killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"worker killed by signal {-code}"
        else:
            how = f"worker exited with code {code}"
        line = last_error_line(tail)
        return CandidateCrash(f"{how}: {line}" if line else how, tail=last_lines(tail))

    def _stderr_tail(self, size: int = 65536) -> str:
        end = self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, end - size))
        return self._log.read().decode(errors="replace")

    def _forward_stderr(self) -> None:
        """What the job wrote to stderr (TVM warnings, logging) goes on to ours, then the file
        is emptied (the child appends): after a crash it holds the crashed job's output alone."""
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        self._log.truncate(0)
        if text:
            sys.stderr.write(text)
            sys.stderr.flush()

    def _stop(self, kill: bool) -> None:
        if self._proc is not None:
            if not kill:
                try:
                    self._conn.send_bytes(b"")  # the child's cue to exit
                except OSError:
                    pass
                self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._conn.close()
        if self._log is not None:
            self._log.close()
        self._proc = self._conn = self._log = None
        self._held = {}


def isolated() -> bool:
    """Whether a Worker runs its jobs in a child process by default (unless TVMS_IN_PROCESS=1)."""
    return os.environ.get("TVMS_IN_PROCESS", "0") in ("", "0")


def last_error_line(text: str, width: int = 300) -> str:
    """The most telling line of a crashed child's stderr: the last ``LLVM ERROR`` line, else the
    last line naming an error, else the last line."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for keep in (lambda l: "LLVM ERROR" in l, _ERROR_LINE.search, lambda l: True):
        hits = [l for l in lines if keep(l)]
        if hits:
            return hits[-1][:width]
    return ""


def last_lines(text: str, n: int = 25, width: int = 300) -> str:
    """Up to ``n`` non-empty lines of a crashed child's stderr, each cut at ``width`` characters:
    from the last ``LLVM ERROR`` line on (its message, the function it names, then LLVM's and
    Python's stack dumps, which would crowd it out of a plain tail), else the last ``n``."""
    lines = [l.rstrip()[:width] for l in text.splitlines() if l.strip()]
    llvm = [i for i, l in enumerate(lines) if "LLVM ERROR" in l]
    return "\n".join(lines[llvm[-1]:llvm[-1] + n] if llvm else lines[-n:])


def _plain(a):
    return a.value if isinstance(a, Cached) else a


def _remote_error(blob, kind: str, text: str, tb: str) -> BaseException:
    """The job's exception, rebuilt here (a RuntimeError naming it if it does not unpickle)."""
    try:
        e = pickle.loads(blob)
    except Exception:
        e = RuntimeError(f"{kind}: {text}")
    if hasattr(e, "add_note"):
        e.add_note("raised in the worker process:\n" + tb.rstrip())
    return e


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this child when the thread that started it ends, so a parent
    killed outright (SIGKILL, the OOM killer) leaves no child compiling on. Without prctl the
    child still ends, once its job is done, at the closed pipe."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class _ChildFd:
    """A file descriptor of the parent that the spawned child inherits, passed as multiprocessing
    passes a Connection's (reduction.DupFd: the descriptor goes into the child's pass_fds)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _inherited_fd, (reduction.DupFd(self.fd),)


def _inherited_fd(dup) -> int:
    return dup.detach()


def _serve(conn, log_fd: int, parent: int) -> None:
    """The child: stderr to the parent's file ``log_fd`` (C code's too: LLVM writes its fatal
    errors to fd 2), appending (the parent seeks in the same open file to read it), then one job
    per message until an empty message or the parent's end of the pipe."""
    _die_with_parent(parent)
    fcntl.fcntl(log_fd, fcntl.F_SETFL, fcntl.fcntl(log_fd, fcntl.F_GETFL) | os.O_APPEND)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    faulthandler.enable()  # a segfault leaves "Fatal Python error: Segmentation fault" and a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    cache: dict = {}
    conn.send_bytes(b"ready")
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        if not data:
            return
        try:
            fn, args, kwargs, keys, new = pickle.loads(data)
            cache = {k: new[k] if k in new else cache[k] for k in keys}
            args = [cache[a.key] if isinstance(a, _Ref) else a for a in args]
            kwargs = {k: cache[v.key] if isinstance(v, _Ref) else v for k, v in kwargs.items()}
            reply = pickle.dumps(("ok", fn(*args, **kwargs)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            cache = {}
            try:
                blob = pickle.dumps(e)
            except Exception:
                blob = None
            reply = pickle.dumps(("err", blob, type(e).__name__, str(e), traceback.format_exc()))
        sys.stderr.flush()
        conn.send_bytes(reply)


_LIVE: "weakref.WeakSet[Worker]" = weakref.WeakSet()
_SHARED: Worker | None = None


def shared_worker() -> Worker:
    """The process-wide Worker that ``layer`` and ``tune`` measure candidates in: one child, so
    TVM is imported once per process rather than once per caller."""
    global _SHARED
    if _SHARED is None:
        _SHARED = Worker()
    return _SHARED


@atexit.register
def _close_all() -> None:
    for w in list(_LIVE):
        w.close()
