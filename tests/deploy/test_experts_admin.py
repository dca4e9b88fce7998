"""The pool's Prometheus metrics: counters typed as counters, gauges as gauges, per shard and
per layer; no pool -> no metrics and a 404 from /admin/experts."""

from __future__ import annotations

import asyncio
import json

from prometheus_client.parser import text_string_to_metric_families

from deploy.experts_admin import COUNTERS, GAUGES, experts_response, render_pool_metrics

SNAPSHOT = {
    "counters": {"shard_faults": 2, "recoveries": 2, "routed_pairs": 12345},
    "gauges": {"placement_version": 9, "shards_up": 3, "imbalance": 1.07},
    "shards": {"shard-0": {"state": "up", "pairs_held": 40, "busy": 0.5, "rows_per_s": 10.0},
               "shard-3": {"state": "down", "pairs_held": 40, "busy": 0.0, "rows_per_s": 0.0}},
    "layers": [{"layer": 0, "imbalance": 1.1, "entropy": 3.2, "collapse": False}],
}  # fmt: skip


def test_counters_are_counters_and_gauges_gauges():
    families = {f.name: f for f in text_string_to_metric_families(
        render_pool_metrics(SNAPSHOT).decode())}  # fmt: skip
    for name in COUNTERS:
        assert families[f"expertmesh_pool_{name}"].type == "counter", name
    for name in GAUGES:
        assert families[f"expertmesh_pool_{name}"].type == "gauge", name
    faults = families["expertmesh_pool_shard_faults"].samples[0]
    assert faults.name == "expertmesh_pool_shard_faults_total" and faults.value == 2
    up = {s.labels["shard"]: s.value for s in families["expertmesh_pool_shard_up"].samples}
    assert up == {"shard-0": 1.0, "shard-3": 0.0}
    (imb,) = families["expertmesh_pool_layer_imbalance"].samples
    assert imb.labels == {"layer": "0"} and imb.value == 1.1
    assert families["expertmesh_pool_placement_version"].samples[0].value == 9


def test_admin_endpoint_without_a_pool_is_a_clear_404(monkeypatch):
    import ray

    def no_actor(name, namespace=None):
        raise ValueError(f"Failed to look up actor {name}")

    monkeypatch.setattr(ray, "get_actor", no_actor)
    resp = asyncio.run(experts_response())
    assert resp.status_code == 404
    assert "experts are local" in json.loads(resp.body)["error"]["message"]
    bad = asyncio.run(experts_response(top=0))
    assert bad.status_code == 400 and "top" in json.loads(bad.body)["error"]["message"]
