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

    hidden [T, H]; ids [T, K] long global ids; weights [T, K] float32."""
    T, K = ids.shape
    owner = torch.full((T * K,), -1, dtype=torch.long)
    owner[pairs] = shard_of_pair
    owner = owner.view(T, K)
    ids32 = ids.to(torch.int32)
    calls = []
    for s in torch.unique(shard_of_pair).tolist():
        on = owner == s
        tokens = on.any(1).nonzero().squeeze(1)
        on = on[tokens]
        spec = table.shards[s]
        request = wire.ExpertRequest(
            layer,
            hidden[tokens],
            ids32[tokens].masked_fill(~on, -1),
            weights[tokens].masked_fill(~on, 0.0),
            f"{request_id}:{spec.shard_id}",
            table.version,
            spec.shard_id,
        )
        message = wire.encode_request(request)
        mine = pairs[shard_of_pair == s]
        calls.append(Call(spec.shard_id, spec.address, tokens, mine, message))
    return calls
