"""Bootstrap intervals: the resampling counts and the percentile interval, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmpipe import bootstrap


def test_resample_counts_draw_n_units_each_time():
    counts = bootstrap.resample_counts(5, resamples=300, seed=1)
    assert counts.shape == (300, 5) and (counts.sum(1) == 5).all()
    assert np.array_equal(counts, bootstrap.resample_counts(5, resamples=300, seed=1))  # seeded
    assert counts.mean() == pytest.approx(1.0)


def test_mean_interval_by_hand():
    # two values, 0 and 1: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap.mean_interval(np.array([0.0, 1.0])) == (0.0, 1.0)
    assert bootstrap.mean_interval(np.array([0.0, 1.0]), level=0.4) == (0.5, 0.5)
    assert bootstrap.mean_interval(np.full(7, 2.5)) == (2.5, 2.5)  # no spread, no width
    # many values: about the normal interval, mean ± 1.96 sd / sqrt(n)
    x = np.random.default_rng(0).normal(size=900)
    low, high = bootstrap.mean_interval(x, seed=2)
    half = 1.96 * x.std() / math.sqrt(len(x))
    assert low == pytest.approx(x.mean() - half, abs=0.01) and high == pytest.approx(x.mean() + half, abs=0.01)
    assert all(math.isnan(v) for v in bootstrap.mean_interval(np.array([])))


def test_percentile_interval_of_known_estimates():
    assert bootstrap.percentile_interval(np.arange(101.0), level=0.9) == pytest.approx((5.0, 95.0))


def test_paired_gain_intervals_use_each_rows_difference():
    rows = [{"a_x": 1.0, "b_x": 3.0, "a_y": 0.5, "b_y": 0.5}, {"a_x": 2.0, "b_x": 4.0, "a_y": 0.0, "b_y": 1.0}]
    out = bootstrap.paired_gain_intervals(rows, "a", "b", {"x": 2.0, "y": 1.0})
    assert (out["heldout_x_gain_low"], out["heldout_x_gain_high"]) == (1.0, 1.0)  # every difference is 2 / 2
    assert (out["heldout_y_gain_low"], out["heldout_y_gain_high"]) == (0.0, 1.0)  # differences 0 and 1
