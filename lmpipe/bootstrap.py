"""Percentile-bootstrap intervals for the held-out figures the stages report (Efron & Tibshirani 1993, ch. 13).

A held-out score is an average over a few hundred prompts; the same model on another draw of prompts would
score differently. An interval says how much of a difference between two runs that draw alone explains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def resample_counts(n: int, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """(resamples, n) counts: how often each of ``n`` units is drawn in each resample of size ``n``."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples)


def percentile_interval(estimates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` share of a statistic's bootstrap ``estimates``."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: np.ndarray, level: float = 0.95, resamples: int = 2000, seed: int = 0
                  ) -> tuple[float, float]:
    """A ``level`` interval for the mean of ``values`` (one per independent unit, e.g. a paired difference per
    prompt); NaN for no values."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return float("nan"), float("nan")
    return percentile_interval(resample_counts(len(values), resamples, seed) @ values / len(values), level)


def paired_gain_intervals(rows: Sequence[Mapping[str, Any]], before: str, after: str, columns: Mapping[str, float],
                          level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """``heldout_<column>_gain_low`` and ``_high``: intervals for the mean of ``(row[f"{after}_{column}"] -
    row[f"{before}_{column}"]) / scale`` over ``rows`` (one per held-out prompt, both models' scores on it), for
    each ``column: scale`` of ``columns``."""
    out = {}
    for column, scale in columns.items():
        diff = np.array([(r[f"{after}_{column}"] - r[f"{before}_{column}"]) / scale for r in rows], dtype=np.float64)
        out[f"heldout_{column}_gain_low"], out[f"heldout_{column}_gain_high"] = mean_interval(diff, level, seed=seed)
    return out
