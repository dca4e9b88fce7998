"""Smoke test of `expertmesh bench cache` on the tiny preset (no timing assertions)."""

from __future__ import annotations

import json

from cluster.cli import main
from workers.make_checkpoint import make_checkpoint


def test_bench_cache_runs_end_to_end(tmp_path, capsys):
    model = str(make_checkpoint(tmp_path / "m", preset="tiny", seed=3))
    out = tmp_path / "out"
    code = main(["bench", "cache", "--model", model, "--out", str(out), "--batch", "3",
                 "--contexts", "20,40", "--windows", "32", "--sinks", "16", "--prompt-len", "96",
                 "--long-contexts", "64,200", "--steps", "3"])  # fmt: skip
    assert code == 0
    data = json.loads((out / "cache.json").read_text())
    assert [r["context"] for r in data["decode_attention"]] == [20, 40]
    exact, windowed = data["eviction"]
    assert exact["policy"] == "exact" and exact["max_abs_logprob_drift"] == 0.0
    assert windowed["kv_blocks_per_seq"] < exact["kv_blocks_per_seq"]  # the window saves KV
    assert windowed["max_abs_logprob_drift"] > 0 and 0 <= windowed["top1_agreement"] <= 1
    lc = data["long_context"]
    assert lc["prompt_tokens"] == 200 and [r["context"] for r in lc["decode"]][0] == 64
    assert "KV eviction vs exact" in capsys.readouterr().out
