"""cache.py: the kernel cache on disk. A kernel loaded from it is the kernel built afresh and
computes what it computes; a torn, foreign or stale entry is never used."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tvm

from conftest import activation, weight
from tvm_sparseconv.algorithms import get_algorithm
from tvm_sparseconv.algorithms.base import _built_stages
from tvm_sparseconv.build import CompiledLayer
from tvm_sparseconv.cache import cached_funcs
from tvm_sparseconv.conv import Conv2DSpec, Epilogue
from tvm_sparseconv.cpu import cpu_of
from tvm_sparseconv.reference import dense_conv2d

SPEC = Conv2DSpec(1, 16, 9, 9, 24, 3, 3, (1, 1), (1, 1, 1, 1))


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TVMS_KERNEL_CACHE", raising=False)
    return tmp_path / "tvm_sparseconv" / "kernels"


def _builder(calls: list, algorithm: str = "pixcsr"):
    algo, cpu = get_algorithm(algorithm), cpu_of(None)

    def build():
        calls.append(algorithm)
        st = algo.build_stages(SPEC, Epilogue(bias=True, relu=True), algo.knobs(SPEC, {}, cpu), cpu)
        return [s.func for s in st], {"names": [s.name for s in st]}

    return build


def _entries(home) -> list:
    return [p for d in home.iterdir() for p in d.iterdir()]


def test_a_kernel_is_built_once_and_loaded_as_it_was_built(cache_home):
    calls = []
    funcs, meta = cached_funcs("k", _builder(calls))
    again, meta2 = cached_funcs("k", _builder(calls))
    assert calls == ["pixcsr"] and meta2 == meta == {"names": ["encode", "multiply"]}
    for a, b in zip(funcs, again, strict=True):
        tvm.ir.assert_structural_equal(a, b)
    assert len(_entries(cache_home)) == 1


def test_a_layer_from_loaded_kernels_matches_numpy(cache_home):
    """Every stage of two algorithms through the cache, then through it again from disk alone
    (the in-process cache emptied), computed against the float64 reference."""
    x, w = activation(SPEC, 0.4, seed=3), weight(SPEC, seed=4)
    b = np.random.default_rng(5).standard_normal(SPEC.out_channels).astype("float32")
    ref = dense_conv2d(SPEC, x, w, b, True)
    for algorithm in ("pixcsr", "dense"):
        for _ in range(2):
            _built_stages.cache_clear()
            y = CompiledLayer(algorithm, SPEC, w, b, True, None)(x)
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert len(_entries(cache_home)) == 2


def test_a_torn_or_foreign_entry_is_built_again_and_replaced(cache_home):
    calls = []
    cached_funcs("k", _builder(calls))
    (path,) = _entries(cache_home)
    path.write_text('{"key": "k", "meta": {}, "funcs": ["not tvm js')  # torn mid-write
    funcs, meta = cached_funcs("k", _builder(calls))
    assert calls == ["pixcsr"] * 2 and meta == {"names": ["encode", "multiply"]}
    assert json.loads(path.read_text())["key"] == "k"
    entry = json.loads(path.read_text())
    path.write_text(json.dumps({**entry, "key": "another key, same digest"}))
    cached_funcs("k", _builder(calls))
    assert calls == ["pixcsr"] * 3


def test_another_version_is_removed_and_the_cache_can_be_off(cache_home, monkeypatch, tmp_path):
    old = cache_home / "0123456789abcdef"
    old.mkdir(parents=True)
    (old / "x.json").write_text("{}")
    calls = []
    cached_funcs("k", _builder(calls))
    assert not old.exists() and len(_entries(cache_home)) == 1
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "off"))
    monkeypatch.setenv("TVMS_KERNEL_CACHE", "0")
    cached_funcs("k", _builder(calls))
    cached_funcs("k", _builder(calls))
    assert calls == ["pixcsr"] * 3 and not os.path.exists(tmp_path / "off")


def test_the_folder_is_capped_and_the_least_recently_used_entries_go(cache_home, monkeypatch):
    """Past TVMS_KERNEL_CACHE_MB the entries used least recently are removed (to 3/4 of the cap);
    one read since is kept, and what is left still loads."""
    calls = []
    for k in ("a", "b", "c"):
        cached_funcs(k, _builder(calls))
    size = max(p.stat().st_size for p in _entries(cache_home))
    for i, p in enumerate(sorted(_entries(cache_home), key=lambda p: json.loads(p.read_text())["key"])):
        os.utime(p, (1000 + i, 1000 + i))  # written in the order a, b, c
    cached_funcs("a", _builder(calls))  # a hit: "a" is now the most recently used
    assert calls == ["pixcsr"] * 3
    # a cap that holds three entries but not four: the fourth write drops the oldest, "b"
    # (3/4 of the cap then holds two), and keeps "a"
    monkeypatch.setenv("TVMS_KERNEL_CACHE_MB", str(3.5 * size / 2**20))
    cached_funcs("d", _builder(calls))
    keys = {json.loads(p.read_text())["key"] for p in _entries(cache_home)}
    assert "b" not in keys and {"a", "d"} <= keys and len(keys) <= 3
    cached_funcs("a", _builder(calls))
    assert calls == ["pixcsr"] * 4  # "a" loaded, not built
    monkeypatch.setenv("TVMS_KERNEL_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="TVMS_KERNEL_CACHE_MB"):
        cached_funcs("e", _builder(calls))
