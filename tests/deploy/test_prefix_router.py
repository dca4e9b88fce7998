"""Prefix-aware routing: the index and ranking rules, and 2 dense replicas behind Serve where
an agent's turns all reach the replica holding their prefix while other prompts spread."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import ray
from ray import serve

from cluster.config import ClusterConfig
from cluster.launcher import init_ray
from deploy.app import build_app
from deploy.prefix_router import PrefixIndex, block_hashes, preferred
from tests.deploy.helpers import free_port
from workers.make_checkpoint import make_checkpoint


def test_block_hashes_name_whole_prefixes():
    a = block_hashes(list(range(200)), 64)
    b = block_hashes(list(range(128)) + [7] * 72, 64)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert block_hashes([1] * 63, 64) == []
    assert block_hashes([9] + list(range(1, 128)), 64)[1] != a[1]  # the parent counts


def test_index_finds_the_longest_prefix_among_allowed_replicas():
    index = PrefixIndex(capacity=100)
    h = block_hashes(list(range(320)), 64)  # 5 blocks
    index.insert(h[:2], "r1")
    index.insert(h[:4], "r2")
    assert index.longest_match(h, {"r1", "r2"}) == ({"r2"}, 4)
    assert index.longest_match(h, {"r1"}) == ({"r1"}, 2)
    other = block_hashes([999] + list(range(1, 320)), 64)  # differs in the first token only
    assert index.longest_match(other, {"r1", "r2"}) == (set(), 0)
    index.remove("r2")
    assert index.longest_match(h, {"r1", "r2"}) == ({"r1"}, 2) and index.replicas() == {"r1"}


def test_index_forgets_least_recently_used_prefixes_beyond_capacity():
    index = PrefixIndex(capacity=3)
    old, new = block_hashes(list(range(128)), 64), block_hashes([5] * 128, 64)
    index.insert(old, "r1")
    index.insert(new, "r2")
    assert len(index) == 3 and index.longest_match(old, {"r1"}) == (set(), 0)
    assert index.longest_match(new, {"r2"}) == ({"r2"}, 2)


def test_a_loaded_holder_is_passed_over():
    queues = {"a": 10, "b": 1, "c": None}
    assert preferred(["a", "b"], queues, imbalance=8) == ["b"]
    assert preferred(["a"], queues, imbalance=9) == ["a"]
    assert preferred(["c"], queues, imbalance=0) == ["c"]  # unknown load counts as idle


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    model_dir = str(make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0))
    port = free_port()
    config = ClusterConfig.from_dict({
        "model": model_dir, "experts": {"shards": 0},
        "dense": {"num_cpus": 0.5, "max_num_seqs": 4, "prefix_snapshot_every": 64,
                  "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        "server": {"http_port": port, "grpc_port": free_port(), "model_name": "tiny"},
    })  # fmt: skip
    init_ray(None, min_cpus=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config, model_dir), name="routed", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def per_replica(key: str) -> dict[str, int]:
    handle = serve.get_deployment_handle("DenseReplica", "routed")
    seen = {}
    for _ in range(10):  # calls in flight together spread over the replicas (one at a time
        calls = [handle.stats.remote() for _ in range(8)]  # may all reach the same one), as
        for s in (c.result(timeout_s=10) for c in calls):  # the frontend's replica_stats does
            seen[s["replica"]] = s[key]
        if len(seen) == 2:
            break
    assert len(seen) == 2, f"expected 2 dense replicas, saw {seen}"
    return seen


def complete(base_url: str, prompt: list[int]) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


async def burst(base_url: str, prompts: list[list[int]]) -> None:
    """All at once (sequential requests on an idle pair stick to one replica: Serve routes
    by its cached queue lengths), so queues build up and load decides."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        bodies = [{"model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0,
                   "ignore_eos": True} for p in prompts]  # fmt: skip
        for r in await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies)):
            assert r.status_code == 200, r.text


def test_an_agents_turns_follow_their_prefix_and_other_prompts_spread(two_replicas):
    conversation = [(7 * j) % 900 + 1 for j in range(300)]
    cached = []
    for turn in range(6):  # one request at a time, each resending the growing conversation
        conversation += [(13 * turn + j) % 800 + 2 for j in range(20)]
        cached.append(complete(two_replicas, conversation)["usage"]["prompt_tokens_details"])
    assert all(c["cached_tokens"] >= 256 for c in cached[1:]), cached
    hits = per_replica("prefix_cache_hit_tokens")
    assert sorted(v > 0 for v in hits.values()) == [False, True], hits  # one replica served it
    unrelated = [[(31 * i + j) % 700 + 5 for j in range(70)] for i in range(16)]
    asyncio.run(burst(two_replicas, unrelated))  # no known prefix: least loaded replica
    assert all(n > 0 for n in per_replica("finished").values())
