"""The pool's load picture: a sliding window of routed pairs per (layer, expert), gathered from
every dense replica, and the figures derived from it.

Shape legend: L MoE layers, E experts per layer, S shards.

* `LoadWindow` keeps timestamped [L, E] deltas (rates, not lifetime totals) and the shards'
  lifetime compute counters, so both routed rows and busy time cover the same window.
* `shard_loads` spreads each expert's rows equally over its live holders (the router deals an
  expert's pairs round-robin over its replicas, router/planner.py), giving rows per shard per
  layer; `imbalance` is max/mean over the live shards of each layer.
* `layer_report` adds the hottest experts, the routing entropy and the expert-collapse alarm
  (a layer whose top `collapse_top_n` experts take more than `collapse_share` of its rows).

An assignment here is `{shard_id: per-layer tuples of global expert ids}` of the LIVE shards.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Assignment = Mapping[str, Sequence[Sequence[int]]]


@dataclass(frozen=True)
class LoadThresholds:
    """What the window reports on (cluster YAML `experts.load`)."""

    window_s: float = 60.0  # sliding window of routed pairs and busy time
    collapse_top_n: int = 4  # the alarm looks at a layer's top-n experts' share
    collapse_share: float = 0.5  # ... and fires above this share
    min_pairs: int = 2000  # fewer routed pairs in a layer's window: no alarm (too little data)


class LoadWindow:
    """Routed pairs per (layer, expert) and shard busy time over the last `window_s` seconds.

    Thread-safe: reporters add from one thread while the controller reads from another.
    """

    def __init__(self, num_layers: int, num_experts: int, window_s: float = 60.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.num_layers, self.num_experts, self.window_s = num_layers, num_experts, window_s
        self._lock = threading.Lock()
        self._deltas: deque[tuple[float, np.ndarray]] = deque()
        self._started: float | None = None
        self._busy: dict[str, deque[tuple[float, float, float]]] = {}  # sid -> (t, compute_s, rows)
        self.total_pairs = 0  # lifetime (a Prometheus counter)

    # ------------------------------------------------------------------ input
    def add(self, counts: np.ndarray, now: float | None = None) -> None:
        """One replica's routed pairs [L, E] since its previous report."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (self.num_layers, self.num_experts):
            raise ValueError(
                f"load delta has shape {counts.shape}, expected "
                f"({self.num_layers}, {self.num_experts})"
            )
        if (counts < 0).any():
            raise ValueError("load delta has negative counts")
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._started is None:
                self._started = now
            self._deltas.append((now, counts))
            self.total_pairs += int(counts.sum())
            self._expire(now)

    def add_shard_stats(self, shard_id: str, compute_s: float, rows: float, now=None) -> None:
        """A shard's lifetime compute seconds and rows (from its `stats()`), sampled now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            samples = self._busy.setdefault(shard_id, deque())
            if samples and compute_s < samples[-1][1]:  # a restarted process: counters reset
                samples.clear()
            samples.append((now, float(compute_s), float(rows)))
            self._expire(now)

    def forget_shard(self, shard_id: str) -> None:
        with self._lock:
            self._busy.pop(shard_id, None)

    def _expire(self, now: float) -> None:  # caller holds the lock
        edge = now - self.window_s
        while self._deltas and self._deltas[0][0] < edge:
            self._deltas.popleft()
        for samples in self._busy.values():
            while len(samples) > 2 and samples[1][0] <= edge:  # keep one sample at/before edge
                samples.popleft()

    # ------------------------------------------------------------------ output
    def counts(self, now: float | None = None) -> np.ndarray:
        """[L, E] routed pairs inside the window."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(now)
            out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
            for _, delta in self._deltas:
                out += delta
            return out

    def span_s(self, now: float | None = None) -> float:
        """Seconds the window covers now (shorter than window_s right after the start)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._started is None:
                return 0.0
            return max(min(self.window_s, now - self._started), 1e-9)

    def rates(self, now: float | None = None) -> np.ndarray:
        """[L, E] routed pairs per second over the window."""
        now = time.monotonic() if now is None else now
        span = self.span_s(now)
        return self.counts(now) / span if span else np.zeros((self.num_layers, self.num_experts))

    def busy(self, now: float | None = None) -> dict[str, float]:
        """Per shard: fraction of the window its compute thread was busy (0..1)."""
        now = time.monotonic() if now is None else now
        out = {}
        with self._lock:
            self._expire(now)
            for sid, samples in self._busy.items():
                if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
                    (t0, c0, _), (t1, c1, _) = samples[0], samples[-1]
                    out[sid] = min(1.0, max(0.0, (c1 - c0) / (t1 - t0)))
        return out


# ---------------------------------------------------------------------------------- figures
def shard_loads(counts: np.ndarray, assignment: Assignment) -> dict[str, np.ndarray]:
    """{shard_id: [L] rows}: each expert's rows split equally over its live holders."""
    counts = np.asarray(counts, dtype=np.float64)
    num_layers, num_experts = counts.shape
    holders = np.zeros((num_layers, num_experts))
    for experts in assignment.values():
        for layer, ids in enumerate(experts):
            holders[layer, list(ids)] += 1
    share = np.divide(counts, holders, out=np.zeros_like(counts), where=holders > 0)
    return {
        sid: np.array([share[layer, list(ids)].sum() for layer, ids in enumerate(experts)])
        for sid, experts in assignment.items()
    }


