"""`expertmesh bench elastic` end to end on a tiny skewed checkpoint with short phases: every
stage runs, nothing fails, outputs equal a static run, and the JSON / markdown / PNG exist."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from workers.make_checkpoint import make_checkpoint


@pytest.mark.slow
def test_bench_elastic_tiny(tmp_path, capsys):
    model = make_checkpoint(tmp_path / "m", "tiny", seed=3, skew=(4, 3.0))
    out = tmp_path / "out"
    argv = ["bench", "elastic", "--model", str(model), "--out", str(out), "--phase-s", "3",
            "--concurrency", "2", "--max-tokens", "8", "--prompt-len", "8",
            "--shards", "2"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "elastic.json").read_text())
    assert result["failed_requests"] == 0 and result["requests"] > 0
    eq = result["equality"]
    assert eq["equal"] + eq["near_ties"] == eq["requests"] and eq["differ"] == 0
    names = [c["change"] for c in result["changes"]]
    assert names[0] == "rebalance" and "error" not in result["changes"][0]
    assert any(n.startswith("scale-up") for n in names)
    assert any(n.startswith("scale-down") for n in names)
    phases = {p["name"]: p for p in result["phases"]}
    before, after = phases["before rebalance"], phases["after rebalance"]
    assert after["metrics"]["imbalance"] <= before["metrics"]["imbalance"]
    assert phases["after scale-up"]["metrics"]["shards_up"] == 3
    assert phases["after scale-down"]["metrics"]["shards_up"] == 2
    assert (out / "elastic.png").read_bytes()[:4] == b"\x89PNG"
    assert "Failed requests through every change: **0**" in capsys.readouterr().out
    assert main(["bench", "elastic", "--rise", "1", "--model", str(model)]) == 2
