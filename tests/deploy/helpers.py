"""Shared helpers of the deploy tests: ports, polling, and concurrent greedy streams checked
against an in-process reference (for the fault tests)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import torch

NEAR_TIE = 1e-3  # re-prefill vs recurrent decode differ by ~1e-5 in the logits
STREAMS, TOKENS = 8, 96
PROMPTS = [[(i * 37 + j * 11) % 900 + 5 for j in range(6 + 3 * i)] for i in range(STREAMS)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_status(url: str, **kw: Any) -> int:
    try:
        return httpx.get(url, timeout=10, **kw).status_code
    except httpx.HTTPError:
        return 0


# ----------------------------------------------------------------------------- Ray actors
def replica_actors(app: str, deployment: str = "DenseReplica") -> list:
    """Handles of a Serve deployment's replica actors."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    ]


def _node_id(self: Any) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def node_of(actor: Any) -> str:
    import ray

    return ray.get(actor.__ray_call__.remote(_node_id), timeout=60)


def ingress_events(app: str) -> list[str]:
    """The faults and recoveries the HTTP ingress of `app` recorded."""
    from ray import serve

    handle = serve.get_deployment_handle("OpenAIIngress", app)
    return [e[2] for e in handle.events.remote(0).result(timeout_s=30)]


# -------------------------------------------------------------------------------- streams
async def stream(
    http: httpx.AsyncClient, ids: list[int], got: list[int], tokens: int = TOKENS
) -> dict:
    """One greedy streamed completion of `tokens` tokens; token ids accumulate in `got`."""
    body = {
        "model": "tiny",
        "prompt": ids,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, finish, usage = "", None, None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                got += choice.get("token_ids") or []
                text += choice["text"]
                finish = choice["finish_reason"] or finish
    return {"ids": list(got), "text": text, "finish": finish, "usage": usage}


async def streams_with_a_kill(
    base: str, kill: Callable[[], Any], tokens: int = TOKENS
) -> list[dict]:
    """STREAMS greedy streams of `tokens` tokens; once each has some tokens, `kill()`; every
    stream's result."""
    progress: list[list[int]] = [[] for _ in PROMPTS]
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        tasks = [
            asyncio.create_task(stream(http, p, g, tokens))
            for p, g in zip(PROMPTS, progress, strict=True)
        ]
        deadline = time.monotonic() + 120
        while not all(len(g) >= 4 for g in progress):
            assert time.monotonic() < deadline, f"streams stalled: {[len(g) for g in progress]}"
            assert not any(t.done() for t in tasks), "a stream ended before the kill"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(kill)
        return await asyncio.gather(*tasks)


@contextmanager
def reference_worker(model_dir: str) -> Iterator[Any]:
    """The in-process reference (one torch thread: the replicas need the other core)."""
    from workers.dense_worker import DenseWorker
    from workers.requests import EngineConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield DenseWorker(model_dir, "float32", EngineConfig(max_num_seqs=1))
    finally:
        torch.set_num_threads(threads)


def margins(worker: Any, prompt: list[int], out: list[int]) -> torch.Tensor:
    """Top-1 minus top-2 logit at every output position of an undisturbed greedy run."""
    from workers.runner import ModelRunner

    runner = ModelRunner(worker.engine.runner.lm, worker.experts, 1)
    logits = runner.step([(runner.allocate(), prompt + out[:-1])], all_logits=True)[0]
    top2 = logits[len(prompt) - 1 :].topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def check_against_reference(worker: Any, results: list[dict], tokens: int = TOKENS) -> None:
    """Every stream complete, once each token, and equal to the undisturbed greedy run
    (outside near-ties)."""
    from workers.sampler import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    refs = worker.generate(PROMPTS, params)
    for prompt, got, ref in zip(PROMPTS, results, refs, strict=True):
        assert got["finish"] == "length" and got["usage"]["completion_tokens"] == tokens
        assert len(got["ids"]) == tokens, "a token was lost or sent twice"
        pairs = enumerate(zip(got["ids"], ref.token_ids, strict=True))
        diff = next((i for i, (a, b) in pairs if a != b), None)
        if diff is not None:  # only a near-tie may flip after a re-prefill
            margin = float(margins(worker, prompt, ref.token_ids)[diff])
            assert margin < NEAR_TIE, f"token {diff} differs with a logit margin of {margin}"
            continue
        assert got["text"] == ref.text
