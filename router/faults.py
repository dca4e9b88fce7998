"""What the router does with a failed shard call: classify it, and keep the shards it saw fail
out of its plans until a newer placement table arrives or the shard answers a probe.

Shard faults (the step re-plans the failed pairs, never fails): UNAVAILABLE (refused, broken
connection, not ready), DEADLINE_EXCEEDED, CANCELLED by the transport, FAILED_PRECONDITION
(stale plan: the shard does not hold what the table said), INTERNAL / UNKNOWN / ABORTED /
DATA_LOSS (the shard broke), and answers that are malformed, wrong-shaped or non-finite.
Anything else (INVALID_ARGUMENT, UNAUTHENTICATED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, ...) is the
router's or the operator's mistake: retrying elsewhere would fail the same way, so the step
fails with `ExpertRPCError`. Messages meant for API clients never carry shard addresses.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from router.placement import PlacementTable

FAULT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DATA_LOSS,
    }
)
# faults after which the cached channel is dropped (a replacement may reuse the address)
CONNECTION_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
_ADDRESS = re.compile(
    r"(ipv[46]:)?(\[[0-9a-fA-F:.]+\]|\b\d{1,3}(\.\d{1,3}){3}\b)(:\d+)?|\bunix:[^\s,;]+"
)


def scrub(text: str) -> str:
    """`text` with IP addresses / host:port / unix socket paths replaced by `<address>`."""
    return _ADDRESS.sub("<address>", text)


class ExpertRPCError(RuntimeError):
    """A shard call failed in a way no retry fixes; names the shard id, layer and status (the
    address is kept in `.address` for logs, not in the message)."""

    def __init__(self, shard_id: str, address: str, layer: int, code: str, details: str) -> None:
        self.shard_id, self.address, self.layer = shard_id, address, layer
        self.code, self.details = code, scrub(details)
        super().__init__(
            f"expert shard {shard_id} failed for layer {layer}: {code}: {self.details}"
        )


class ExpertsUnavailableError(RuntimeError):
    """No live shard held some routed (layer, expert)s within the recovery timeout."""

    def __init__(self, layer: int, experts: Sequence[int], waited_s: float) -> None:
        self.layer, self.experts, self.waited_s = layer, tuple(experts), waited_s
        named = ", ".join(f"(layer {layer}, expert {e})" for e in self.experts[:16])
        more = f" and {len(self.experts) - 16} more" if len(self.experts) > 16 else ""
        super().__init__(
            f"expert pool degraded: no live shard holds {named}{more} after waiting "
            f"{waited_s:.1f} s for the pool to recover"
        )


@dataclass(frozen=True)
class ShardFault(Exception):
    """One failed attempt on one shard (caught inside the router, never raised to callers)."""

    shard_id: str
    reason: str  # "<STATUS>: details" or "BAD_RESPONSE: ..."
    connection: bool = False  # drop the cached channel


def classify(
    error: grpc.aio.AioRpcError, shard_id: str, address: str, layer: int
) -> ShardFault | ExpertRPCError:
    """A gRPC error -> a ShardFault (re-plan) or an ExpertRPCError (fail the step)."""
    code = error.code()
    details = error.details() or ""
    if code in FAULT_CODES:
        return ShardFault(shard_id, f"{code.name}: {details}", code in CONNECTION_CODES)
    return ExpertRPCError(shard_id, address, layer, code.name, details)


@dataclass
class _Exclusion:
    version: int  # excluded until a table newer than this arrives
    reason: str
    since: float


class Exclusions:
    """Shards this router saw fail, kept out of its plans (thread-safe: the caller thread plans
    first attempts, the loop thread re-plans)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, _Exclusion] = {}

    def add(self, shard_id: str, version: int, reason: str) -> None:
        with self._lock:
            old = self._by_id.get(shard_id)
            if old is None or old.version < version:
                self._by_id[shard_id] = _Exclusion(version, reason, time.monotonic())

    def remove(self, shard_id: str) -> None:
        with self._lock:
            self._by_id.pop(shard_id, None)

    def active(self, table: PlacementTable) -> frozenset[str]:
        """Ids still excluded under `table` (entries older than the table expire)."""
        with self._lock:
            for sid in [s for s, x in self._by_id.items() if x.version < table.version]:
                del self._by_id[sid]
            return frozenset(self._by_id)

    def indices(self, table: PlacementTable) -> frozenset[int]:
        active = self.active(table)
        return frozenset(table.index(s) for s in active if s in table.shard_ids)

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return {s: x.reason for s, x in self._by_id.items()}
