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


def test_bench_agent_runs_end_to_end(tmp_path, capsys):
    model = str(make_checkpoint(tmp_path / "m", preset="tiny", seed=3))
    out = tmp_path / "out"
    code = main(["bench", "agent", "--model", model, "--out", str(out), "--sessions", "2",
                 "--turns", "3", "--system-tokens", "80", "--tool-tokens", "10:40",
                 "--output-tokens", "4"])  # fmt: skip
    assert code == 0
    data = json.loads((out / "agent.json").read_text())
    cached, plain = data["contenders"]
    assert len(cached["ttft_ms_per_turn"]) == 3 and cached["outputs_equal_ours"]
    assert plain["outputs_equal_ours"] and plain["hit_rate"] == 0.0
    assert cached["hit_rate"] > 0.3  # later turns and the second session reuse prefixes
    assert data["trace"]["last_prompt_tokens"] > 80 + 100 + 3 * 4
    assert "TTFT per turn" in capsys.readouterr().out
