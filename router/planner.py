"""Plan a layer step's routed (token, expert) pairs onto shards, and build one call per shard.

Shape legend: T tokens, K experts per token, H hidden, N pairs being planned, R the most live
holders any expert of the layer has. Pairs are flat indices t * K + k into ids [T, K].

`assign` picks, for every pair, one LIVE holder of (layer, expert) that is not excluded;
replicas of one expert share its pairs round-robin (the i-th pair of expert e in this step
goes to holder (i + turn) % n_e, with `turn` advancing every step), so a hot expert's tokens
are spread over its copies. Pairs no live holder covers get -1. `build_calls` then groups the
pairs by shard: one message per shard, each token's hidden row once, its other experts' slots
padded with -1 / 0.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from router import wire
from router.placement import PlacementTable
from router.rpc import expert_pb2 as pb


@dataclass
class Step:
    """One submitted layer step: its routed work and the accumulator of the answers."""

    layer: int
    hidden: torch.Tensor  # [T, H]
    ids: torch.Tensor  # [T, K] long, global ids
    weights: torch.Tensor  # [T, K] float32
    request_id: str
    out: torch.Tensor | None = None  # [T, H] float64 accumulator (made on the loop thread)
    deadline: float | None = None  # set when the step first waits for recovery
    wait_start: float = 0.0


@dataclass
class Call:
    """One shard call: `pairs` (flat pair indices) of `tokens` (step token indices)."""

    shard_id: str
    address: str
    tokens: torch.Tensor  # [T_s] long, ascending
    pairs: torch.Tensor  # [N_s] long
    message: pb.ComputeRequest


def holder_matrix(table: PlacementTable, layer: int, excluded: Collection[int]) -> torch.Tensor:
    """[E, R] live holders of each expert of `layer` minus `excluded` shard indices, valid
    entries first, -1 padded."""
    m = table.live_holder_matrix(layer)
    if not excluded:
        return m
    drop = torch.isin(m, torch.tensor(sorted(excluded), dtype=torch.long))
    m = m.masked_fill(drop, -1)
    order = torch.argsort((m < 0).to(torch.int8), dim=1, stable=True)
    return torch.gather(m, 1, order)


def assign(
    table: PlacementTable, layer: int, experts: torch.Tensor, excluded: Collection[int] = (),
    turn: int = 0,
) -> torch.Tensor:  # fmt: skip
    """experts [N] (global ids of `layer`) -> [N] shard index per pair, -1 where uncovered."""
    m = holder_matrix(table, layer, excluded)
    if experts.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    if m.shape[1] == 1:
        return m[experts, 0]
    n = (m >= 0).sum(1)  # [E] live holders per expert
    order = torch.argsort(experts, stable=True)
    sorted_e = experts[order]
    counts = torch.bincount(sorted_e, minlength=m.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(experts)
    rank[order] = torch.arange(experts.numel()) - starts[sorted_e]
    ne = n[experts]
    slot = (rank + turn) % ne.clamp(min=1)
    return torch.where(ne > 0, m[experts, slot], -1)


def build_calls(
    table: PlacementTable,
    layer: int,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    pairs: torch.Tensor,
    shard_of_pair: torch.Tensor,
    request_id: str,
) -> list[Call]:
    """One Call per shard in `shard_of_pair` ([N] indices for `pairs`, all >= 0).

    hidden [T, H]; ids [T, K] long global ids; weights [T, K] float32. The slicing runs in
    numpy (a few microseconds per shard; the same in torch costs ~5x more in op dispatch)."""
    T, K = ids.shape
    owner = np.full(T * K, -1, dtype=np.int64)
    owner[pairs.numpy()] = shard_of_pair.numpy()
    owner = owner.reshape(T, K)
    rows, hidden_dtype = wire.tensor_array(hidden)
    ids32 = ids.numpy().astype(np.int32)
    w = weights.numpy()
    calls = []
    for s in np.unique(shard_of_pair.numpy()).tolist():
        on = owner == s
        mine = np.flatnonzero(on)
        tokens = np.flatnonzero(on.any(1))
        if len(tokens) < T:
            on, x, e, g = on[tokens], rows[tokens], ids32[tokens], w[tokens]
        else:
            x, e, g = rows, ids32, w
        spec = table.shards[s]
        message = wire.build_request(
            layer, x, hidden_dtype, np.where(on, e, np.int32(-1)), np.where(on, g, _ZERO),
            f"{request_id}:{spec.shard_id}", table.version, spec.shard_id,
        )  # fmt: skip
        calls.append(
            Call(spec.shard_id, spec.address, torch.from_numpy(tokens), torch.from_numpy(mine),
                 message)
        )  # fmt: skip
    return calls


_ZERO = np.float32(0.0)
