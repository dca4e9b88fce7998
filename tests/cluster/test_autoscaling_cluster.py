"""A shard nobody has room for brings up a node through Ray's autoscaler.

A local Ray cluster whose head runs Ray's autoscaler with the fake multi-node provider (what
`ray.cluster_utils.AutoscalingCluster` sets up; it is not used itself because its start and
stop run `ray stop --force`, which would end every Ray cluster on a shared machine). Shards ask
for the custom resource `expert_shard: 1`: the head offers one, the autoscaler's worker type
another. Adding a second shard leaves it pending until the autoscaler has started a node for
it; the shard then serves from that node.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import ray
from ray.cluster_utils import FAKE_HEAD_NODE_ID, Cluster

from cluster.bench import free_port
from cluster.config import ClusterConfig
from cluster.controllers import NAMESPACE
from cluster.launcher import ExpertPool
from workers.make_checkpoint import make_checkpoint


def _autoscaling_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "expertmesh-test",
        "max_workers": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, "expert_shard": 1},
                                 "node_config": {}, "max_workers": 0},
            "shard.node": {"resources": {"CPU": 1, "expert_shard": 1}, "node_config": {},
                           "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default", "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5, "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }  # fmt: skip


@pytest.fixture
def autoscaling_cluster(tmp_path, monkeypatch):
    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    ip = ray.util.get_node_ip_address()
    path = tmp_path / "autoscaler.json"
    path.write_text(json.dumps(_autoscaling_config(f"{ip}:{port}")))
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")  # read by the autoscaler (monitor) process
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
    # the head must carry the id the fake provider knows it by, or its resource demands
    # (the pending shard) are dropped as coming from an unknown node
    monkeypatch.setenv("RAY_OVERRIDE_NODE_ID_FOR_TESTING", FAKE_HEAD_NODE_ID)
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"expert_shard": 1}, "gcs_server_port": port,
        "autoscaling_config": str(path), "include_dashboard": False,
    })  # fmt: skip
    monkeypatch.delenv("RAY_OVERRIDE_NODE_ID_FOR_TESTING")
    session = c.head_node.get_session_dir_path()
    ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()
    # the node the autoscaler started ran under the monitor we just stopped: end its processes
    # (those of this session only)
    for pid in _session_pids(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _session_pids(session: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session in cmd:
            pids.append(int(entry))
    return pids


@pytest.mark.slow
def test_pending_shard_brings_up_a_node(autoscaling_cluster, tmp_path):
    model_dir = str(make_checkpoint(tmp_path / "m", "tiny", tokenizer=False))
    config = ClusterConfig.from_dict({"model": model_dir, "experts": {
        "shards": 1, "num_cpus": 0.5, "resources": {"expert_shard": 1},
        "autoscaling": {"enabled": False, "add_nodes": True},
        "health": {"start_timeout_s": 240},
    }})  # fmt: skip
    pool = ExpertPool.start(model_dir, config)
    try:
        head = pool.infos[0]["node_id"]
        assert len([n for n in ray.nodes() if n["Alive"]]) == 1
        added = ray.get(pool.controller.add_shard.remote(), timeout=300)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2 and added["node_id"] != head and added["node_id"] in nodes
        assert nodes[added["node_id"]]["Resources"].get("expert_shard") == 1
        table = ray.get(pool.controller.get.remote())
        assert table.shard(added["shard_id"]).live and not table.uncovered()
    finally:
        pool.shutdown()
