"""EPLB for the expert pool: turn the load window into a placement with redundant copies of hot
experts, packed so the most loaded shard of each layer is as close to the mean as it gets.

Shape legend: L MoE layers, E experts per layer, S live shards, c[e] routed pairs of expert e
in the window, n[e] its replicas. The router deals an expert's pairs round-robin over its live
replicas (router/planner.py), so each replica carries c[e] / n[e].

Per layer (each layer is placed on its own; a hot expert of layer 7 is copied in layer 7 only):

1. Replica counts: every expert gets one; the spare slots (`capacity` per shard: its share
   ceil(E / S) plus `redundant_per_shard`) go, one at a time, to the expert with the largest
   c[e] / n[e], until the largest replica load is a small fraction of a shard's mean load.
2. Packing: replicas in decreasing load go to the least loaded shard with a free slot that does
   not hold that expert yet; among shards within `keep_slack` of the least loaded, one that
   already holds the expert is preferred (fewer bytes to load).
3. Local search: moves and swaps between the most and least loaded shard while the maximum
   drops.

`plan` keeps a layer's new placement only where it beats the old one by `min_gain` (so it is
never worse than before); `Rebalancer.decide` adds the trigger threshold and the minimum
interval (hysteresis: it does not thrash on noise).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cluster.expert_load import Assignment, imbalance, shard_loads, weighted_imbalance

PerLayer = tuple[tuple[int, ...], ...]  # one sorted tuple of expert ids per layer


@dataclass(frozen=True)
class RebalanceConfig:
    """Cluster YAML `experts.rebalance` (the budget is `experts.redundant_per_shard`)."""

    enabled: bool = False
    interval_s: float = 30.0  # at least this long between two rebalances
    trigger: float = 1.15  # act on layers whose imbalance (max/mean rows per shard) is above
    min_gain: float = 0.05  # keep a layer's new placement only if it cuts imbalance this much
    min_pairs: int = 2000  # a layer needs this many routed pairs in the window to be judged


@dataclass(frozen=True)
class Plan:
    """A new assignment of the live shards and what it changes."""

    assignment: dict[str, PerLayer]
    before: np.ndarray  # [L] imbalance under the old assignment
    after: np.ndarray  # [L] imbalance under the new one
    layers: tuple[int, ...]  # layers whose placement changed

    def changes(self, current: Assignment) -> dict[str, tuple[dict, dict]]:
        """{shard_id: (additions, removals)} as {layer: [ids]} relative to `current`."""
        out = {}
        for sid, target in self.assignment.items():
            have = current.get(sid, ())
            add, drop = {}, {}
            for layer, ids in enumerate(target):
                old = set(have[layer]) if layer < len(have) else set()
                if set(ids) - old:
                    add[layer] = sorted(set(ids) - old)
                if old - set(ids):
                    drop[layer] = sorted(old - set(ids))
            if add or drop:
                out[sid] = (add, drop)
        return out

    def pairs_added(self, current: Assignment) -> int:
        """(layer, expert) copies the shards must load for this plan."""
        return sum(len(ids) for add, _ in self.changes(current).values() for ids in add.values())


def capacity(num_experts: int, num_shards: int, redundant_per_shard: int) -> int:
    """(layer, expert) slots per shard per layer: its share of E plus the redundant budget."""
    if num_shards < 1:
        raise ValueError("no live shard to place experts on")
    return min(num_experts, math.ceil(num_experts / num_shards) + max(0, redundant_per_shard))


def replica_counts(load: np.ndarray, num_shards: int, cap: int, stop_frac: float = 0.1):
    """[E] replicas per expert: 1 each, then spare slots to the largest per-replica load until
    that load is at most `stop_frac` of a shard's mean load (or slots / shards run out)."""
    num_experts = len(load)
    n = np.ones(num_experts, dtype=np.int64)
    spare = num_shards * cap - num_experts
    mean = float(load.sum()) / num_shards
    heap = [(-float(load[e]), e) for e in range(num_experts)]
    heapq.heapify(heap)
    while spare > 0 and heap:
        neg, e = heapq.heappop(heap)
        if -neg <= stop_frac * mean or n[e] >= num_shards:
            if n[e] >= num_shards:
                continue  # this expert is everywhere; look at the next
            break
        n[e] += 1
        spare -= 1
        heapq.heappush(heap, (-float(load[e]) / n[e], e))
    return n


def pack_layer(
    load: np.ndarray, n: np.ndarray, shard_ids: Sequence[str],
    current: Mapping[str, set[int]], cap: int, keep_slack: float = 0.25,
) -> dict[str, set[int]]:  # fmt: skip
    """Place n[e] replicas of each expert (distinct shards, <= cap per shard)."""
    mean = float(load.sum()) / len(shard_ids) or 1.0
    slack = keep_slack * mean
    items = sorted(
        ((float(load[e]) / n[e], e) for e in range(len(load)) for _ in range(int(n[e]))),
        key=lambda x: (-x[0], x[1]),
    )
    held: dict[str, set[int]] = {s: set() for s in shard_ids}
    total = dict.fromkeys(shard_ids, 0.0)
    for w, e in items:
        cands = [s for s in shard_ids if len(held[s]) < cap and e not in held[s]]
        if not cands:
            if any(e in h for h in held.values()):
                continue  # a redundant copy with nowhere to go: drop it
            raise ValueError(f"no free slot for expert {e} (capacity {cap})")
        best = min(total[s] for s in cands)
        keep = [s for s in cands if e in current.get(s, ()) and total[s] <= best + slack]
        s = min(keep or cands, key=lambda s: total[s])
        held[s].add(e)
        total[s] += w
    _local_search(load, held, total, cap)
    return held


