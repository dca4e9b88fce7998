"""The expert pool on the HTTP ingress: `GET /admin/experts` (JSON load report of the pool
controller) and the pool's Prometheus metrics appended to `/metrics`.

Counters are exposed as Prometheus counters (`..._total`), gauges as gauges. Nothing here
carries shard addresses: shards are named by their stable ids.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cluster.controllers import NAMESPACE, PLACEMENT_CONTROLLER

log = logging.getLogger(__name__)
TIMEOUT_S = 10.0
COUNTERS = {
    "routed_pairs": "routed (token, expert) pairs counted by the dense replicas",
    "placement_changes": "placement table versions published",
    "rebalances": "rebalances applied",
    "shards_added": "expert shards added (scale-up)",
    "shards_retired": "expert shards retired (scale-down)",
    "scale_blocked": "scale-ups refused: no node had idle cores",
    "shard_faults": "expert shards declared dead (actor death or failed probes)",
    "shards_replaced": "dead shards replaced by a new shard",
    "restarts_resynced": "shards restarted by Ray and re-synced",
    "recoveries": "recoveries from a shard fault",
    "heal_failures": "healing attempts that failed (retried)",
    "router_fault_reports": "shard faults reported by routers",
    "expert_copies_loaded": "(layer, expert) copies loaded by shards",
    "expert_copies_released": "(layer, expert) copies released by shards",
}
GAUGES = {
    "placement_version": "current placement table version",
    "shards_up": "expert shards serving",
    "shards_down": "expert shards known dead, awaiting replacement",
    "shards_draining": "expert shards draining before retirement",
    "uncovered_experts": "(layer, expert) pairs with no live replica (pool not ready)",
    "routers": "routers (dense workers) in contact with the controller",
    "imbalance": "max/mean routed rows per shard, row-weighted mean over layers",
    "imbalance_max": "max/mean routed rows per shard, worst layer",
    "collapsed_layers": "layers whose top experts take an outsized share (collapse alarm)",
    "window_seconds": "seconds the load window covers",
    "last_recovery_seconds": "seconds from the last shard fault to its recovery",
}


class NoPoolError(LookupError):
    """No expert pool runs (experts are local to the dense replicas)."""


async def controller_call(method: str, *args: Any) -> Any:
    try:
        controller = ray.get_actor(PLACEMENT_CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        raise NoPoolError("no expert pool runs: experts are local (experts.shards: 0)") from None
    return await asyncio.wait_for(getattr(controller, method).remote(*args), TIMEOUT_S)


async def experts_response(top: int = 5) -> JSONResponse:
    """The body of GET /admin/experts[?top=N] (N hottest experts per layer)."""
    if not 1 <= top <= 64:
        body = {"message": f"top: must be in [1, 64], got {top}", "type": "invalid_request_error"}
        return JSONResponse({"error": body}, 400)
    try:
        return JSONResponse(await controller_call("load_report", top))
    except NoPoolError as exc:
        return JSONResponse({"error": {"message": str(exc), "type": "not_found"}}, 404)
    except Exception as exc:
        log.warning("pool controller did not answer the load report: %r", exc)
        body = {"message": "the expert pool controller did not answer", "type": "unavailable"}
        return JSONResponse({"error": body}, 503)


class _PoolCollector:
    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"expertmesh_pool_{name}", doc,
                                      value=float(s["counters"].get(name, 0)))  # fmt: skip
        for name, doc in GAUGES.items():
            yield GaugeMetricFamily(f"expertmesh_pool_{name}", doc,
                                    value=float(s["gauges"].get(name, 0)))  # fmt: skip
        per_shard = {
            "busy": "fraction of the window the shard's compute thread was busy",
            "rows_per_s": "routed rows per second the shard computes (window)",
            "pairs_held": "(layer, expert) copies the shard holds",
            "up": "1 if the shard serves, 0 if down or draining",
        }
        families = {k: GaugeMetricFamily(f"expertmesh_pool_shard_{k}", d, labels=["shard"])
                    for k, d in per_shard.items()}  # fmt: skip
        for sid, info in s["shards"].items():
            info = dict(info, up=1.0 if info["state"] == "up" else 0.0)
            for key, family in families.items():
                family.add_metric([sid], float(info[key]))
        yield from families.values()
        per_layer = {
            "imbalance": "max/mean routed rows per shard in this layer",
            "entropy": "routing entropy of this layer (nats; log E is uniform)",
            "collapse": "1 if this layer's top experts take an outsized share",
        }
        families = {k: GaugeMetricFamily(f"expertmesh_pool_layer_{k}", d, labels=["layer"])
                    for k, d in per_layer.items()}  # fmt: skip
        for row in s["layers"]:
            for key, family in families.items():
                family.add_metric([str(row["layer"])], float(row[key]))
        yield from families.values()


def render_pool_metrics(snapshot: dict[str, Any]) -> bytes:
    """Prometheus text of a `PoolController.metrics()` snapshot."""
    registry = CollectorRegistry()
    registry.register(_PoolCollector(snapshot))
    return generate_latest(registry)


async def pool_metrics_text() -> bytes:
    """The pool's metrics for /metrics; empty without a pool or when it does not answer."""
    try:
        return render_pool_metrics(await controller_call("metrics"))
    except NoPoolError:
        return b""
    except Exception as exc:
        log.warning("pool controller metrics unavailable: %r", exc)
        return b""
