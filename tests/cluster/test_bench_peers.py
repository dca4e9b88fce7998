"""Side-by-side sweep (ours only: cheap) and the peer plumbing; real peers are opt-in
(EXPERTMESH_TEST_PEERS=1 with `expertmesh bench peers install` done)."""

import json
import os
import sys

import pytest

from cluster.bench import free_port, peers, sweep
from workers.make_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=5)


def test_sweep_engine_only(tiny, tmp_path):
    out = sweep.run(tiny, [1, 3], mode="engine", prompt_range=(4, 12), output_range=(2, 5),
                    repeats=2, out_dir=tmp_path, log=lambda m: None)  # fmt: skip
    data = json.loads((tmp_path / "e2e.json").read_text())
    (name,) = data["contenders"]
    rows = data["contenders"][name]
    assert set(rows) == {"1", "3"}  # JSON keys
    assert len(rows["3"]["output_tok_s_runs"]) == 2
    assert rows["3"]["output_tokens"] == out["workloads"][3]["output_tokens"]
    assert rows["3"]["output_tok_s_min"] <= rows["3"]["output_tok_s"] <= rows["3"][
        "output_tok_s_max"]  # fmt: skip
    assert (tmp_path / "e2e.png").stat().st_size > 0
    assert "| 3 |" in (tmp_path / "e2e.md").read_text()


def test_peer_requests_and_chunks():
    path, body = peers.request_body("llama.cpp", [1, 2], 5)
    assert path == "/completion" and body["return_tokens"] and body["n_predict"] == 5
    assert body["cache_prompt"] is False and body["ignore_eos"] and body["temperature"] == 0
    path, body = peers.request_body("vllm", [1, 2], 5)
    assert path == "/v1/completions" and body["return_token_ids"] and body["prompt"] == [1, 2]
    # llama-server's chunks carry the newest id and how many tokens were decoded so far
    assert peers.chunk_tokens("llama.cpp", {"tokens": [8], "tokens_predicted": 3}, 1) == (2, [8])
    assert peers.chunk_tokens("llama.cpp", {"tokens": [7, 8]}, 0) == (2, [7, 8])
    assert peers.chunk_tokens("vllm", {"choices": [{"token_ids": [3]}]}, 5) == (1, [3])
    assert peers.chunk_tokens("vllm", {"choices": [{"text": ""}]}, 0) == (0, [])
    assert peers.response_tokens("llama.cpp", {"tokens": [1, 2]}) == [1, 2]
    assert peers.response_tokens("vllm", {"choices": [{"token_ids": [4]}]}) == [4]


def test_server_process_is_started_checked_and_stopped(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
           "--directory", str(tmp_path)]  # fmt: skip
    (tmp_path / "health").write_text("ok")
    with peers._server(cmd, f"http://127.0.0.1:{port}", "/health", tmp_path / "log",
                       lambda m: None, timeout_s=30) as url:  # fmt: skip
        import httpx

        assert httpx.get(url + "/health").text == "ok"
    with pytest.raises(Exception):  # noqa: B017 (stopped: connection refused)
        httpx.get(url + "/health", timeout=2)


def test_server_that_exits_names_its_log(tmp_path):
    cmd = [sys.executable, "-c", "print('bad flag'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match="exited \\(3\\)(.|\\n)*bad flag"):
        with peers._server(cmd, "http://127.0.0.1:9", "/health", tmp_path / "log",
                           lambda m: None, timeout_s=30):  # fmt: skip
            pass


def test_gguf_cache_key_follows_the_checkpoint(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    a = peers.gguf_path(tiny)
    assert a == peers.gguf_path(tiny) and a.parent.parent == peers.llama_dir()
    os.utime(tiny / "config.json", ns=(1, 1))
    assert peers.gguf_path(tiny) != a


@pytest.mark.skipif(os.environ.get("EXPERTMESH_TEST_PEERS") != "1"
                    or not peers.llama_installed(), reason="opt-in: real llama.cpp")  # fmt: skip
def test_llama_cpp_agrees_with_our_greedy_tokens(tmp_path):
    model = make_checkpoint(tmp_path / "m", preset="peers", seed=1)
    out = sweep.run(
        model,
        [2],
        peers=["llama.cpp"],
        mode="engine",
        prompt_range=(8, 16),  # fmt: skip
        output_range=(4, 8),
        repeats=1,
        out_dir=tmp_path,
        log=lambda m: None,
    )
    row = out["contenders"]["llama.cpp b11434 (f32 GGUF)"][2]
    assert row["greedy_agreement_first16"] == 1.0


def test_quant_bench_fidelity_and_speed(tiny, tmp_path):
    from cluster.bench import quant

    out = quant.run(tiny, batches=(1, 4), prompts=2, prompt_len=6, steps=3, repeats=1,
                    out_dir=tmp_path, min_time_s=0.0, log=lambda m: None)  # fmt: skip
    fid = out["fidelity"]
    assert fid["float32"]["logprob_drift_max"] == 0 and fid["float32"]["greedy_identical"] == 1
    assert fid["int4"]["logprob_drift_mean"] > fid["int8"]["logprob_drift_mean"] > 0
    assert set(out["seconds"]) == {quant.TORCH, "float32", "bfloat16", "int8", "int4"}
    assert out["layer_expert_bytes"]["int4"] < out["layer_expert_bytes"]["int8"]
    assert "teacher-forced top-1 agreement" in (tmp_path / "quant.md").read_text()


def test_profile_bench(tiny, tmp_path):
    from cluster.bench import profile
    from workers import expert_kernel

    out = profile.run(tiny, batches=(1, 2), prompt_len=4, steps=2, top=3, out_dir=tmp_path,
                      log=lambda m: None)  # fmt: skip
    paths = ("fused", "torch") if expert_kernel.load() else ("torch",)
    assert tuple(out["results"]) == paths
    for path in paths:
        r = out["results"][path][2]
        assert r["step_ms"] > 0 and r["ops_per_step"] > 10 and len(r["top"]) == 3
    assert expert_kernel.load()  # switched back
    assert "torch ops per step" in (tmp_path / "profile.md").read_text()
