"""Shared helpers for the router tests: random expert weights, routing, and in-process expert
shard servers on 127.0.0.1 (their own server threads; the client has its own loop)."""

from __future__ import annotations

import torch

from router.placement import PlacementTable, ShardSpec
from workers.expert_shard import start_expert_server
from workers.experts import ExpertWeights

E, H, I, K = 512, 64, 32, 10
LAYERS = (0, 1)


def random_weights(seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    w13 = {layer: torch.randn(E, 2 * I, H, generator=g) / H**0.5 for layer in LAYERS}
    w2 = {layer: torch.randn(E, H, I, generator=g) / I**0.5 for layer in LAYERS}
    return ExpertWeights(tuple(range(E)), w13, w2)


def shard_weights(full: ExpertWeights, spec: ShardSpec) -> ExpertWeights:
    """What a shard loads: per layer, the global experts its spec names, in that order."""
    held = {layer: ids for layer, ids in enumerate(spec.experts) if ids}
    return ExpertWeights(
        held,
        {layer: full.w13[layer][list(ids)] for layer, ids in held.items()},
        {layer: full.w2[layer][list(ids)] for layer, ids in held.items()},
    )


def routing(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    scores = torch.randn(T, E, generator=g).softmax(-1)
    weights, ids = scores.topk(K, dim=-1)
    return hidden, ids, weights / weights.sum(-1, keepdim=True)


class ShardServers:
    """Expert shard servers (gRPC server threads; the client has its own loop)."""

    def __init__(self, full: ExpertWeights) -> None:
        self.full = full
        self.servers: dict[str, object] = {}  # address -> server

    def start(self, spec: ShardSpec, servicer=None, **kwargs) -> str:
        """Serve `spec`'s experts (or `servicer`); returns the address."""
        target = servicer or shard_weights(self.full, spec)
        server, _ = start_expert_server(target, shard_id=spec.shard_id, **kwargs)
        self.servers[server.address] = server
        return server.address

    def serve(self, table: PlacementTable) -> PlacementTable:
        """Start one server per shard of `table`; returns the table with their addresses."""
        return table.with_addresses({s.shard_id: self.start(s) for s in table.shards})

    def stop(self, address: str) -> None:
        self.servers.pop(address).stop(None)

    def close(self) -> None:
        for address in list(self.servers):
            self.stop(address)
