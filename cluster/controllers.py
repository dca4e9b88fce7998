"""The pool controller: one Ray actor that owns the expert shards and their placement.

It publishes versioned placement tables (router/placement.py) and hears from every router (a
watcher thread in each dense worker, cluster/pool_client.py): which version it runs, the load it
routed, the shard faults it saw. From that it changes the pool live (cluster/pool_ops.py: add /
drop / move replicas, add / retire shards, rebalance, autoscale) and heals it
(cluster/healing.py: dead shards are marked down at once, replaced, restarted ones re-synced).
Every change is a new table version; rows are released only after every router moved past.

Routers: `sync(router_id, version, load, wait_s)` is the one call a watcher makes (a long poll:
it returns a newer table as soon as there is one); `report_fault` is fire-and-forget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from cluster import shard_actors
from cluster.autoscaler import ShardAutoscaler
from cluster.config import ClusterConfig
from cluster.expert_load import LoadWindow
from cluster.healing import HealingMixin
from cluster.pool_ops import LiveOpError, PoolOpsMixin
from cluster.pool_policy import PoolPolicyMixin
from cluster.rebalancer import Rebalancer
from router.placement import PlacementError, PlacementTable, ShardSpec

log = logging.getLogger("expertmesh.pool")
NAMESPACE = "expertmesh"
PLACEMENT_CONTROLLER = "expertmesh-placement"  # the pool controller's actor name
ROUTER_STALE_S = 15.0  # a router silent this long is gone (its replica died or scaled down)
ACK_TIMEOUT_S = 30.0
POLICY_INTERVAL_S = 2.0
EVENTS_KEPT = 100


@dataclass
class ShardRecord:
    """What the controller knows about one shard actor beyond the table."""

    handle: Any
    node_id: str = ""
    bundle: Any = None  # cluster.shard_actors.Bundle it runs in, if any
    failures: int = 0  # consecutive failed probes
    down_since: float | None = None
    healing: bool = False  # a replacement / re-sync is under way
    stats: dict = field(default_factory=dict)


@dataclass
class RouterRecord:
    version: int
    seen: float


class PoolController(PoolOpsMixin, HealingMixin, PoolPolicyMixin):
    """Async Ray actor (see the module docstring). Create with `ExpertPool.start`."""

    def __init__(self, model_dir: str, config: ClusterConfig) -> None:
        from workers.config import ModelConfig

        model = ModelConfig.from_hf(model_dir)
        self.model_dir, self.config = model_dir, config
        self.num_layers, self.num_experts = model.num_hidden_layers, model.num_experts
        self.expert_bytes = 3 * model.hidden_size * model.moe_intermediate_size * 4
        e = config.experts
        self.window = LoadWindow(self.num_layers, self.num_experts, e.load.window_s)
        self.rebalancer = Rebalancer(e.rebalance, e.redundant_per_shard)
        self.autoscaler = ShardAutoscaler(e.autoscaling)
        self._table = PlacementTable.contiguous(self.num_layers, self.num_experts, 1)  # placeholder
        self._shards: dict[str, ShardRecord] = {}
        self._routers: dict[str, RouterRecord] = {}
        self._changed = asyncio.Event()
        self._acked = asyncio.Event()
        self._ops = asyncio.Lock()  # placement changes run one at a time
        self._probe_now = asyncio.Event()
        self._free_bundles: list[Any] = []
        self._pg = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.counters: Counter[str] = Counter()
        self.events: deque[dict] = deque(maxlen=EVENTS_KEPT)
        self._event_seq = 0
        self._new_event = asyncio.Event()
        self.last_decision = ""
        self.recovery_seconds = 0.0
        self.policies = {"rebalance": e.rebalance.enabled, "autoscale": e.autoscaling.enabled}

    # ------------------------------------------------------------------ routers
    async def get(self) -> PlacementTable:
        return self._table

    async def version(self) -> int:
        return self._table.version

    async def sync(
        self, router_id: str, version: int, load: np.ndarray | None = None, wait_s: float = 0.0
    ) -> PlacementTable | None:
        """A router runs `version` and routed `load` [L, E] since its last sync. Returns the
        newer table at once if there is one, else waits up to `wait_s` for one (else None)."""
        now = time.monotonic()
        rec = self._routers.get(router_id)
        if rec is None:
            self._routers[router_id] = RouterRecord(version, now)
            log.info("router %s joined at placement v%d", router_id, version)
        else:
            rec.version, rec.seen = max(rec.version, version), now
        self._acked.set()
        if load is not None:
            try:
                self.window.add(load, now)
            except ValueError as exc:
                log.warning("router %s sent a bad load report: %s", router_id, exc)
        changed = self._changed
        if self._table.version <= version and wait_s > 0:
            try:
                await asyncio.wait_for(changed.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        return self._table if self._table.version > version else None

    async def report_fault(self, router_id: str, shard_id: str, reason: str) -> None:
        """A router saw `shard_id` fail (not a death sentence: the shard gets probed now)."""
        self.counters["router_fault_reports"] += 1
        rec = self._shards.get(shard_id)
        if rec is not None and not rec.healing:
            self._probe_now.set()

    def _live_routers(self, now: float) -> dict[str, RouterRecord]:
        for rid in [r for r, rec in self._routers.items() if now - rec.seen > ROUTER_STALE_S]:
            log.info("router %s went silent; no longer waited for", rid)
            del self._routers[rid]
        return self._routers

    async def wait_acks(self, version: int, timeout_s: float = ACK_TIMEOUT_S) -> bool:
        """Wait until every live router runs `version` or newer; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            behind = [r for r, rec in self._live_routers(now).items() if rec.version < version]
            if not behind:
                return True
            if now >= deadline:
                log.warning("routers %s did not move to placement v%d in %.0f s; going on",
                            behind, version, timeout_s)  # fmt: skip
                return False
            self._acked.clear()
            try:
                await asyncio.wait_for(self._acked.wait(), min(0.5, deadline - now))
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------------ tables
    def _publish(self, table: PlacementTable, why: str) -> PlacementTable:
        if table.version <= self._table.version:
            raise PlacementError(
                f"version {table.version} is not newer than the current {self._table.version}"
            )
        self._table = table
        self.counters["placement_changes"] += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        log.info("placement v%d: %s", table.version, why)
        return table

    def _next(self, shards: list[ShardSpec], retired: tuple[str, ...] = ()) -> PlacementTable:
        t = self._table
        return PlacementTable(t.num_layers, t.num_experts, tuple(shards), t.version + 1,
                              t.retired + retired)  # fmt: skip

    def _event(self, kind: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
        """Log a fault / recovery / scaling event and keep it for reports and for the driver's
        console (`events_since`, cluster/pool_client.py EventLog)."""
        self._event_seq += 1
        self.events.append({"seq": self._event_seq, "time": time.time(), "kind": kind,
                            "level": level, "message": message, **fields})  # fmt: skip
        log.log(level, "%s: %s", kind, message)
        new, self._new_event = self._new_event, asyncio.Event()
        new.set()

    async def events_since(self, seq: int, wait_s: float = 0.0) -> list[dict]:
        """Events after number `seq` (waits up to `wait_s` for one when there are none)."""
        if self._event_seq <= seq and wait_s > 0:
            try:
                await asyncio.wait_for(self._new_event.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        return [e for e in self.events if e["seq"] > seq]

    # ------------------------------------------------------------------ readiness
    async def status(self) -> dict[str, Any]:
        """Readiness of the pool: ready = every (layer, expert) has a live replica."""
        t = self._table
        uncovered = t.uncovered()
        down = [s.shard_id for s in t.shards if s.state == "down"]
        if uncovered:
            pairs = ", ".join(f"(layer {layer}, expert {e})" for layer, e in uncovered[:4])
            more = f" and {len(uncovered) - 4} more" if len(uncovered) > 4 else ""
            reason = (f"{len(uncovered)} experts have no live replica ({pairs}{more}); "
                      f"shards down: {down or 'none'}; the pool is healing")  # fmt: skip
        else:
            reason = "every expert has a live replica"
        return {
            "ready": not uncovered, "reason": reason, "version": t.version,
            "shards": {s.shard_id: s.state for s in t.shards}, "uncovered": len(uncovered),
        }  # fmt: skip

    # ------------------------------------------------------------------ lifecycle
    async def start(self, schedule_timeout_s: float = 60.0) -> dict[str, Any]:
        """Start `experts.shards` shards in one placement group; publish their table."""
        e = self.config.experts
        table = PlacementTable.contiguous(self.num_layers, self.num_experts, e.shards)
        self._pg = shard_actors.gang_placement_group(self.config, e.shards)
        try:
            await asyncio.wait_for(self._pg.ready(), schedule_timeout_s)
        except asyncio.TimeoutError:
            shard_actors.remove_pg(self._pg)
            self._pg = None
            alive = len([n for n in ray.nodes() if n["Alive"]])
            raise LiveOpError(
                f"placement group for {e.shards} expert shards ({e.placement}) could not be "
                f"scheduled: STRICT_SPREAD needs one node per shard; cluster has {alive} nodes"
            ) from None
        records = {}
        for i, spec in enumerate(table.shards):
            bundle = shard_actors.Bundle(self._pg, i)
            handle = shard_actors.start_shard(
                self.model_dir, self.config, spec.shard_id, spec.assignment(), bundle=bundle
            )
            records[spec.shard_id] = self._record(handle, bundle)
        self._shards = records
        try:
            infos = await self._ready_all(e.health.start_timeout_s)
        except Exception as exc:
            await self._stop_all_shards(0.0)
            raise LiveOpError(f"expert shards failed to start: {exc}") from exc
        self._table = table
        self._publish(table.with_addresses({i["shard_id"]: i["address"] for i in infos}),
                      f"{e.shards} shards up")  # fmt: skip
        self._start_loops()
        return {"table": self._table, "infos": infos}

    async def _ready_all(self, timeout_s: float) -> list[dict]:
        """Every first shard's ready() info, in shard order; a `shard_ready` event as each
        finishes loading (the starting process shows progress from those)."""
        sids = list(self._shards)

        async def one(index: int, sid: str) -> dict:
            info = await self._shards[sid].handle.ready.remote()
            self._shards[sid].node_id = info["node_id"]
            pairs = sum(len(v) for v in info["experts"].values())
            self._event("shard_ready", f"{sid} loaded {pairs} (layer, expert) copies",
                        index=index, info=info)  # fmt: skip
            return info

        jobs = [one(i, sid) for i, sid in enumerate(sids)]
        return list(await asyncio.wait_for(asyncio.gather(*jobs), timeout_s))

    def _start_loops(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._health_loop()),
            asyncio.ensure_future(self._policy_loop()),
        ]

    async def _policy_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(POLICY_INTERVAL_S)
            try:
                await self.policy_tick()
            except Exception:  # a policy bug must not stop healing or serving
                log.exception("pool policy tick failed")

    async def shutdown(self, grace_s: float = 1.0) -> None:
        """Stop the loops, then every shard (in-flight calls get `grace_s`)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await self._stop_all_shards(grace_s)
