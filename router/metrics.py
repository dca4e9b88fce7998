"""Counters of a RemoteExpertBackend (thread-safe; times in seconds, sizes in bytes).

Traffic: steps, calls, tokens_submitted, rows_sent, bytes_sent / bytes_received, rpc_s,
dispatch_s, combine_s. Faults: faults (failed shard attempts that were re-planned), replans
(pair sets planned again after a fault), hedges (duplicate calls sent for slow ones) and
hedge_wins (hedges that answered first), waits / wait_s (steps that waited for a newer table or
a probe because no live replica was left), probes / probes_ok, recovered (waits that ended with
the step served), errors (hard failures that failed a step). All are lifetime counters.
"""

from __future__ import annotations

import threading
from typing import Any

COUNTERS = (
    "steps", "calls", "max_calls_per_step", "last_calls_per_step", "tokens_submitted",
    "rows_sent", "bytes_sent", "bytes_received", "rpc_s", "dispatch_s", "combine_s", "errors",
    "faults", "replans", "hedges", "hedge_wins", "waits", "wait_s", "recovered", "probes",
    "probes_ok",
)  # fmt: skip


class ClientMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._v: dict[str, float] = dict.fromkeys(COUNTERS, 0)
            self._rows_per_shard: dict[str, int] = {}
            self._calls_per_layer: dict[int, int] = {}
            self._faults_per_shard: dict[str, int] = {}

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            self._v[name] += value

    def record_step(self, layer: int, calls: int, tokens: int) -> None:
        """One submit: `calls` = shards with work in its first plan (one call each)."""
        with self._lock:
            v = self._v
            v["steps"] += 1
            v["tokens_submitted"] += tokens
            v["last_calls_per_step"] = calls
            v["max_calls_per_step"] = max(v["max_calls_per_step"], calls)

    def record_call(
        self, shard_id: str, layer: int, rows: int, sent: int, received: int, latency: float
    ) -> None:
        """One call that answered (successfully or not)."""
        with self._lock:
            v = self._v
            v["calls"] += 1
            v["rows_sent"] += rows
            v["bytes_sent"] += sent
            v["bytes_received"] += received
            v["rpc_s"] += latency
            self._rows_per_shard[shard_id] = self._rows_per_shard.get(shard_id, 0) + rows
            self._calls_per_layer[layer] = self._calls_per_layer.get(layer, 0) + 1

    def record_fault(self, shard_id: str) -> None:
        with self._lock:
            self._v["faults"] += 1
            self._faults_per_shard[shard_id] = self._faults_per_shard.get(shard_id, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Counters plus rows_sent_per_shard, calls_per_layer, faults_per_shard, calls_per_step
        and mean_rpc_ms."""
        with self._lock:
            out: dict[str, Any] = dict(self._v)
            out["rows_sent_per_shard"] = dict(self._rows_per_shard)
            out["calls_per_layer"] = dict(self._calls_per_layer)
            out["faults_per_shard"] = dict(self._faults_per_shard)
        out["calls_per_step"] = out["calls"] / out["steps"] if out["steps"] else 0.0
        out["mean_rpc_ms"] = 1e3 * out["rpc_s"] / out["calls"] if out["calls"] else 0.0
        return out
