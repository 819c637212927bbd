"""Small statistics shared by the measurements (pure functions, any thread)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentile", "ms"]


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` (0..1) percentile of ``values`` by nearest rank; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, math.ceil(fraction * len(ordered)) - 1)
    return ordered[rank]


def ms(seconds: float) -> float:
    return seconds * 1000.0
