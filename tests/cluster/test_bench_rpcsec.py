"""`expertmesh bench rpcsec`: a tiny run writes per-mode latencies for every token count."""

from __future__ import annotations

import json

from cluster.cli import main


def test_rpcsec_bench_small_run(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "rpcsec", "--tokens", "1,3", "--calls", "2", "--repeats", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads((out / "rpcsec.json").read_text())
    got = {(r["mode"], r["tokens"]) for r in data["results"]}
    assert got == {(m, t) for m in ("plain", "token", "tls", "token+tls") for t in (1, 3)}
    assert all(r["calls"] == 2 and r["median_us"] > 0 for r in data["results"])
    assert "cost of the cluster token and TLS" in capsys.readouterr().out
