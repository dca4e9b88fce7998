"""Prefix-aware routing across dense replicas (a Ray Serve custom request router).

Each dense replica keeps its own prefix cache, so a request whose prompt starts with what a
replica already served (an agent's next turn, a shared system prompt) should go there. The
router remembers, per chained hash of each `block_tokens`-token prompt block, which replicas
it sent that prefix to (bounded, least recently used forgotten), and ranks first the replicas
holding the longest prefix of a new request; Serve then takes the least loaded of them that
accepts. A holder more than `imbalance` ongoing requests above the least loaded replica is
skipped (recomputing a prefix beats queueing behind a burst), and requests without a known
prefix fall back to power-of-two choices on load. Every ingress replica routes with its own
memory (no cross-process calls on the request path).

Wired in deploy/app.py's build_app through `request_router_config` (dense.prefix_routing).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

ROUTER_CLASS = "deploy.prefix_router:PrefixAwareRouter"
PENDING_LIMIT = 10_000  # requests whose hashes wait for their routing decision


def router_config(imbalance: int, block_tokens: int = 64) -> RequestRouterConfig:
    """The `request_router_config` of the dense deployment."""
    return RequestRouterConfig(
        request_router_class=ROUTER_CLASS,
        request_router_kwargs={"imbalance": imbalance, "block_tokens": block_tokens},
    )


def block_hashes(prompt_ids: Sequence[int], block_tokens: int) -> list[int]:
    """Chained hashes of the full blocks of a prompt (each names the whole prefix)."""
    out, parent = [], 0
    for start in range(0, len(prompt_ids) - block_tokens + 1, block_tokens):
        parent = hash((parent, tuple(prompt_ids[start : start + block_tokens])))
        out.append(parent)
    return out


class PrefixIndex:
    """block hash -> replicas that were sent that prefix; at most `capacity` hashes (LRU)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._holders: OrderedDict[int, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def longest_match(self, hashes: list[int], allowed: set[str]) -> tuple[set[str], int]:
        """(replicas among `allowed` holding the longest prefix, its length in blocks)."""
        best: set[str] = set()
        depth = 0
        for h in hashes:
            holders = self._holders.get(h, set()) & allowed
            if not holders:
                break
            best, depth = holders, depth + 1
        return best, depth

    def insert(self, hashes: list[int], replica: str) -> None:
        for h in hashes:
            holders = self._holders.setdefault(h, set())
            holders.add(replica)
            self._holders.move_to_end(h)
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)

    def replicas(self) -> set[str]:
        return {r for holders in self._holders.values() for r in holders}

    def remove(self, replica: str) -> None:
        for h in list(self._holders):
            self._holders[h].discard(replica)
            if not self._holders[h]:
                del self._holders[h]


def preferred(holders: list[str], queue_lens: dict[str, int | None], imbalance: int) -> list[str]:
    """Holders not more than `imbalance` requests above the least loaded replica known."""
    known = [q for q in queue_lens.values() if q is not None]
    floor = min(known, default=0)
    return [r for r in holders if (queue_lens.get(r) or 0) <= floor + imbalance]


class PrefixAwareRouter(PowerOfTwoChoicesRequestRouter):
    def initialize_state(
        self, block_tokens: int = 64, imbalance: int = 8, capacity: int = 200_000, **_: Any
    ) -> None:
        self._block_tokens = block_tokens
        self._imbalance = imbalance
        self._index = PrefixIndex(capacity)
        self._pending_hashes: OrderedDict[str, list[int]] = OrderedDict()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        fallback = await super().choose_replicas(candidate_replicas, pending_request)
        hashes = self._hashes(pending_request)
        if not hashes:
            return fallback
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        holders, _ = self._index.longest_match(hashes, set(by_id))
        cache = self._replica_queue_len_cache
        queue_lens = {rid: cache.get(r.replica_id) for rid, r in by_id.items()}
        chosen = preferred(sorted(holders), queue_lens, self._imbalance)
        if not chosen:
            return fallback
        return [[by_id[rid] for rid in chosen], *fallback]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        hashes = self._pending_hashes.pop(pending_request.metadata.internal_request_id, None)
        if hashes:
            self._index.insert(hashes, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.remove(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        alive = {r.replica_id.unique_id for r in replicas}
        for rid in self._index.replicas() - alive:
            self._index.remove(rid)

    def _hashes(self, pending_request: PendingRequest | None) -> list[int]:
        """The request's prompt block hashes (remembered until it is routed)."""
        if pending_request is None or not pending_request.args:
            return []
        key = pending_request.metadata.internal_request_id
        if key not in self._pending_hashes:
            prompt = pending_request.args[0]
            if not isinstance(prompt, list):
                return []
            self._pending_hashes[key] = block_hashes(prompt, self._block_tokens)
            while len(self._pending_hashes) > PENDING_LIMIT:  # never routed (cancelled)
                self._pending_hashes.popitem(last=False)
        return self._pending_hashes[key]
