"""The controller's load window (rates over a sliding window, busy time) and derived figures:
per-shard rows and imbalance, hottest experts, entropy, the expert-collapse alarm."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cluster.expert_load import (
    LoadThresholds,
    LoadWindow,
    entropy,
    imbalance,
    layer_report,
    shard_loads,
    weighted_imbalance,
)


def test_window_keeps_only_recent_deltas_and_reports_rates():
    w = LoadWindow(2, 4, window_s=10.0)
    w.add(np.array([[1, 0, 0, 0], [0, 0, 0, 2]]), now=0.0)
    w.add(np.array([[0, 5, 0, 0], [0, 0, 0, 0]]), now=6.0)
    assert w.counts(now=8.0).tolist() == [[1, 5, 0, 0], [0, 0, 0, 2]]
    assert w.span_s(now=8.0) == pytest.approx(8.0)
    assert w.counts(now=12.0).tolist() == [[0, 5, 0, 0], [0, 0, 0, 0]]  # the first expired
    np.testing.assert_allclose(w.rates(now=12.0), w.counts(now=12.0) / 10.0)
    assert w.total_pairs == 8  # lifetime, not windowed
    with pytest.raises(ValueError, match="shape"):
        w.add(np.zeros((3, 4)), now=13.0)
    with pytest.raises(ValueError, match="negative"):
        w.add(-np.ones((2, 4)), now=13.0)


def test_busy_fraction_from_lifetime_compute_seconds():
    w = LoadWindow(1, 2, window_s=10.0)
    for t in range(0, 21):
        w.add_shard_stats("a", compute_s=0.25 * t, rows=10 * t, now=float(t))
        w.add_shard_stats("b", compute_s=0.9 * t if t <= 15 else 13.5, rows=0, now=float(t))
    busy = w.busy(now=20.0)
    assert busy["a"] == pytest.approx(0.25)
    assert busy["b"] == pytest.approx((13.5 - 9.0) / 10.0)  # idle for the last 5 s
    w.add_shard_stats("a", compute_s=0.0, rows=0, now=21.0)  # restarted: counters reset
    w.add_shard_stats("a", compute_s=0.5, rows=0, now=22.0)
    assert w.busy(now=22.0)["a"] == pytest.approx(0.5)
    w.forget_shard("a")
    assert "a" not in w.busy(now=22.0)


def test_shard_loads_split_replicated_experts_and_imbalance():
    counts = np.array([[60, 20, 10, 10]])
    assignment = {"x": ((0, 1),), "y": ((0, 2, 3),)}
    loads = shard_loads(counts, assignment)
    assert loads["x"][0] == pytest.approx(30 + 20) and loads["y"][0] == pytest.approx(30 + 20)
    assert imbalance(loads)[0] == pytest.approx(1.0)
    lopsided = shard_loads(counts, {"x": ((0, 1),), "y": ((2, 3),)})
    assert imbalance(lopsided)[0] == pytest.approx(80 / 50)
    assert weighted_imbalance(np.array([[1, 1], [0, 0]]), np.array([1.5, 9.0])) == 1.5


def test_entropy_hottest_and_collapse_alarm():
    uniform = np.full((1, 8), 1000)
    assert entropy(uniform)[0] == pytest.approx(math.log(8))
    collapsed = np.array([[9000, 500, 300, 200, 0, 0, 0, 0]])
    t = LoadThresholds(collapse_top_n=1, collapse_share=0.8, min_pairs=1000)
    assign = {"a": (tuple(range(4)),), "b": (tuple(range(4, 8)),)}
    (rep,) = layer_report(collapsed, assign, t, top=2)
    assert rep["hottest"] == [(0, 0.9), (1, 0.05)]
    assert rep["collapse"] and rep["top_n_share"] == pytest.approx(0.9)
    assert rep["entropy_norm"] < 0.3 and rep["imbalance"] == pytest.approx(2.0)
    (ok,) = layer_report(uniform * 2, assign, t)
    assert not ok["collapse"] and ok["entropy_norm"] == pytest.approx(1.0)
    (few,) = layer_report(collapsed // 100, assign, t)  # too little data to raise the alarm
    assert not few["collapse"]
