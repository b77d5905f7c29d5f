"""The one percentile definition of the project.

Every latency table (``rapport bench``, ``rapport eval``, the scripts under
``bench/`` and the figures the README quotes) goes through :func:`percentile`,
so a p95 in one table means the same thing as a p95 in another.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["percentile", "percentiles", "summarize"]


def percentile(values: Sequence[float], q: float, *, presorted: bool = False) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks.

    The same definition as NumPy's default (``linear``): the value at rank
    ``(n - 1) * q / 100`` of the sorted values. None for no values.
    """
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    n = len(values)
    if n == 0:
        return None
    s = values if presorted else sorted(values)
    rank = (n - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(s[lo]) + (float(s[hi]) - float(s[lo])) * frac


def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` (keys follow ``qs``), sorting once."""
    s = sorted(values)
    return {f"p{q:g}": percentile(s, q, presorted=True) for q in qs}


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, min, mean, p50, p95, p99, max of ``values`` (None where empty)."""
    s = sorted(values)
    n = len(s)
    out: dict[str, float | int | None] = {"count": n}
    out["min"] = float(s[0]) if n else None
    out["mean"] = sum(s) / n if n else None
    for q in (50, 95, 99):
        out[f"p{q}"] = percentile(s, q, presorted=True)
    out["max"] = float(s[-1]) if n else None
    return out
