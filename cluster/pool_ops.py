"""Live placement changes of the pool controller (a mixin of cluster.controllers.PoolController).

Every change follows one order, so no router ever routes to rows a shard does not hold:

1. the shards that gain (layer, expert) rows load them (each reads only those experts' bytes);
2. one new table version is published (routers swap it in between layer steps);
3. the controller waits until every router acknowledged that version;
4. only then do shards release rows they lost, and a retired shard stops (calls in flight
   finish within the grace period; any late call is answered FAILED_PRECONDITION or
   UNAVAILABLE and its pairs are re-planned by the router on the newest table).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import ray

from cluster import shard_actors
from cluster.rebalancer import plan
from router.placement import PlacementError, ShardSpec

log = logging.getLogger("expertmesh.pool")
RETIRE_GRACE_S = 5.0


class LiveOpError(RuntimeError):
    """A live placement operation was refused; the message says which part and why."""


class ShardDiedOnStart(LiveOpError):
    """A new shard's actor died before it served (e.g. placed on a node that had just died
    but that Ray still listed alive): another node may take it."""


class PoolOpsMixin:
    async def shard_handles(self) -> dict[str, Any]:
        return {sid: rec.handle for sid, rec in self._shards.items()}

    # ------------------------------------------------------------------ the change protocol
    async def _apply(
        self, targets: Mapping[str, Sequence[Sequence[int]]], why: str,
        states: Mapping[str, str] | None = None,
    ) -> int:  # fmt: skip
        """Load, publish (targets + states), wait for acks, release. Returns the version."""
        table = self._table
        adds, drops = {}, {}
        for sid, target in targets.items():
            spec = table.shard(sid)
            want = {layer: list(ids) for layer, ids in enumerate(target) if ids}
            add, drop = _diff(spec.assignment(), want)
            if add:
                adds[sid] = add
            if drop:
                drops[sid] = drop
        if adds:
            await asyncio.gather(*(self._load(sid, add) for sid, add in adds.items()))
        shards = []
        for spec in self._table.shards:  # the newest table: a shard may have gone down
            if spec.shard_id in targets:
                spec = replace(
                    spec, experts=tuple(tuple(sorted(x)) for x in targets[spec.shard_id])
                )
            if states and spec.shard_id in states:
                spec = replace(spec, state=states[spec.shard_id])
            shards.append(spec)
        version = self._publish(self._next(shards), why).version
        if drops:
            await self.wait_acks(version)
            await asyncio.gather(*(self._release(sid, drop) for sid, drop in drops.items()))
        return version

    async def _load(self, sid: str, add: dict[int, list[int]]) -> None:
        held = await self._shards[sid].handle.load.remote(add)
        missing = {layer: [e for e in ids if e not in set(held.get(layer, ()))]
                   for layer, ids in add.items()}  # fmt: skip
        if any(missing.values()):
            raise LiveOpError(f"shard {sid} did not load {missing}")
        pairs = sum(len(v) for v in add.values())
        self.counters["expert_copies_loaded"] += pairs

    async def _release(self, sid: str, drop: dict[int, list[int]]) -> None:
        rec = self._shards.get(sid)
        if rec is None:
            return
        try:
            await rec.handle.release.remote(drop)
        except ray.exceptions.RayActorError:
            pass  # it died meanwhile; healing deals with it
        self.counters["expert_copies_released"] += sum(len(v) for v in drop.values())

    def _live_assignment(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        return {s.shard_id: s.experts for s in self._table.shards if s.live}

    # ------------------------------------------------------------------ live operations
    async def add_replica(self, layer: int, expert: int, shard_id: str) -> int:
        async with self._ops:
            t = self._table.with_replica(layer, expert, shard_id)  # validates
            return await self._apply(
                {shard_id: t.shard(shard_id).experts},
                f"copy of (layer {layer}, expert {expert}) on {shard_id}",
            )

    async def drop_replica(self, layer: int, expert: int, shard_id: str) -> int:
        async with self._ops:
            t = self._table.without_replica(layer, expert, shard_id)
            return await self._apply(
                {shard_id: t.shard(shard_id).experts},
                f"(layer {layer}, expert {expert}) dropped from {shard_id}",
            )

    async def move_expert(self, layer: int, expert: int, src: str, dst: str) -> int:
        async with self._ops:
            t = self._table.with_replica(layer, expert, dst).without_replica(layer, expert, src)
            targets = {src: t.shard(src).experts, dst: t.shard(dst).experts}
            return await self._apply(targets, f"(layer {layer}, expert {expert}) {src} -> {dst}")

    async def rebalance_now(self, force: bool = False) -> dict[str, Any]:
        """Plan from the load window now (force: even below the trigger); apply if it helps."""
        async with self._ops:
            counts = self.window.counts()
            current = self._live_assignment()
            if force:
                result = await asyncio.to_thread(
                    plan, counts, current, self.config.experts.redundant_per_shard,
                    min_gain=self.config.experts.rebalance.min_gain,
                )  # fmt: skip
            else:
                result = await asyncio.to_thread(self.rebalancer.decide, counts, current)
            if result is None or not result.layers:
                return {"changed": False, "version": self._table.version}
            return await self._apply_plan(counts, current, result)

    async def _apply_plan(self, counts, current, result) -> dict[str, Any]:
        from cluster.rebalancer import Rebalancer

        summary = Rebalancer.summary(counts, result)
        copies = result.pairs_added(current)
        version = await self._apply(result.assignment, f"{summary}; {copies} copies loaded")
        self.counters["rebalances"] += 1
        self._event("rebalance", summary)
        return {"changed": True, "version": version, "summary": summary,
                "before": result.before.tolist(), "after": result.after.tolist()}  # fmt: skip

    async def add_shard(
        self, assignment: Mapping[int, Sequence[int]] | None = None, node_id: str | None = None
    ) -> dict[str, Any]:
        """Start one more shard. `assignment` None: the rebalancer places the pool with it
        (it takes copies of the hottest experts, so it serves load at once)."""
        async with self._ops:
            return await self._add_shard(assignment, node_id)

    async def _add_shard(self, assignment, node_id) -> dict[str, Any]:
        started = time.monotonic()
        sid = self._table.next_shard_id()
        empty: tuple[tuple[int, ...], ...] = ((),) * self.num_layers
        if assignment is None:
            current = dict(self._live_assignment(), **{sid: empty})
            result = await asyncio.to_thread(
                plan, self.window.counts(), current, self.config.experts.redundant_per_shard,
                force=True,
            )  # fmt: skip
            targets = result.assignment
        else:
            spec = ShardSpec.from_assignment(sid, self.num_layers, assignment)
            targets = {sid: spec.experts}
        mine = {layer: list(ids) for layer, ids in enumerate(targets[sid]) if ids}
        if node_id is None and not self._free_bundles:
            node_id = shard_actors.choose_node(self.config, self._shards_per_node())
        info = await self._spawn(sid, mine, node_id)
        spec = ShardSpec(sid, info["address"], empty)  # loaded; joins with its rows below
        self._publish(self._next([*self._table.shards, spec]), f"{sid} joins (empty)")
        version = await self._apply(targets, f"{sid} takes its experts")
        took = time.monotonic() - started
        self.counters["shards_added"] += 1
        self._event("scale_up", f"{sid} serving {sum(map(len, mine.values()))} (layer, expert) "
                    f"copies on node {info['node_id'][:12]} after {took:.1f} s",
                    seconds=took, shard_id=sid)  # fmt: skip
        return {"shard_id": sid, "version": version, "seconds": took, "node_id": info["node_id"]}

    async def _spawn(
        self, sid: str, assignment: dict, node_id: str | None = None, *, bundle: Any = None,
        schedule_timeout_s: float | None = None,
    ) -> dict:  # fmt: skip
        """Start a shard actor holding `assignment` (in `bundle`, a free bundle, on `node_id`,
        or wherever Ray finds room); returns its ready() info."""
        if bundle is None and node_id is None and self._free_bundles:
            bundle = self._free_bundles.pop()
        handle = shard_actors.start_shard(self.model_dir, self.config, sid, assignment,
                                          bundle=bundle, node_id=node_id)  # fmt: skip
        self._shards[sid] = self._record(handle, bundle)
        self._shards[sid].healing = True  # not probed until it serves
        h = self.config.experts.health
        try:
            if schedule_timeout_s is not None:  # placed on a node and serving (not loaded yet)
                await asyncio.wait_for(handle.address.remote(), schedule_timeout_s)
            info = await asyncio.wait_for(handle.ready.remote(), h.start_timeout_s)
        except BaseException as exc:
            self._shards.pop(sid, None)
            _kill(handle)
            if bundle is not None:
                self._free_bundles.append(bundle)
            if isinstance(exc, ray.exceptions.RayActorError):
                raise ShardDiedOnStart(f"shard {sid} died while starting ({exc!r})") from None
            why = "no node had room in time" if isinstance(exc, asyncio.TimeoutError) else repr(exc)
            raise LiveOpError(f"shard {sid} did not start: {why}") from None
        self._shards[sid].healing = False
        self._shards[sid].node_id = info["node_id"]
        return info

    async def retire_shard(self, shard_id: str | None = None) -> dict[str, Any]:
        """Drain and stop a shard (None: the least loaded); its experts move to the others."""
        async with self._ops:
            return await self._retire(shard_id)

    async def _retire(self, shard_id: str | None) -> dict[str, Any]:
        started = time.monotonic()
        live = self._live_assignment()
        if shard_id is None:
            busy = self.window.busy()
            shard_id = min(live, key=lambda s: busy.get(s, 0.0))
        if shard_id not in live or len(live) < 2:
            raise LiveOpError(f"cannot retire {shard_id}: live shards are {sorted(live)}")
        rest = {s: v for s, v in live.items() if s != shard_id}
        counts = self.window.counts()
        result = await asyncio.to_thread(plan, counts, rest,
                                         self.config.experts.redundant_per_shard)  # fmt: skip
        version = await self._apply(result.assignment, f"{shard_id} draining",
                                    states={shard_id: "draining"})  # fmt: skip
        await self.wait_acks(version)
        rec = self._shards[shard_id]
        try:
            await asyncio.wait_for(rec.handle.shutdown.remote(RETIRE_GRACE_S), RETIRE_GRACE_S + 10)
        except Exception as exc:  # dead already: nothing left to drain
            log.info("shard %s stopped with %r", shard_id, exc)
        table = self._table
        keep = [s for s in table.shards if s.shard_id != shard_id]
        self._publish(self._next(keep, retired=(shard_id,)), f"{shard_id} retired")
        self._forget(shard_id)
        self.counters["shards_retired"] += 1
        self._event(
            "scale_down",
            f"{shard_id} retired; its experts live on {sorted(rest)}",
            shard_id=shard_id,
            seconds=time.monotonic() - started,
        )
        return {"shard_id": shard_id, "version": self._table.version}

    def _shards_per_node(self) -> dict[str, int]:
        live = {s.shard_id for s in self._table.shards if s.state != "down"}
        out: dict[str, int] = {}
        for sid, rec in self._shards.items():
            if sid in live and rec.node_id:
                out[rec.node_id] = out.get(rec.node_id, 0) + 1
        return out

    def _forget(self, shard_id: str) -> None:
        rec = self._shards.pop(shard_id, None)
        self.window.forget_shard(shard_id)
        if rec is not None:
            _kill(rec.handle)
            if rec.bundle is not None:
                self._free_bundles.append(rec.bundle)


def _diff(current: dict, target: dict) -> tuple[dict, dict]:
    from router.placement import assignment_diff

    return assignment_diff(current, target)


def _kill(handle: Any) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already gone
        pass


__all__ = ["LiveOpError", "PlacementError", "PoolOpsMixin"]
