"""Faults at the serving level (slow): a dense replica killed mid-stream (two replicas, and one
replica waiting for Serve's replacement) loses no stream and changes no greedy token; a dead
expert shard turns readiness NOT_SERVING with the reason; the API key guards HTTP and gRPC
but not the health probes."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import grpc
import httpx
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from cluster.config import ClusterConfig
from cluster.launcher import init_ray
from deploy.app import app_builder, build_app
from deploy.bootstrap import pool_running
from router.rpc import generate_pb2, generate_pb2_grpc
from tests.deploy.helpers import (
    PROMPTS,
    STREAMS,
    TOKENS,
    check_against_reference,
    free_port,
    http_status,
    ingress_events,
    reference_worker,
    replica_actors,
    streams_with_a_kill,
    wait_until,
)
from workers.make_checkpoint import make_checkpoint
from workers.sampler import SamplingParams

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    model_dir: str
    http: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = str(make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=3))
    port = free_port()
    init_ray(None, min_cpus=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield Cluster(model_dir, f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(cluster):
    with reference_worker(cluster.model_dir) as worker:
        yield worker


def _config(model_dir: str, **over) -> ClusterConfig:
    raw = {
        "model": model_dir,
        "experts": {"shards": 0},
        "dense": {"num_cpus": 0.5, "max_num_seqs": STREAMS},
        "server": {"grpc_port": free_port(), "model_name": "tiny"},
    }
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return ClusterConfig.from_dict(raw)


def _deploy(cluster: Cluster, name: str, config: ClusterConfig, builder=None) -> str:
    app = builder() if builder else build_app(config, cluster.model_dir)
    serve.run(app, name=name, route_prefix=f"/{name}")
    base = f"{cluster.http}/{name}"
    wait_until(lambda: http_status(f"{base}/health/ready") == 200, 120, f"{name} to be ready")
    return base


# ------------------------------------------------------------------------------- dense loss
def test_dense_replica_killed_mid_stream_resumes_on_the_other(cluster, reference):
    config = _config(cluster.model_dir, dense={"autoscaling": {"min_replicas": 2,
                                                               "max_replicas": 2}})  # fmt: skip
    base = _deploy(cluster, "two", config)
    try:
        replicas = replica_actors("two")
        assert len(replicas) == 2
        results = asyncio.run(streams_with_a_kill(base, lambda: ray.kill(replicas[0])))
        check_against_reference(reference, results)
        assert any("dense replica was lost" in e for e in ingress_events("two"))
    finally:
        serve.delete("two")


def test_only_dense_replica_killed_streams_wait_for_its_replacement(cluster, reference):
    base = _deploy(cluster, "one", _config(cluster.model_dir))
    try:
        (replica,) = replica_actors("one")
        results = asyncio.run(streams_with_a_kill(base, lambda: ray.kill(replica)))
        check_against_reference(reference, results)
        assert replica_actors("one") and replica_actors("one")[0] != replica
    finally:
        serve.delete("one")


async def _choices_with_a_kill(base: str, kill, seed: int) -> dict[int, list[int]]:
    """One n=3 sampled stream; once every choice has some tokens, `kill()`."""
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": TOKENS, "temperature": 1.0,
            "seed": seed, "n": 3, "ignore_eos": True, "return_token_ids": True,
            "stream": True}  # fmt: skip
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    finished: set[int] = set()

    async def read(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    for c in chunk["choices"]:
                        got[c["index"]] += c.get("token_ids") or []
                        if c["finish_reason"]:
                            finished.add(c["index"])

    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        task = asyncio.create_task(read(http))
        deadline = time.monotonic() + 120
        while not all(len(g) >= 4 for g in got.values()):
            assert time.monotonic() < deadline and not task.done(), "stream stalled or ended"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(kill)
        await task
    assert finished == {0, 1, 2}
    return got


def test_n_choices_survive_a_replica_kill_each_as_its_seeded_request(cluster, reference):
    """An n > 1 stream whose replica dies: every choice continues (as an n=1 request with
    seed + index, resumed from its tokens) and ends as the uninterrupted choice would."""
    base = _deploy(cluster, "choices", _config(cluster.model_dir))
    try:
        (replica,) = replica_actors("choices")
        got = asyncio.run(_choices_with_a_kill(base, lambda: ray.kill(replica), seed=21))
        for index, ids in got.items():
            params = SamplingParams(max_tokens=TOKENS, temperature=1.0, seed=21 + index,
                                    ignore_eos=True)  # fmt: skip
            want = reference.generate([PROMPTS[1]], params)[0].token_ids
            assert len(ids) == TOKENS, f"choice {index}: a token was lost or sent twice"
            same = sum(a == b for a, b in zip(ids, want, strict=True))
            assert same == TOKENS, f"choice {index}: {TOKENS - same} tokens differ"
        assert any("dense replica was lost" in e for e in ingress_events("choices"))
    finally:
        serve.delete("choices")


# ----------------------------------------------------------------------- readiness, shards
def test_dead_shard_makes_readiness_not_serving_with_the_reason(cluster, tmp_path):
    import yaml

    config = _config(cluster.model_dir, experts={"shards": 2, "num_cpus": 0.25})
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    base = _deploy(cluster, "shards", config, builder=lambda: app_builder({"config": str(path)}))
    grpc_address = f"127.0.0.1:{config.server.grpc_port}"
    try:
        shard = ray.get_actor("expert-shard-1", namespace="expertmesh")
        ray.kill(shard)

        def not_ready() -> bool:
            r = httpx.get(f"{base}/health/ready", timeout=10)
            return r.status_code == 503 and "no live replica" in r.json()["reason"]

        wait_until(not_ready, 60, "readiness to report the dead shard")
        assert httpx.get(f"{base}/health/live", timeout=10).status_code == 200
        with grpc.insecure_channel(grpc_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply, call = stub.Check.with_call(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert "no live replica" in dict(call.trailing_metadata())["reason"]
        assert any("NOT READY" in e and "no live replica" in e for e in ingress_events("shards"))
    finally:
        serve.delete("shards")
    wait_until(lambda: not pool_running(), 60, "the app's expert pool to stop")


# -------------------------------------------------------------------------------- API key
def test_api_key_guards_http_and_grpc_but_not_health(cluster):
    config = _config(cluster.model_dir, server={"api_key": "s3cret"})
    base = _deploy(cluster, "auth", config)
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2}
    good = {"Authorization": "Bearer s3cret"}
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert http_status(f"{base}/v1/models", headers=headers) == 401
        r = httpx.post(f"{base}/v1/completions", json=body, headers=good, timeout=120)
        assert r.status_code == 200, r.text
        assert http_status(f"{base}/v1/models", headers=good) == 200
        for path in ("/health", "/health/live", "/health/ready"):
            assert http_status(f"{base}{path}") == 200
        request = generate_pb2.GenerateRequest(
            model="tiny", token_ids=generate_pb2.TokenIds(ids=[5, 6]), max_tokens=2
        )
        with grpc.insecure_channel(f"127.0.0.1:{config.server.grpc_port}") as channel:
            gen = generate_pb2_grpc.GenerationStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as info:
                    gen.Generate(request, metadata=metadata, timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as info:
                    list(gen.GenerateStream(request, metadata=metadata, timeout=30))
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for metadata in ((("authorization", "Bearer s3cret"),), (("x-api-key", "s3cret"),)):
                assert gen.Generate(request, metadata=metadata, timeout=30).usage.total_tokens
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        serve.delete("auth")
