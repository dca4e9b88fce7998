"""The pool controller's policies and reports (a mixin of cluster.controllers.PoolController).

`policy_tick` (every few seconds, only while the pool is healthy and no change runs) asks the
rebalancer for a better placement and the autoscaler for a pool size, and applies what they
decide. `metrics` is what Prometheus shows (counters and gauges, kept apart); `load_report` is
what the admin endpoint and `expertmesh experts` show (per layer, per shard, per expert).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import numpy as np

from cluster import shard_actors
from cluster.autoscaler import ShardAutoscaler
from cluster.expert_load import imbalance, layer_report, shard_loads, weighted_imbalance

log = logging.getLogger("expertmesh.pool")
PUBLIC_EVENT_KEYS = ("seq", "time", "kind", "message", "seconds", "shard_id")  # no addresses


class PoolPolicyMixin:
    async def set_policies(
        self, rebalance: bool | None = None, autoscale: bool | None = None,
        target_load: float | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Pause / resume the rebalancer and the autoscaler (e.g. while an operator works on
        the pool; only a policy the config enables can run), and change the autoscaler's
        target busy fraction at run time. A pause returns once no change a policy started is
        still in flight (and none starts after it)."""
        from cluster.pool_ops import LiveOpError

        e = self.config.experts
        if target_load is not None:
            if not 0 < target_load <= 1:
                raise LiveOpError(f"target_load must be in (0, 1], got {target_load}")
            scaling = dataclasses.replace(e.autoscaling, target_load=float(target_load))
            experts = dataclasses.replace(e, autoscaling=scaling)
            self.config = dataclasses.replace(self.config, experts=experts)
            self.autoscaler = ShardAutoscaler(scaling)
            e = self.config.experts
        for name, want, key in (
            ("rebalance", rebalance, "experts.rebalance.enabled"),
            ("autoscale", autoscale, "experts.autoscaling.enabled"),
        ):
            if want is None:
                continue
            enabled = e.rebalance.enabled if name == "rebalance" else e.autoscaling.enabled
            if want and not enabled:
                raise LiveOpError(f"cannot resume {name}: {key} is false in the config")
            if want and name == "autoscale" and not self.policies[name]:
                self.autoscaler = ShardAutoscaler(e.autoscaling)  # no timers from before
                self.last_decision = ""
            self.policies[name] = bool(want)
        if rebalance is False or autoscale is False:
            async with self._ops:  # a change in flight finishes first
                pass
        return dict(self.policies, target_load=e.autoscaling.target_load)

    async def policy_tick(self) -> str:
        """Rebalance and autoscale once; returns what was done ("" if nothing)."""
        if self._ops.locked() or self._degraded():
            return ""
        e = self.config.experts
        if self.policies["rebalance"]:
            counts = self.window.counts()
            current = self._live_assignment()
            result = await asyncio.to_thread(self.rebalancer.decide, counts, current)
            if result is not None:
                async with self._ops:
                    # nothing moved (and the policy was not paused) meanwhile
                    if self.policies["rebalance"] and self._live_assignment() == current:
                        await self._apply_plan(counts, current, result)
                        return "rebalance"
        if not self.policies["autoscale"]:
            return ""
        live = self._live_assignment()
        busy = {sid: b for sid, b in self.window.busy().items() if sid in live}
        nodes = []
        if self.autoscaler.desired(busy, len(live)) > len(live):
            per_node: dict[str, int] = {}
            for sid in live:
                node = self._shards[sid].node_id if sid in self._shards else ""
                per_node[node] = per_node.get(node, 0) + 1
            nodes = await shard_actors.node_rooms(per_node)
        d = self.autoscaler.decide(busy, len(live), nodes, e.num_cpus,
                                   shard_actors.shard_threads(self.config))  # fmt: skip
        if d.action == "blocked":
            if not self.last_decision.startswith("blocked"):
                self.counters["scale_blocked"] += 1
                self._event("scale_blocked", d.reason, logging.WARNING)
        elif d.action == "up":
            async with self._ops:
                if not self.policies["autoscale"]:  # paused while it decided
                    return ""
                self._event("scale_decision", f"add a shard: {d.reason}")
                await self._add_shard(None, d.node_id)
        elif d.action == "down":
            async with self._ops:
                if not self.policies["autoscale"]:
                    return ""
                self._event("scale_decision", f"retire a shard: {d.reason}")
                await self._retire(None)
        self.last_decision = f"{d.action}: {d.reason}"
        return d.action if d.action in ("up", "down") else ""

    def _degraded(self) -> bool:
        return any(s.state != "up" for s in self._table.shards) or any(
            rec.healing for rec in self._shards.values()
        )

    # ------------------------------------------------------------------ reports
    async def metrics(self) -> dict[str, Any]:
        """{"counters": {...}, "gauges": {...}, "shards": {sid: {...}}, "layers": [...]}."""
        t = self._table
        counts = self.window.counts()
        live = self._live_assignment()
        per_layer = imbalance(shard_loads(counts, live)) if live else np.ones(t.num_layers)
        report = layer_report(counts, live, self.config.experts.load, top=1)
        span = self.window.span_s() or 1.0
        busy = self.window.busy()
        states = [s.state for s in t.shards]
        counters = dict(self.counters, routed_pairs=self.window.total_pairs)
        gauges = {
            "placement_version": t.version,
            "shards_up": states.count("up"),
            "shards_down": states.count("down"),
            "shards_draining": states.count("draining"),
            "uncovered_experts": len(t.uncovered()),
            "routers": len(self._routers),
            "imbalance": weighted_imbalance(counts, per_layer),
            "imbalance_max": float(per_layer.max()) if len(per_layer) else 1.0,
            "collapsed_layers": sum(r["collapse"] for r in report),
            "window_seconds": float(span),
            "last_recovery_seconds": float(getattr(self, "recovery_seconds", 0.0)),
        }
        loads = shard_loads(counts, live)
        shards = {
            s.shard_id: {
                "state": s.state,
                "pairs_held": s.num_pairs(),
                "busy": float(busy.get(s.shard_id, 0.0)),
                "rows_per_s": float(loads[s.shard_id].sum() / span) if s.shard_id in loads else 0.0,
            }
            for s in t.shards
        }
        layers = [
            {"layer": r["layer"], "imbalance": r["imbalance"], "entropy": r["entropy"],
             "collapse": r["collapse"]} for r in report
        ]  # fmt: skip
        return {"counters": counters, "gauges": gauges, "shards": shards, "layers": layers}

    async def load_report(self, top: int = 5) -> dict[str, Any]:
        """Everything `expertmesh experts` shows: per layer (rows/s, hottest, entropy, collapse,
        imbalance), per shard (state, node, busy, rows/s per layer), the rate matrix, events."""
        t = self._table
        counts = self.window.counts()
        span = self.window.span_s() or 1.0
        live = self._live_assignment()
        layers = layer_report(counts, live, self.config.experts.load, top=top)
        for r in layers:
            r["rows_per_s"] = r["rows"] / span
        shards = []
        for s in t.shards:
            rec = self._shards.get(s.shard_id)
            shards.append({
                "shard_id": s.shard_id, "state": s.state, "pairs_held": s.num_pairs(),
                "node_id": rec.node_id if rec else "",
                "busy": float(self.window.busy().get(s.shard_id, 0.0)),
                "rows_per_s": [r["shard_rows"].get(s.shard_id, 0.0) / span for r in layers],
            })  # fmt: skip
        status = await self.status()
        return {
            "version": t.version, "ready": status["ready"], "status": status["reason"],
            "window_s": span, "num_layers": t.num_layers, "num_experts": t.num_experts,
            "rates": (counts / span).round(3).tolist(), "layers": layers, "shards": shards,
            "metrics": (await self.metrics())["gauges"], "decision": self.last_decision,
            "events": [{k: e[k] for k in PUBLIC_EVENT_KEYS if k in e}
                       for e in list(self.events)[-20:]],
            "thresholds": {"collapse_top_n": self.config.experts.load.collapse_top_n,
                           "collapse_share": self.config.experts.load.collapse_share},
        }  # fmt: skip
