"""Liveness, readiness and drain of the front ends (HTTP and gRPC ingress).

* Liveness (`GET /health`, `/health/live`): the ingress process answers. It never depends on
  the rest of the cluster, so an orchestrator does not restart a pod that is healing.
* Readiness (`GET /health/ready`, gRPC health of "" and expertmesh.v1.Generation): SERVING only
  while the ingress is not draining, a dense replica answers, and every (layer, expert) has a
  live replica in the expert pool; otherwise NOT_SERVING / 503 with the reason.
* Drain (SIGTERM): readiness goes NOT_SERVING, new generation requests are refused with a clear
  status, in-flight ones get `grace_s` to finish; the rest are cut with a clear error.

The expert pool's state comes from its controller's `status()` (H1b's pool controller:
`{"ready": bool, "reason": str, ...}`); a controller without it is checked by probing the
gRPC health service of every shard in its placement table.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from workers.requests import RequestError

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str = ""  # why not ready ("" when ready)
    checked_at: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict[str, Any]:
        return {"status": "ready" if self.ready else "not_ready", "reason": self.reason}


class Gate:
    """Admission of generation requests: counts those in flight; refuses new ones once
    draining. `abort` hooks cut what is still running when the grace period ends."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def check(self) -> None:
        """Raise the refusal if draining (before doing any work for a new request)."""
        if self.draining:
            raise RequestError(
                "unavailable", "the server is shutting down; retry on another instance"
            )

    def enter(self) -> None:
        self.check()
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight <= 0:
            self.inflight = 0
            self._idle.set()

    async def drain(self, grace_s: float) -> int:
        """Refuse new requests; wait up to grace_s for those in flight; return how many are
        still running."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, grace_s))
        except asyncio.TimeoutError:  # noqa: UP041 (Python 3.10: not the builtin)
            pass
        return self.inflight


class EventLog:
    """Recent faults and recoveries seen by an ingress, for the console of `expertmesh serve`
    (replica logs do not reach it)."""

    def __init__(self, size: int = 256) -> None:
        self._events: collections.deque[tuple[int, float, str]] = collections.deque(maxlen=size)
        self._seq = itertools.count(1)

    def add(self, message: str) -> None:
        self._events.append((next(self._seq), time.time(), message))

    def since(self, seq: int) -> list[tuple[int, float, str]]:
        return [e for e in self._events if e[0] > seq]


# ------------------------------------------------------------------------------ readiness
class ReadinessMonitor:
    """Computes readiness every `interval_s` (and on demand when stale), logs transitions to
    the event log, and calls `on_change(readiness)` (the gRPC ingress updates its health)."""

    def __init__(
        self,
        gate: Gate,
        dense_probe: Callable[[], Awaitable[Any]],
        expert_shards: int,
        events: EventLog | None,
        tls: Any = None,
        interval_s: float = 1.0,
        on_change: Callable[[Readiness], Awaitable[None]] | None = None,
    ) -> None:
        self.gate = gate
        self.dense_probe = dense_probe
        self.expert_shards = expert_shards
        self.events = events
        self.interval_s = interval_s
        self.on_change = on_change
        self.current = Readiness(False, "starting")
        self._since = time.monotonic()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._pool = ExpertPoolProbe(tls) if expert_shards > 0 else None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._pool is not None:
            await self._pool.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # never let the monitor die
                log.exception("readiness check failed")
            await asyncio.sleep(self.interval_s)

    async def get(self, max_age_s: float = 2.0) -> Readiness:
        if time.monotonic() - self.current.checked_at > max_age_s:
            return await self.refresh()
        return self.current

    async def refresh(self) -> Readiness:
        async with self._lock:
            new = await self._check()
            old, self.current = self.current, new
            if new.ready != old.ready or (not new.ready and new.reason != old.reason):
                self._transition(old, new)
                if self.on_change is not None:
                    await self.on_change(new)
            return new

    def _transition(self, old: Readiness, new: Readiness) -> None:
        now = time.monotonic()
        took = now - self._since
        if new.ready:
            message = "ready" if old.reason == "starting" else f"ready again after {took:.1f} s"
            log.warning("readiness: %s", message)
        else:
            message = f"NOT READY: {new.reason}"
            log.warning("readiness: %s", message)
        if new.ready != old.ready:
            self._since = now
        if self.events is not None and (old.reason != "starting" or not new.ready):
            self.events.add(message)

    async def _check(self) -> Readiness:
        if self.gate.draining:
            return Readiness(False, "draining: the server is shutting down")
        try:
            await asyncio.wait_for(self.dense_probe(), PROBE_TIMEOUT_S)
        except Exception as exc:
            log.warning("readiness: dense probe failed: %r", exc)
            return Readiness(False, f"no dense replica answered within {PROBE_TIMEOUT_S:.0f} s")
        if self._pool is not None:
            ok, reason = await self._pool.check()
            if not ok:
                return Readiness(False, reason)
        return Readiness(True)


class ExpertPoolProbe:
    """Is every (layer, expert) held by a live shard? Asks the pool controller's `status()`;
    a controller without one is answered by probing each shard's gRPC health service (over
    TLS when the expert RPC uses it: `tls` is the cluster's `router.security.TLSFiles`)."""

    def __init__(self, tls: Any = None) -> None:
        self.tls = tls
        self._controller: Any = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def check(self) -> tuple[bool, str]:
        try:
            controller = self._get_controller()
        except ValueError:
            return False, "the expert pool controller is not running"
        try:
            status = await asyncio.wait_for(_call(controller, "status"), PROBE_TIMEOUT_S)
        except AttributeError:  # a controller without status(): probe the shards ourselves
            status = None
        except Exception as exc:
            self._controller = None  # look it up again next time (it may have been restarted)
            log.warning("readiness: pool controller unreachable: %r", exc)
            return False, "the expert pool controller does not answer"
        if status is not None:
            return bool(status.get("ready")), str(status.get("reason") or "")
        table = await asyncio.wait_for(_call(controller, "get"), PROBE_TIMEOUT_S)
        return await self._probe_table(table)

    def _get_controller(self) -> Any:
        if self._controller is None:
            import ray

            from cluster.controllers import NAMESPACE, PLACEMENT_CONTROLLER

            self._controller = ray.get_actor(PLACEMENT_CONTROLLER, namespace=NAMESPACE)
        return self._controller

    async def _probe_table(self, table: Any) -> tuple[bool, str]:
        shards = shard_addresses(table)
        results = await asyncio.gather(*(self._serving(a) for a in shards.values()))
        down = [sid for sid, ok in zip(shards, results, strict=True) if not ok]
        if not down:
            return True, ""
        uncovered = uncovered_without(table, down)
        if not uncovered:
            return True, ""
        return False, (
            f"{uncovered} experts have no live replica (shard {', '.join(down)} not serving)"
        )

    async def _serving(self, address: str) -> bool:
        if not address:
            return False
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._channel(address)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(address)
        from router.security import channel_credentials

        options = [("grpc.ssl_target_name_override", self.tls.server_name)]
        creds = channel_credentials(self.tls.ca)
        return grpc.aio.secure_channel(address, creds, options if self.tls.server_name else None)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


async def _call(actor: Any, method: str) -> Any:
    return await getattr(actor, method).remote()


def shard_addresses(table: Any) -> dict[str, str]:
    """shard id -> address of the live shards of a placement table (v2: ShardSpec rows with a
    state; v1: one address per shard index)."""
    if hasattr(table, "shards"):
        return {s.shard_id: s.address for s in table.shards if s.state == "up"}
    return {str(i): a for i, a in enumerate(table.addresses)}


def uncovered_without(table: Any, down: list[str]) -> int:
    """How many experts (v2: (layer, expert) pairs) have no live holder once `down` fail."""
    if hasattr(table, "uncovered"):
        for sid in down:
            table = table.with_state(sid, "down")
        return len(table.uncovered())
    dead = {int(s) for s in down}
    return sum(1 for e in range(table.num_experts) if set(table.replicas(e)) <= dead)
