"""A faster way for TVMScript to find the parser of a ``T.macro`` call; ``install`` puts it in.

Each ``T.macro`` call inside a parsed prim_func looks up the running parser by walking the
Python stack (``ScriptMacro._find_parser_def``). TVM 0.27 does it with
``inspect.getouterframes``, which reads every frame's source line; finding a frame's source
file scans ``sys.modules``, so each lookup costs about a millisecond once torch and onnx are
imported. The kernels here expand a few hundred macros each: on the Zen 3 that was half the
time of building a tuning candidate (27.6 s against 13.3 s for 18 candidates of one 3x3 layer,
the kernel cache off). ``_find_parser_def`` below walks the same frames, innermost first, and
reads the same global of each, without the source lines.
"""
from __future__ import annotations

import sys

from tvm.script.parser.core.parser import ScriptMacro

_ORIGINAL = getattr(ScriptMacro, "_find_parser_def", None)


def _find_parser_def(self):
    name = ScriptMacro.parser_object_name
    frame = sys._getframe(0)
    while frame is not None:
        parser = frame.f_globals.get(name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{name} not available")


def install() -> bool:
    """Replace ScriptMacro._find_parser_def with the frame walk (idempotent). False, and nothing
    changed, when this TVM has no such method (another release: its own lookup is kept)."""
    if _ORIGINAL is None or not hasattr(ScriptMacro, "parser_object_name"):
        return False
    ScriptMacro._find_parser_def = _find_parser_def
    return True


def uninstall() -> None:
    """Put TVM's own lookup back (the tests compare the two)."""
    if _ORIGINAL is not None:
        ScriptMacro._find_parser_def = _ORIGINAL
