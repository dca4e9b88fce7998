"""Several raylets on one machine (ray.cluster_utils.Cluster): STRICT_SPREAD puts each expert
shard on its own node, and generation still matches the local backend."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.config import ClusterConfig
from cluster.controllers import NAMESPACE
from cluster.launcher import ExpertPool, LaunchError, start_dense_worker
from workers.dense_worker import DenseWorker
from workers.make_checkpoint import make_checkpoint
from workers.sampler import SamplingParams

NODES = 3
PROMPTS = [list(range(3, 80)), [7, 8, 9], [42]]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny", seed=11))


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(NODES - 1):
        c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _config(model_dir: str, shards: int) -> ClusterConfig:
    return ClusterConfig.from_dict(
        {
            "model": model_dir,
            "experts": {"shards": shards, "placement": "strict_spread", "num_cpus": 0.5},
            "dense": {"micro_batches": 2},  # the ping-pong overlap path through the actors
        }
    )


def test_strict_spread_one_shard_per_node_and_generation_matches(cluster, model_dir):
    config = _config(model_dir, NODES)
    pool = ExpertPool.start(model_dir, config)
    try:
        nodes = [info["node_id"] for info in pool.infos]
        assert len(set(nodes)) == NODES, f"shards share nodes: {nodes}"
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert set(nodes) == alive
        worker = start_dense_worker(model_dir, config)
        remote = ray.get(worker.generate.remote(PROMPTS, PARAMS), timeout=300)
        metrics = ray.get(worker.router_metrics.remote())
        ray.kill(worker)
    finally:
        pool.shutdown()
    local = DenseWorker(model_dir, micro_batches=2).generate(PROMPTS, PARAMS)  # same split
    for r, l in zip(remote, local, strict=True):
        assert r.token_ids == l.token_ids
        assert max(abs(a - b) for a, b in zip(r.logprobs, l.logprobs, strict=True)) < 1e-5
    assert metrics["calls"] > 0 and metrics["errors"] == 0


def test_strict_spread_with_more_shards_than_nodes_is_a_clear_error(cluster, model_dir):
    with pytest.raises(LaunchError, match="STRICT_SPREAD needs one node per shard"):
        ExpertPool.start(model_dir, _config(model_dir, NODES + 1), schedule_timeout_s=5)


def test_added_shard_lands_on_a_node_without_one(cluster, model_dir):
    config = _config(model_dir, NODES - 1)
    pool = ExpertPool.start(model_dir, config)
    try:
        first = {info["node_id"] for info in pool.infos}
        assert len(first) == NODES - 1
        added = ray.get(pool.controller.add_shard.remote(), timeout=300)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert added["node_id"] in alive - first  # the one node without a shard
        table = ray.get(pool.controller.get.remote())
        assert added["shard_id"] in table.shard_ids and not table.uncovered()
    finally:
        pool.shutdown()
