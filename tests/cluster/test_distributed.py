"""Distributed path (Ray expert-shard actors + gRPC router) equals the local backend."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from cluster.cli import main
from cluster.config import ClusterConfig
from cluster.controllers import NAMESPACE, PLACEMENT_CONTROLLER
from cluster.launcher import ExpertPool, connect_expert_backend, init_ray
from workers.dense_worker import load_lm, local_experts
from workers.make_checkpoint import make_checkpoint
from workers.runner import ModelRunner

PROMPT_LENGTHS = (70, 33, 5, 1)
DECODE_STEPS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny", seed=5))


@pytest.fixture(scope="module")
def ray_local():
    init_ray(None, min_cpus=8)
    yield
    ray.shutdown()


def _config(model_dir: str, shards: int, placement: str = "spread") -> ClusterConfig:
    return ClusterConfig.from_dict({"model": model_dir, "experts": {
        "shards": shards, "placement": placement, "num_cpus": 0.25}})  # fmt: skip


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def run_greedy(runner: ModelRunner, prompts):
    """Batched prefill then decode; returns (logits per step [steps, B, V], tokens [B, steps])."""
    slots = [runner.allocate() for _ in prompts]
    logits = [runner.step(list(zip(slots, prompts, strict=True)))]
    tokens = [[int(x)] for x in logits[-1].argmax(-1)]
    for _ in range(DECODE_STEPS):
        logits.append(runner.step([(s, [t[-1]]) for s, t in zip(slots, tokens, strict=True)]))
        for b, t in enumerate(tokens):
            t.append(int(logits[-1][b].argmax()))
    for s in slots:
        runner.free(s)
    return torch.stack(logits), tokens


class CountingBackend:
    """Wraps a backend and counts the shards that have work in each layer step."""

    def __init__(self, inner, table) -> None:
        self.inner, self.table = inner, table
        self.expected_calls = 0
        self.steps = 0

    def submit(self, layer, hidden, ids, weights):
        held = [e for e in ids.flatten().tolist() if e >= 0]
        shards = {self.table.holders(layer, e)[0] for e in held}
        self.expected_calls += len(shards)
        self.steps += 1
        return self.inner.submit(layer, hidden, ids, weights)


@pytest.fixture(scope="module")
def local_run(model_dir):
    lm = load_lm(model_dir, torch.float32, progress=False)
    experts = local_experts(model_dir, torch.float32, False)
    return {m: run_greedy(ModelRunner(lm, experts, 8, micro_batches=m), _prompts()) for m in (1, 2)}


@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_distributed_equals_local(model_dir, ray_local, local_run, shards):
    """Same batch, same split: the remote experts give the local logits (to fp32 rounding)."""
    config = _config(model_dir, shards)
    pool = ExpertPool.start(model_dir, config)
    try:
        for i in range(shards):  # every actor is named and reachable by name
            assert ray.get(ray.get_actor(f"expert-shard-{i}", namespace=NAMESPACE).address.remote())
        assert ray.get_actor(PLACEMENT_CONTROLLER, namespace=NAMESPACE) is not None
        remote = connect_expert_backend(config)
        counting = CountingBackend(remote, pool.table)
        lm = load_lm(model_dir, torch.float32, progress=False)
        micro = 2 if shards == 4 else 1  # the ping-pong overlap path too
        logits, tokens = run_greedy(ModelRunner(lm, counting, 8, micro_batches=micro), _prompts())
        ref_logits, ref_tokens = local_run[micro]
        # shards round their partial sums to fp32 before the router adds them: a few ulps
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert tokens == ref_tokens
        m = remote.metrics()
        assert m["calls"] == counting.expected_calls  # one call per shard with work per step
        assert m["steps"] == counting.steps
        total_tokens = sum(PROMPT_LENGTHS) + DECODE_STEPS * len(PROMPT_LENGTHS)
        per_step_rows = (
            m["rows_sent"] if "rows_sent" in m else sum(m["rows_sent_per_shard"].values())
        )
        # each token's hidden row goes at most once to each shard, for every layer
        assert per_step_rows <= total_tokens * 4 * min(shards, 4)
        assert m["errors"] == 0
        remote.close()
    finally:
        pool.shutdown()


def test_pool_with_cluster_token_and_tls(model_dir, ray_local, local_run, tmp_path, monkeypatch):
    """experts.tls + the token from EXPERTMESH_CLUSTER_TOKEN: shards serve TLS on the node IP
    and refuse calls without the token; the launcher's router has both."""
    from cluster.bench.pki import write_pki
    from router.client import ExpertRPCError, RemoteExpertBackend

    pki = write_pki(tmp_path)
    monkeypatch.setenv("EXPERTMESH_CLUSTER_TOKEN", "pool-token")
    tls = {"cert": str(pki["name_cert"]), "key": str(pki["name_key"]), "ca": str(pki["ca"]),
           "server_name": "expertmesh-shard"}  # fmt: skip
    config = ClusterConfig.from_dict({"model": model_dir, "experts": {
        "shards": 2, "num_cpus": 0.25, "tls": tls}})  # fmt: skip
    pool = ExpertPool.start(model_dir, config)
    try:
        assert all(not s.address.startswith("0.0.0.0") for s in pool.table.shards)
        remote = connect_expert_backend(config)
        lm = load_lm(model_dir, torch.float32, progress=False)
        logits, tokens = run_greedy(ModelRunner(lm, remote, 8), _prompts())
        assert tokens == local_run[1][1]
        torch.testing.assert_close(logits, local_run[1][0], rtol=1e-5, atol=1e-5)
        remote.close()
        hidden = torch.randn(3, lm.config.hidden_size)
        ids, weights = torch.tensor([[0, 1]] * 3), torch.full((3, 2), 0.5)
        with RemoteExpertBackend(
            pool.table, tls_ca=tls["ca"], tls_server_name=tls["server_name"]
        ) as bare:
            with pytest.raises(ExpertRPCError, match="UNAUTHENTICATED: missing cluster token"):
                bare.submit(0, hidden, ids, weights).result()
    finally:
        pool.shutdown()


def test_actors_are_named_and_generate_cli_matches_local(model_dir, ray_local, capsys):
    ids = ",".join(map(str, _prompts()[0]))
    argv = ["--model", model_dir, "--prompt-ids", ids, "--max-tokens", "8", "--json"]
    assert main(["generate", "--local", *argv]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["generate", "--expert-shards", "2", *argv]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["token_ids"] == local["token_ids"]
    assert (
        max(
            abs(a - b)
            for a, b in zip(remote.get("logprobs", [0]), local.get("logprobs", [0]), strict=True)
        )
        < 1e-5
    )
