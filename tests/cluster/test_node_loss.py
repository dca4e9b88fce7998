"""Losing a worker node that holds an expert shard, in the middle of a generation (several
raylets on one machine: ray.cluster_utils.Cluster): the pool controller (on the head node)
marks the shard down, starts a replacement on another node with room (before Ray itself has
noticed the loss), and the generation finishes with the tokens of an undisturbed run and no
failed request."""

from __future__ import annotations

import time

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.config import ClusterConfig
from cluster.controllers import NAMESPACE
from cluster.launcher import ExpertPool, connect_expert_backend
from tests.cluster.pool_helpers import PARAMS, PROMPTS, Steps, check_same
from workers.dense_worker import DenseWorker
from workers.make_checkpoint import make_checkpoint

# Ray declares the lost node dead only after ~20 s, long after the pool's probes (0.6 s).
# Meanwhile Ray still lists the node alive, with the most free room, and the replacement must
# go elsewhere (it once went back there, died, and the survivors took the experts).
SLOW_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_failure_threshold": 20}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("m"), "tiny", seed=5, skew=(4, 2.5)))


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 2, "_system_config": SLOW_NODE_DEATH})  # fmt: skip
    workers = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
    c.workers = workers
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.mark.slow
def test_worker_node_lost_with_a_shard_mid_generation(cluster, model_dir):
    static = DenseWorker(model_dir).generate(PROMPTS, PARAMS)
    config = ClusterConfig.from_dict({"model": model_dir, "experts": {
        "shards": 3, "placement": "strict_spread", "num_cpus": 0.5,
        "recovery_timeout_s": 120.0,
        "health": {"probe_interval_s": 0.2, "probe_timeout_s": 2.0, "probe_failures": 3},
    }})  # fmt: skip
    pool = ExpertPool.start(model_dir, config)
    backend = connect_expert_backend(config)
    try:
        by_node = {info["node_id"]: info["shard_id"] for info in pool.infos}
        victim_node = cluster.workers[1]
        lost = by_node[victim_node.node_id]
        expected = ray.get(pool.controller.get.remote()).shard(lost).experts

        def kill() -> None:
            cluster.remove_node(victim_node, allow_graceful=False)

        steps = Steps(backend, {8: kill}, wait=1)
        outs = DenseWorker(model_dir, experts=steps).generate(PROMPTS, PARAMS)
        steps.done()
        assert not steps.errors, steps.errors
        check_same(outs, static)
        assert backend.metrics()["errors"] == 0
        for _ in range(120):  # the shard's process may outlive its raylet for a moment
            table = ray.get(pool.controller.get.remote())
            if lost in table.retired:
                break
            time.sleep(0.5)
        assert lost in table.retired and not table.uncovered()
        (new,) = [s for s in table.shards if s.shard_id not in by_node.values()]
        assert new.experts == expected and new.live
        handles = pool.shard_handles()
        node = ray.get(handles[new.shard_id].ready.remote())["node_id"]
        assert node != victim_node.node_id
        status = ray.get(pool.controller.status.remote())
        assert status["ready"], status
        events = [e["kind"] for e in ray.get(pool.controller.load_report.remote())["events"]]
        assert "shard_down" in events and "recovered" in events
    finally:
        backend.close()
        pool.shutdown()
