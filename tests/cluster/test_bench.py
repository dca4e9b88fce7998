"""Smoke tests of `expertmesh bench`: every benchmark runs end to end on the tiny preset with
tiny sizes and writes its JSON/markdown with the expected keys (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from cluster.bench import e2e, moe, roofline
from cluster.cli import main
from workers.make_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=3))


def _load(path):
    return json.loads(path.read_text())


def test_moe_local_and_transformers(tiny, tmp_path):
    out = moe.run(
        tiny,
        batches=[1, 4, 16],
        shards=0,
        repeats=1,
        out_dir=tmp_path,
        min_time_s=0.001,
        log=lambda m: None,
    )
    data = _load(tmp_path / "moe.json")
    assert data["benchmark"] == "moe" and data["machine"]["cores"] >= 1
    assert [r["batch"] for r in data["results"]] == [1, 4, 16]
    row = data["results"][0]
    assert set(row["tokens_per_s"]) == {"local routed", "local block", "hf eager", "hf grouped_mm"}
    assert set(row["ratios"]) == {"ours/hf eager (block)", "ours/hf grouped_mm (block)"}
    assert all(v > 0 for v in row["tokens_per_s"].values())
    assert max(data["verification_max_abs_diff"].values()) <= moe.ATOL
    assert out["layer"] == data["layer"]
    md = (tmp_path / "moe.md").read_text()
    assert "| tokens | local routed |" in md and "Ratios" in md
    assert (tmp_path / "moe.png").stat().st_size > 0


def test_roofline_local(tiny, tmp_path):
    roofline.run(
        tiny,
        batches=[1, 4],
        shards=0,
        rounds=2,
        bandwidth_mb=16,
        out_dir=tmp_path,
        log=lambda m: None,
    )
    data = _load(tmp_path / "roofline.json")
    assert data["bandwidth_GBps"] > 0
    one, four = data["results"]
    for r in (one, four):
        assert {"bytes", "state_bytes", "bound_ms", "local_ms", "fraction_of_roofline"} <= set(r)
        assert r["bytes"]["total"] == pytest.approx(
            r["bytes"]["dense"]
            + r["bytes"]["lm_head"]
            + r["bytes"]["embedding_rows"]
            + r["bytes"]["experts"]
        )
    assert one["bytes"]["unique_experts_per_layer"] == 4  # tiny: top-4 of 32
    assert one["bytes"]["experts"] < four["bytes"]["experts"]
    assert "| batch | unique experts/layer |" in (tmp_path / "roofline.md").read_text()


def test_e2e_engine_vs_transformers(tiny, tmp_path):
    e2e.run(
        tiny,
        concurrency=3,
        mode="engine",
        prompt_range=(4, 24),
        output_range=(2, 5),
        repeats=2,
        out_dir=tmp_path,
        log=lambda m: None,
    )
    data = _load(tmp_path / "e2e.json")
    assert len(data["ours"]["output_tok_s_runs"]) == 2 and len(data["ratio_per_round"]) == 2
    wl = data["workload"]
    assert wl["requests"] == 3 and data["ours"]["output_tokens"] == wl["output_tokens"]
    for key in ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"):
        assert data["ours"][key] > 0
    assert data["transformers"]["output_tokens"] == wl["output_tokens"]
    assert data["ratio_output_tok_s"] > 0
    assert "output tok/s" in (tmp_path / "e2e.md").read_text()


def test_workload_is_seeded_and_in_range():
    a = e2e.make_workload(8, (16, 512), (16, 128), vocab=1000, seed=1)
    b = e2e.make_workload(8, (16, 512), (16, 128), vocab=1000, seed=1)
    assert a == b
    assert all(16 <= len(p) <= 512 for p in a.prompts)
    assert all(16 <= m <= 128 for m in a.max_tokens)
    assert all(0 <= t < 1000 for p in a.prompts for t in p)


def test_cli_runs_moe_and_rejects_bad_args(tiny, tmp_path, capsys):
    argv = [
        "bench",
        "moe",
        "--model",
        tiny,
        "--out",
        str(tmp_path),
        "--batches",
        "1,2",
        "--shards",
        "0",
        "--repeats",
        "1",
        "--min-time",
        "0.001",
    ]
    assert main(argv) == 0
    assert "MoE layer benchmark" in capsys.readouterr().out
    assert (tmp_path / "moe.json").is_file()
    assert main(["bench", "roofline", "--model", str(tmp_path), "--shards", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "moe", "--batches", "0,x"])


@pytest.mark.slow
def test_moe_and_roofline_distributed(tiny, tmp_path):
    moe.run(
        tiny,
        batches=[1, 8],
        shards=2,
        repeats=1,
        out_dir=tmp_path,
        min_time_s=0.001,
        log=lambda m: None,
    )
    row = _load(tmp_path / "moe.json")["results"][1]
    assert {"dist routed", "dist block"} <= set(row["tokens_per_s"])
    assert row["router"]["dist block"]["calls_per_step"] >= 1
    assert (
        _load(tmp_path / "moe.json")["verification_max_abs_diff"]["dist block vs local block"]
        <= 1e-5
    )
    roofline.run(
        tiny, batches=[2], shards=2, rounds=2, bandwidth_mb=16, out_dir=tmp_path, log=lambda m: None
    )
    r = _load(tmp_path / "roofline.json")["results"][0]
    assert r["dist_ms"] > 0 and r["router"]["rpc_ms_per_call"] > 0


@pytest.mark.slow
def test_e2e_through_serve(tiny, tmp_path):
    from deploy.app import build_app

    e2e.run(tiny, concurrency=2, mode="serve", prompt_range=(4, 12), output_range=(2, 4),
            hf=False, repeats=1, out_dir=tmp_path, log=lambda m: None,
            serve_app_builder=build_app)  # fmt: skip
    data = _load(tmp_path / "e2e.json")
    assert data["ours"]["mode"] == "serve" and "transformers" not in data
    assert data["ours"]["output_tokens"] == data["workload"]["output_tokens"]


def test_sse_lines_split_on_newline_only():
    """A JSON string may hold U+2028 / U+0085 unescaped: one data line stays one line, also
    when the bytes arrive cut inside a character."""
    import asyncio
    import json

    from cluster.bench import sse_lines

    event = 'data: {"text": "a\u2028b\u0085c"}\r\n\r\ndata: [DONE]\n\n'.encode()

    class Resp:
        async def aiter_bytes(self):
            for i in range(0, len(event), 5):
                yield event[i : i + 5]

    async def collect():
        return [line async for line in sse_lines(Resp())]

    lines = asyncio.run(collect())
    assert lines == ['data: {"text": "a\u2028b\u0085c"}', "", "data: [DONE]", ""]
    assert json.loads(lines[0][6:])["text"] == "a\u2028b\u0085c"


def test_settle_waits_for_idle_cpus_up_to_its_timeout():
    from cluster.bench import settle

    assert settle(idle=0.0, window_s=0.05, timeout_s=5.0) < 1.0  # any window is idle enough
    waited = settle(idle=1.01, window_s=0.05, timeout_s=0.3)  # never idle enough
    assert 0.3 <= waited < 1.5
