"""Shipped, pre-tuned plans and databases: ``tvm_sparseconv/shipped/<target key>/<model>/``.

When the target's key (kind-mcpu-Ncores) matches and no plan is given, compile uses the
shipped plan (and MetaSchedule database, if any) with no tuning at all. The folders are package
data (pyproject.toml), so an installed wheel finds them as well as a checkout does.
"""
from __future__ import annotations

from pathlib import Path

from ..target import target_key

SHIPPED = Path(__file__).resolve().parent


def shipped_dir(model_name: str, target) -> Path | None:
    d = SHIPPED / target_key(target) / model_name
    return d if (d / "plan.json").is_file() else None


def shipped_plan(model_name: str, target) -> tuple[str, str | None] | None:
    """(plan path, database folder or None) shipped for this model and target, if any."""
    d = shipped_dir(model_name, target)
    if d is None:
        return None
    db = d / "database"
    return str(d / "plan.json"), (str(db) if (db / "database_tuning_record.json").is_file() else None)


def available() -> list[str]:
    if not SHIPPED.is_dir():
        return []
    return sorted(f"{t.name}/{m.name}" for t in SHIPPED.iterdir() if t.is_dir()
                  for m in t.iterdir() if (m / "plan.json").is_file())
