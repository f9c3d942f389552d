"""The shipped plans and the ImageNet class names are package data: a built wheel carries them
and finds them once installed (issue 16: the plans used to sit in a top-level folder that only a
checkout had)."""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from tvm_sparseconv import shipped

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "tvm_sparseconv" / "shipped"
# what pyproject.toml's package-data promises, relative to tvm_sparseconv/shipped/
WANTED = ("README.md", "cost_model.json.gz", "*/*/plan.json", "*/*/report.md", "*/*/refine.json",
          "*/*/trials.jsonl", "*/*/profile.json", "*/*/database/*.json")


def _source_plans() -> list[str]:
    return sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in SHIPPED.glob("*/*/plan.json"))


def test_available_lists_every_shipped_plan():
    assert shipped.available(), "no shipped plans found"
    assert shipped.available() == _source_plans()


def test_wheel_carries_the_shipped_plans(tmp_path):
    # build from a copy: an in-tree setuptools build writes build/ and *.egg-info into the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "tvm_sparseconv", src / "tvm_sparseconv",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info"))
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-cache-dir", "-q", ".", "-w", str(dist)],
                       cwd=src, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(dist.glob("tvm_sparseconv-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        names = set(z.namelist())

    plans = _source_plans()
    assert plans
    for plan in plans:
        assert f"tvm_sparseconv/shipped/{plan}/plan.json" in names, plan
    wanted = sorted({p.relative_to(ROOT).as_posix() for g in WANTED for p in SHIPPED.glob(g)})
    missing = [w for w in wanted if w not in names]
    assert not missing, missing
    assert "tvm_sparseconv/shipped/__init__.py" in names
    assert "tvm_sparseconv/zoo/imagenet_classes.txt" in names

    # installed (the wheel unpacked onto sys.path, away from the checkout), it finds the same plans
    site = tmp_path / "site"
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(site)
    code = textwrap.dedent(f"""
        import tvm_sparseconv.shipped as s
        import tvm_sparseconv.zoo as z
        assert s.__file__.startswith({str(site)!r}), s.__file__
        assert z.__file__.startswith({str(site)!r}) and len(z.imagenet_labels()) == 1000, z.__file__
        print(",".join(s.available()))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].split(",") == plans
