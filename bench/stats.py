"""Units shared by the measurements (pure functions, any thread). Percentiles are
`chatzeo.testing.percentile`, the one definition every report uses."""

from __future__ import annotations

__all__ = ["ms"]


def ms(seconds: float) -> float:
    return seconds * 1000.0