def _local_search(load, held, total, cap, rounds: int = 200) -> None:
    """Move or swap replicas between the most and least loaded shards while the max drops."""
    count = {e: 0 for e in range(len(load))}
    for h in held.values():
        for e in h:
            count[e] += 1
    weight = {e: float(load[e]) / c for e, c in count.items() if c}
    for _ in range(rounds):
        hi = max(total, key=total.get)
        lo = min(total, key=total.get)
        gap = total[hi] - total[lo]
        if hi == lo or gap <= 1e-12:
            return
        best = None  # (new max of the pair, out of hi, into hi or None)
        if len(held[lo]) < cap:
            for e in held[hi] - held[lo]:
                w = weight[e]
                if 0 < w < gap:
                    m = max(total[hi] - w, total[lo] + w)
                    if best is None or m < best[0]:
                        best = (m, e, None)
        outs = [e for e in held[hi] if e not in held[lo]]
        ins = [e for e in held[lo] if e not in held[hi]]
        if outs and ins:
            wo = np.array([weight[e] for e in outs])
            wi = np.array([weight[e] for e in ins])
            d = wo[:, None] - wi[None, :]  # load moved from hi to lo
            m = np.maximum(total[hi] - d, total[lo] + d)
            m[(d <= 0) | (d >= gap)] = np.inf
            i, j = np.unravel_index(int(np.argmin(m)), m.shape)
            if np.isfinite(m[i, j]) and (best is None or m[i, j] < best[0]):
                best = (float(m[i, j]), outs[i], ins[j])
        if best is None or best[0] >= total[hi] - 1e-12:
            return
        _, out, into = best
        held[hi].remove(out)
        held[lo].add(out)
        total[hi] -= weight[out]
        total[lo] += weight[out]
        if into is not None:
            held[lo].remove(into)
            held[hi].add(into)
            total[lo] -= weight[into]
            total[hi] += weight[into]


def plan(
    counts: np.ndarray, current: Assignment, redundant_per_shard: int, *,
    layers: Sequence[int] | None = None, min_gain: float = 0.0, force: bool = False,
) -> Plan:  # fmt: skip
    """A new assignment of the shards in `current` (live shards; a shard may hold nothing yet;
    experts no shard holds are placed too). A layer changes only where its imbalance drops by
    more than `min_gain` (relative), or where it must (`force`, or an expert is not held)."""
    counts = np.asarray(counts, dtype=np.float64)
    num_layers, num_experts = counts.shape
    shard_ids = list(current)
    cap = capacity(num_experts, len(shard_ids), redundant_per_shard)
    before = imbalance(shard_loads(counts, current))
    new = {sid: [tuple(sorted(x)) for x in current[sid]] for sid in shard_ids}
    for sid in shard_ids:  # a new, empty shard: no layers yet
        new[sid] += [()] * (num_layers - len(new[sid]))
    changed = []
    for layer in range(num_layers) if layers is None else layers:
        have = {sid: set(new[sid][layer]) for sid in shard_ids}
        held = set().union(*have.values())
        must = force or len(held) < num_experts
        # epsilon: idle experts still need a slot, and ties break by id
        load = counts[layer] + 1e-6 * (counts[layer].sum() / num_experts + 1.0)
        n = replica_counts(load, len(shard_ids), cap)
        packed = pack_layer(load, n, shard_ids, have, cap)
        old_imb = _layer_imbalance(counts[layer], have) if held == set(range(num_experts)) else None
        new_imb = _layer_imbalance(counts[layer], packed)
        better = old_imb is None or new_imb < old_imb * (1.0 - min_gain) - 1e-12
        if (must or better) and packed != have:
            for sid in shard_ids:
                new[sid][layer] = tuple(sorted(packed[sid]))
            changed.append(layer)
    assignment = {sid: tuple(new[sid]) for sid in shard_ids}
    after = imbalance(shard_loads(counts, assignment))
    return Plan(assignment, before, after, tuple(changed))


def _layer_imbalance(row: np.ndarray, held: Mapping[str, set[int]]) -> float:
    loads = shard_loads(row[None, :], {s: (tuple(h),) for s, h in held.items()})
    return float(imbalance(loads)[0])


class Rebalancer:
    """When to rebalance: a layer with enough data above `trigger`, at most once per
    `interval_s`; the plan must cut that layer's imbalance by `min_gain`."""

    def __init__(self, config: RebalanceConfig, redundant_per_shard: int) -> None:
        self.config, self.redundant_per_shard = config, redundant_per_shard
        self.last: float | None = None

    def decide(
        self, counts: np.ndarray, current: Assignment, now: float | None = None
    ) -> Plan | None:
        now = time.monotonic() if now is None else now
        c = self.config
        if not c.enabled or not current:
            return None
        if self.last is not None and now - self.last < c.interval_s:
            return None
        counts = np.asarray(counts)
        rows = counts.sum(1)
        per_layer = imbalance(shard_loads(counts, current))
        hot = [
            layer for layer in range(counts.shape[0])
            if rows[layer] >= c.min_pairs and per_layer[layer] > c.trigger
        ]  # fmt: skip
        if not hot:
            return None
        result = plan(counts, current, self.redundant_per_shard, layers=hot, min_gain=c.min_gain)
        if not result.layers:
            return None
        self.last = now
        return result

    @staticmethod
    def summary(counts: np.ndarray, result: Plan) -> str:
        b = weighted_imbalance(counts, result.before)
        a = weighted_imbalance(counts, result.after)
        worst = max(result.layers, key=lambda layer: result.before[layer])
        return (
            f"rebalance {len(result.layers)} layers: imbalance {b:.3f} -> {a:.3f} "
            f"(worst layer {worst}: {result.before[worst]:.3f} -> {result.after[worst]:.3f})"
        )
