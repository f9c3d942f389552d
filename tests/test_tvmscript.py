"""The macro lookup tvmscript.py installs parses kernels exactly as TVM's own does."""
import numpy as np
import pytest
import tvm
from tvm.script import tirx as T
from tvm.script.parser.core.parser import ScriptMacro

from tvm_sparseconv import tvmscript
from tvm_sparseconv.conv import Conv2DSpec, Epilogue
from tvm_sparseconv.cpu import cpu_of
from tvm_sparseconv.algorithms import get_algorithm
from tvm_sparseconv.target import make_target


def _with_macros(n: int):
    @T.macro
    def add_one(buf, i):
        buf[i] = buf[i] + T.float32(1)

    @T.macro
    def twice(buf, i):  # a macro that expands another
        add_one(buf, i)
        add_one(buf, i)

    @T.prim_func
    def f(a: T.Buffer((n,), "float32")):
        for i in range(n):
            twice(a, i)

    return f


def test_installed_on_the_pinned_tvm():
    assert tvmscript.install()
    assert ScriptMacro._find_parser_def is tvmscript._find_parser_def


@pytest.mark.parametrize("algorithm, knobs", [("dense", {}), ("hybrid", {}), ("pixcsr", {})])
def test_kernels_parse_the_same_with_either_lookup(algorithm, knobs):
    spec = Conv2DSpec(1, 16, 8, 8, 16, 3, 3, padding=(1, 1, 1, 1))
    target = make_target(None)
    a = get_algorithm(algorithm)
    parsed = {}
    try:
        for which in ("tvm", "ours"):
            tvmscript.uninstall() if which == "tvm" else tvmscript.install()
            stages = a.build_stages(spec, Epilogue(bias=True, relu=True), a.knobs(spec, knobs, target), cpu_of(target))
            parsed[which] = [s.func for s in stages]
    finally:
        tvmscript.install()
    assert len(parsed["ours"]) >= 1
    for theirs, ours in zip(parsed["tvm"], parsed["ours"]):
        tvm.ir.assert_structural_equal(theirs, ours)


def test_nested_macros_expand():
    f = _with_macros(4)
    x = tvm.runtime.tensor(np.zeros(4, np.float32))
    tvm.compile(f, target="llvm")(x)
    np.testing.assert_array_equal(x.numpy(), 2)
