"""Node loss at the serving level (slow): three raylets on this machine
(ray.cluster_utils.Cluster: the head with the ingress, two workers with a dense replica each);
removing a worker node under load loses no stream and changes no greedy token."""

from __future__ import annotations

import asyncio

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from cluster.config import ClusterConfig
from cluster.controllers import NAMESPACE
from deploy.app import build_app
from tests.deploy.helpers import (
    STREAMS,
    check_against_reference,
    free_port,
    http_status,
    ingress_events,
    node_of,
    reference_worker,
    replica_actors,
    streams_with_a_kill,
    wait_until,
)
from workers.make_checkpoint import make_checkpoint

pytestmark = pytest.mark.slow
HEAD = {"expertmesh_head": 1}
# removing a raylet takes seconds: streams long enough that the replica dies mid-stream
TOKENS = 768
DENSE = {"expertmesh_dense": 1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=3))


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": HEAD})
    for _ in range(2):
        c.add_node(num_cpus=1, resources=DENSE)
    c.wait_for_nodes()
    ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
    yield c
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        c.shutdown()


def test_worker_node_with_a_dense_replica_removed_under_load(cluster, model_dir):
    port = free_port()
    config = ClusterConfig.from_dict({
        "model": model_dir, "experts": {"shards": 0},
        "dense": {"num_cpus": 1, "max_num_seqs": STREAMS, "resources": {"expertmesh_dense": 1},
                  "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        "server": {"http_port": port, "grpc_port": free_port(), "model_name": "tiny",
                   "resources": {"expertmesh_head": 0.01}},
    })  # fmt: skip
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config, model_dir), name="nodes", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_status(f"{base}/health/ready") == 200, 180, "the app to be ready")
    head = cluster.head_node.node_id
    dense = replica_actors("nodes")
    nodes = {node_of(a) for a in dense}
    assert len(dense) == 2 and head not in nodes and len(nodes) == 2, nodes
    for name in ("OpenAIIngress", "GrpcIngress"):
        assert {node_of(a) for a in replica_actors("nodes", name)} == {head}
    victim = next(n for n in cluster.worker_nodes if n.node_id == node_of(dense[0]))

    results = asyncio.run(
        streams_with_a_kill(base, lambda: cluster.remove_node(victim, allow_graceful=False), TOKENS)
    )
    with reference_worker(model_dir) as worker:
        check_against_reference(worker, results, TOKENS)
    assert any("dense replica was lost" in e for e in ingress_events("nodes"))
