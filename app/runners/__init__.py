"""Runners, one module per task family; app/tasks.py names the one each catalog entry gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.runners.base import Runner, resolve_device, resolve_dtype
from app.tasks import runner_class


def build_runner(entry: Any, path: Path) -> Runner:
    """Load ``entry``'s weights from the local directory ``path`` onto its device. Blocking."""
    device = resolve_device(entry.device)
    dtype = resolve_dtype(entry.dtype, device)
    runner: Runner = runner_class(entry)(entry, path, device, dtype)
    return runner
