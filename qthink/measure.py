"""Timing and result files shared by the benchmarks."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from qthink.files import atomic_write_text


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall seconds of `repeats` calls of `fn` and the last call's result."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def write_json(rows: list[dict] | dict, path: str | None) -> None:
    """Write `rows` to `path` (nothing without one), through a temporary file so no half-written file shows."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(rows, indent=2) + "\n")
        print(f"wrote {path}")
