"""The ``tvm-sparseconv`` command.

parser.py defines the arguments, commands.py runs each command (load the inputs, call the
library), tables.py prints what it returned. ``main`` is the console script
(``tvm_sparseconv.cli:main``) and ``python -m tvm_sparseconv.cli``.
"""
from __future__ import annotations

import json
import sys

from .parser import build_parser


def main(argv=None) -> int:
    """Run the command in ``argv`` (default: sys.argv[1:]); 0, 2 on a usage or input error (or no
    cross compiler for a target of another architecture), 1
    when a build crashed its worker process (an LLVM abort: one error line naming what it was
    building, then the worker's last stderr lines), 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from ..conv import ConvSpecError, UnsupportedConvError
    from ..target import CrossCompilerError
    from ..worker import CandidateCrash
    from .. import interrupt
    from .commands import run

    try:
        with interrupt.watching():
            try:
                return run(args, argv)
            except Exception:
                interrupt.check()  # a Ctrl-C that TVM handed back as another error is a Ctrl-C
                raise
    except (ConvSpecError, UnsupportedConvError, FileNotFoundError, ValueError, json.JSONDecodeError,
            CrossCompilerError) as e:
        # ModelError, PlanError, ImageError and KnobError are ValueErrors too
        print(f"tvm-sparseconv: error: {e}", file=sys.stderr)
        return 2
    except CandidateCrash as e:
        print(f"tvm-sparseconv: error: {e}", file=sys.stderr)
        if e.tail:
            print("the worker's last lines on stderr:\n" + "\n".join("  " + l for l in e.tail.splitlines()),
                  file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tvm-sparseconv: interrupted", file=sys.stderr)
        return 130


__all__ = ["main", "build_parser"]
