"""`expertmesh experts` rendering: the per-layer / per-shard summary and the PNG, from a load
report shaped like PoolController.load_report(); fetch errors name the address."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.cli import main
from cluster.expert_load import LoadThresholds, layer_report
from cluster.experts_view import fetch_report, plot, summary


def report() -> dict:
    rng = np.random.default_rng(0)
    counts = rng.poisson(20, (3, 16))
    counts[1, 5] = 900  # a collapsed layer
    assignment = {"shard-0": (tuple(range(8)),) * 3, "shard-2": (tuple(range(8, 16)),) * 3}
    layers = layer_report(counts, assignment, LoadThresholds(collapse_top_n=2, min_pairs=10))
    for r in layers:
        r["rows_per_s"] = r["rows"] / 10.0
    shards = [
        {"shard_id": sid, "state": state, "pairs_held": 24, "node_id": "ab" * 20, "busy": busy,
         "rows_per_s": [r["shard_rows"].get(sid, 0.0) / 10 for r in layers]}
        for sid, state, busy in (("shard-0", "up", 0.7), ("shard-2", "down", 0.0))
    ]  # fmt: skip
    return {
        "version": 7, "ready": False, "status": "1 experts have no live replica", "window_s": 10,
        "num_layers": 3, "num_experts": 16, "rates": (counts / 10).tolist(), "layers": layers,
        "shards": shards, "decision": "hold: busy 0.70", "events": [
            {"time": 0, "kind": "shard_down", "message": "shard shard-2 is down"}],
        "metrics": {"imbalance": 1.8, "imbalance_max": 2.5, "collapsed_layers": 1, "routers": 2},
        "thresholds": {"collapse_top_n": 2, "collapse_share": 0.5},
    }  # fmt: skip


def test_summary_names_layers_shards_alarm_and_events():
    text = summary(report())
    assert "placement v7" in text and "imbalance 1.800" in text
    lines = text.splitlines()
    layer1 = next(line for line in lines if line.strip().startswith("1 "))
    assert "YES" in layer1 and "5:0." in layer1  # collapse alarm, hottest expert 5
    assert any("shard-2" in line and "down" in line for line in lines)
    assert "event shard_down" in text and "autoscaler: hold" in text


def test_png_heatmap_and_bars(tmp_path):
    path = plot(report(), tmp_path / "experts.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_fetch_errors_name_the_address(capsys):
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1:9/admin/experts.*cannot connect"):
        fetch_report("http://127.0.0.1:9", None)
    assert main(["experts", "--url", "http://127.0.0.1:9", "--no-png"]) == 1
    assert "cannot connect" in capsys.readouterr().err