def imbalance(loads: Mapping[str, np.ndarray]) -> np.ndarray:
    """[L] max/mean of shard loads per layer (1.0 = perfect; 1.0 for an idle layer)."""
    if not loads:
        return np.zeros(0)
    m = np.stack(list(loads.values()))  # [S, L]
    mean = m.mean(0)
    return np.divide(m.max(0), mean, out=np.ones_like(mean), where=mean > 0)


def weighted_imbalance(counts: np.ndarray, per_layer: np.ndarray) -> float:
    """Mean of per-layer imbalance weighted by each layer's rows (idle layers weigh nothing)."""
    rows = np.asarray(counts).sum(1).astype(np.float64)
    if rows.sum() <= 0:
        return 1.0
    return float((per_layer * rows).sum() / rows.sum())


def entropy(counts: np.ndarray) -> np.ndarray:
    """[L] routing entropy in nats of each layer's expert distribution (log E = uniform)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(1)


def layer_report(
    counts: np.ndarray, assignment: Assignment, thresholds: LoadThresholds, top: int = 5
) -> list[dict]:
    """One dict per layer: rows, hottest experts (id, share), entropy (nats and / log E),
    top-n share, collapse alarm, per-shard rows and imbalance."""
    counts = np.asarray(counts, dtype=np.int64)
    num_layers, num_experts = counts.shape
    loads = shard_loads(counts, assignment)
    imb = imbalance(loads) if loads else np.ones(num_layers)
    ent = entropy(counts)
    out = []
    for layer in range(num_layers):
        row = counts[layer]
        total = int(row.sum())
        order = np.argsort(-row, kind="stable")
        share = row / total if total else np.zeros(num_experts)
        top_n = float(share[order[: thresholds.collapse_top_n]].sum())
        out.append({
            "layer": layer,
            "rows": total,
            "hottest": [(int(e), float(share[e])) for e in order[:top] if row[e] > 0],
            "entropy": float(ent[layer]),
            "entropy_norm": float(ent[layer] / math.log(num_experts)) if num_experts > 1 else 1.0,
            "top_n_share": top_n,
            "collapse": bool(total >= thresholds.min_pairs and top_n > thresholds.collapse_share),
            "shard_rows": {sid: float(v[layer]) for sid, v in loads.items()},
            "imbalance": float(imb[layer]),
        })  # fmt: skip
    return out
