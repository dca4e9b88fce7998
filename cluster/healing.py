"""Self-healing of the expert pool (a mixin of cluster.controllers.PoolController).

Every `experts.health.probe_interval_s` (at once after a router reports a fault) each shard is
asked for its `stats()` (which also feeds the busy-time window):

* Ray says the actor died (`ActorDiedError`): the shard is dead.
* No answer within `probe_timeout_s`, or Ray says the actor is unavailable (restarting):
  a failed probe. One slow answer is not a death; `probe_failures` in a row are.
* It answers from another address than the table's: Ray restarted it (`experts.max_restarts`)
  with its constructor's experts on a new port; it is re-synced to the table's experts.

A dead shard is marked "down" in a new table version at once (routers stop trying it), then
replaced: a new shard (new id) on any node with room loads exactly the experts the table gave
the dead one (the rebalancer's redundant copies included) and takes its place in one version.
Where no node can take it, the surviving shards load the experts nobody else holds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import replace
from typing import Any

import ray

from cluster import shard_actors
from cluster.rebalancer import plan

log = logging.getLogger("expertmesh.pool")
SCHEDULE_TIMEOUT_S = 30.0  # a replacement not scheduled on a node by then: survivors take over


class HealingMixin:
    def _record(self, handle: Any, bundle: Any = None):
        from cluster.controllers import ShardRecord

        return ShardRecord(handle, bundle=bundle)

    async def _health_loop(self) -> None:
        h = self.config.experts.health
        while not self._stopping:
            try:
                await self._probe_all()
            except Exception:  # keep probing whatever one round did
                log.exception("health probe round failed")
            self._probe_now.clear()
            try:
                await asyncio.wait_for(self._probe_now.wait(), h.probe_interval_s)
            except asyncio.TimeoutError:
                pass

    async def _probe_all(self) -> None:
        sids = [sid for sid, rec in self._shards.items() if not rec.healing]
        await asyncio.gather(*(self._probe(sid) for sid in sids))

    async def _probe(self, sid: str) -> None:
        rec = self._shards.get(sid)
        if rec is None:
            return
        h = self.config.experts.health
        try:
            stats = await asyncio.wait_for(rec.handle.stats.remote(), h.probe_timeout_s)
        except ray.exceptions.ActorDiedError as exc:
            if sid in self._shards and not rec.healing:
                why = f"Ray reports the actor died ({_first_line(exc)})"
                await self._on_dead(sid, why, permanent=True)
            return
        except (asyncio.TimeoutError, ray.exceptions.RayActorError) as exc:
            rec.failures += 1
            hung = isinstance(exc, asyncio.TimeoutError)
            why = "no answer in time" if hung else "Ray reports it unavailable"
            log.warning("shard %s failed probe %d/%d (%s)", sid, rec.failures,
                        h.probe_failures, why)  # fmt: skip
            if rec.failures >= h.probe_failures and not rec.healing:
                why = f"{rec.failures} failed probes in a row ({why})"
                await self._on_dead(sid, why, permanent=False, hung=hung)
            return
        rec.failures = 0
        rec.stats = stats
        self.window.add_shard_stats(sid, stats.get("compute_s", 0.0), stats.get("rows", 0))
        spec = self._spec(sid)
        if spec is not None and (stats.get("address", "") != spec.address or spec.state == "down"):
            rec.healing = True
            asyncio.ensure_future(self._heal(self._resync, sid))

    def _spec(self, sid: str):
        return next((s for s in self._table.shards if s.shard_id == sid), None)

    async def _on_dead(self, sid: str, why: str, *, permanent: bool, hung: bool = False) -> None:
        rec = self._shards[sid]
        rec.healing, rec.down_since = True, time.monotonic()
        self.counters["shard_faults"] += 1
        self._event("shard_down", f"shard {sid} is down: {why}", logging.WARNING)
        spec = self._spec(sid)
        if spec is not None and spec.state != "down":
            self._publish(self._table.with_state(sid, "down"), f"{sid} down")
        if self.config.experts.max_restarts and not permanent:
            # Ray restarts it (within max_restarts; ActorDiedError after): re-synced when it
            # answers again. A hung process is restarted rather than waited for.
            if hung:
                _kill(rec.handle, no_restart=False)
            rec.healing, rec.failures = False, 0
            return
        asyncio.ensure_future(self._heal(self._replace, sid))

    async def _heal(self, fn, sid: str) -> None:
        try:
            async with self._ops:
                await fn(sid)
        except Exception as exc:
            self.counters["heal_failures"] += 1
            self._event("heal_failed", f"healing {sid} failed: {exc!r}", logging.ERROR)
            rec = self._shards.get(sid)
            if rec is not None:
                rec.healing = False  # the next probe round tries again

    async def _replace(self, sid: str) -> None:
        """Start a shard with the dead one's experts; survivors take over if none can start."""
        dead = self._spec(sid)
        rec = self._shards[sid]
        if dead is None:
            return
        assignment = dead.assignment()
        _kill(rec.handle)
        try:
            new, info, bundle = await self._start_replacement(sid, rec, assignment)
        except Exception as exc:
            self._event("replace_failed", f"no replacement for {sid} ({exc}); the other shards "
                        "take its experts", logging.WARNING)  # fmt: skip
            await self._survivors_take_over(sid)
            return
        self._shards[new].node_id = info["node_id"]
        spec = replace(dead, shard_id=new, address=info["address"], state="up")
        shards = [spec if s.shard_id == sid else s for s in self._table.shards]
        self._publish(self._next(shards, retired=(sid,)), f"{new} replaces {sid}")
        took = time.monotonic() - (rec.down_since or time.monotonic())
        if bundle is not None:
            rec.bundle = None  # the replacement owns it now
        self._forget(sid)
        self.counters["shards_replaced"] += 1
        self.counters["recoveries"] += 1
        self.recovery_seconds = took
        self._event("recovered", f"{new} replaces {sid} on node {info['node_id'][:12]} "
                    f"holding {dead.num_pairs()} (layer, expert) copies, {took:.1f} s after the "
                    "fault", seconds=took, shard_id=new)  # fmt: skip

    async def _start_replacement(
        self, sid: str, rec: Any, assignment: dict
    ) -> tuple[str, dict, Any]:
        """Start the replacement for `sid`, preferring any node but the dead shard's: our
        probes often notice a lost node before Ray does, and Ray still lists it alive with
        free room (the most free of all). Its bundle is reused only where no other node has
        room and the node is alive (a crashed process). A replacement that dies while starting
        (placed on that node after all) is retried elsewhere until SCHEDULE_TIMEOUT_S."""
        from cluster.pool_ops import LiveOpError, ShardDiedOnStart

        deadline = time.monotonic() + SCHEDULE_TIMEOUT_S
        avoid = {rec.node_id} if rec.node_id else set()
        first = int(self._table.next_shard_id().split("-")[1])
        for attempt in itertools.count():
            node = await asyncio.to_thread(
                shard_actors.choose_node, self.config, self._shards_per_node(), avoid
            )
            alive = await asyncio.to_thread(shard_actors.alive_nodes)
            bundle = rec.bundle if node is None and rec.node_id in alive else None
            new = f"shard-{first + attempt}"  # a fresh actor name for each try
            try:
                left = max(1.0, deadline - time.monotonic())
                info = await self._spawn(new, assignment, node, bundle=bundle,
                                         schedule_timeout_s=left)  # fmt: skip
                return new, info, bundle
            except LiveOpError as exc:
                if bundle is not None:  # _spawn freed it: it stays the dead shard's
                    self._free_bundles.remove(bundle)
                if not isinstance(exc, ShardDiedOnStart) or time.monotonic() > deadline - 1.0:
                    raise
                log.warning("replacement for %s: %s; trying another node", sid, exc)
                await asyncio.sleep(1.0)  # Ray's view of the nodes catches up

    async def _survivors_take_over(self, sid: str) -> None:
        live = {s: v for s, v in self._live_assignment().items() if s != sid}
        if not live:
            raise RuntimeError(f"no live shard left to take over {sid}'s experts")
        result = await asyncio.to_thread(plan, self.window.counts(), live,
                                         self.config.experts.redundant_per_shard)  # fmt: skip
        await self._apply(result.assignment, f"survivors take {sid}'s experts")
        keep = [s for s in self._table.shards if s.shard_id != sid]
        self._publish(self._next(keep, retired=(sid,)), f"{sid} removed")
        self._forget(sid)
        self.counters["recoveries"] += 1
        self._event("recovered", f"{sorted(live)} hold {sid}'s experts now")

    async def _resync(self, sid: str) -> None:
        """A shard Ray restarted: load / release to the table's experts, publish its address."""
        rec = self._shards[sid]
        info = await asyncio.wait_for(rec.handle.ready.remote(),
                                      self.config.experts.health.start_timeout_s)  # fmt: skip
        spec = self._spec(sid)
        want = spec.assignment()
        held = {int(k): list(v) for k, v in info["experts"].items()}
        add, drop = _diff(held, want)
        if add:
            await rec.handle.load.remote(add)
        if drop:
            await rec.handle.release.remote(drop)
        rec.node_id, rec.failures, rec.healing = info["node_id"], 0, False
        self.window.forget_shard(sid)  # its lifetime counters restarted
        table = self._table.with_address(sid, info["address"])
        self._publish(table.with_state(sid, "up"), f"{sid} re-synced after a restart")
        self.counters["restarts_resynced"] += 1
        self.counters["recoveries"] += 1
        self._event(
            "recovered",
            f"shard {sid} restarted by Ray; re-synced "
            f"(+{sum(map(len, add.values()))} / -{sum(map(len, drop.values()))} copies)",
        )

    async def _stop_all_shards(self, grace_s: float) -> None:
        async def stop(rec) -> None:
            try:
                await asyncio.wait_for(rec.handle.shutdown.remote(grace_s), grace_s + 10)
            except Exception:  # already gone
                pass
            _kill(rec.handle)

        await asyncio.gather(*(stop(rec) for rec in self._shards.values()))
        self._shards.clear()
        if self._pg is not None:
            shard_actors.remove_pg(self._pg)
            self._pg = None


def _diff(current: dict, target: dict) -> tuple[dict, dict]:
    from router.placement import assignment_diff

    return assignment_diff(current, target)


def _kill(handle: Any, no_restart: bool = True) -> None:
    try:
        ray.kill(handle, no_restart=no_restart)
    except Exception:  # already gone
        pass


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
