"""The expert-shard Ray actor: holds a per-layer set of experts, serves them over gRPC on the
node address, and loads / releases experts live while calls are in flight.

    actor = ray.remote(ExpertShardActor).options(...).remote(
        model_dir, "shard-3", {layer: [expert ids]}, "float32", token=..., tls=...)
    info = ray.get(actor.ready.remote())   # {"shard_id", "address", "node_id", "experts"}

`load` reads only the added experts' bytes from the checkpoint (on a thread: the server keeps
answering), then swaps a whole new `ExpertWeights` into the servicer; `release` swaps in one
without the removed rows. Loads and releases are serialized; a call in flight finishes on the
weights it started with, so nothing ever computes with a half-updated set. The gRPC server
itself is `workers.shard_server` (re-exported here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from router.security import TLSFiles
from workers.config import compute_dtype
from workers.experts import ExpertWeights
from workers.resources import pin_torch_threads
from workers.shard_server import (
    DEFAULT_MAX_MESSAGE_MB,
    SERVICE_NAME,
    ExpertServer,
    ExpertShardServicer,
    layer_assignment,
    start_expert_server,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_MB", "SERVICE_NAME", "ExpertShardActor", "ExpertShardServicer",
    "layer_assignment", "start_expert_server",
]  # fmt: skip


class ExpertShardActor:
    """Ray actor serving one shard (all methods async; the gRPC server computes on its own
    threads, so loads and releases never wait behind calls). The server starts first
    (UNAVAILABLE / NOT_SERVING while loading); `ready()` returns once the constructor's
    assignment is loaded. Binds the node IP unless `host` is given (e.g. "0.0.0.0" when
    configured; the advertised address stays the node IP)."""

    def __init__(
        self,
        model_dir: str,
        shard_id: str,
        assignment: Mapping[int, Sequence[int]],
        dtype: str = "float32",
        *,
        max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
        torch_threads: int | None = None,
        token: str | None = None,
        tls: TLSFiles | None = None,
        host: str | None = None,
        expert_dtype: str | None = None,
    ) -> None:
        self.model_dir = str(model_dir)
        self.shard_id = shard_id
        self.assignment = layer_assignment(assignment)
        self.expert_dtype = expert_dtype  # storage (workers/quant.py); None: as `dtype`
        self.dtype = compute_dtype(dtype)
        self.max_message_mb = max_message_mb
        self.torch_threads = torch_threads
        self.token, self.tls, self.host = token, tls, host
        self.servicer: ExpertShardServicer | None = None
        self._server: ExpertServer | None = None
        self._address = ""
        self._serve_task: asyncio.Task | None = None
        self._load_task: asyncio.Task | None = None
        self._changes = asyncio.Lock()
        self._counts = {"loads": 0, "releases": 0, "experts_loaded": 0, "experts_released": 0}

    # ------------------------------------------------------------------ start
    async def _serving(self) -> ExpertShardServicer:
        if self._serve_task is None:
            self._serve_task = asyncio.ensure_future(self._serve())
        await asyncio.shield(self._serve_task)
        assert self.servicer is not None
        return self.servicer

    async def _serve(self) -> None:
        import ray

        from workers.config import ModelConfig

        pin_torch_threads(self.torch_threads)
        config = await asyncio.to_thread(ModelConfig.from_hf, self.model_dir)
        self._config = config
        self.servicer = ExpertShardServicer(
            None, self.shard_id, num_layers=config.num_hidden_layers
        )
        node_ip = ray.util.get_node_ip_address()
        bind = self.host or node_ip
        self._server, _ = start_expert_server(
            self.servicer, bind, 0, self.max_message_mb, token=self.token, tls=self.tls,
            advertise_host=node_ip,
        )  # fmt: skip
        self._address = self._server.address

    def _read(self, assignment: dict[int, list[int]]) -> ExpertWeights:
        from workers.checkpoint import load_expert_weights

        # as local experts: an fp32 compute of a bf16 checkpoint keeps bf16 (bit-identical)
        lossless = "lossless" if self.dtype == torch.float32 else None
        return load_expert_weights(
            self.model_dir, self._config, dtype=self.dtype, progress=False,
            storage=self.expert_dtype or lossless, assignment=assignment,
        )  # fmt: skip

    async def _load_initial(self) -> None:
        servicer = await self._serving()
        weights = await asyncio.to_thread(self._read, self.assignment)
        servicer.set_weights(weights)

    async def ready(self) -> dict[str, Any]:
        """Start serving and load the constructor's experts (once); address, node, experts."""
        import ray

        await self._serving()
        if self._load_task is None:
            self._load_task = asyncio.ensure_future(self._load_initial())
        await asyncio.shield(self._load_task)
        return {
            "shard_id": self.shard_id,
            "address": self._address,
            "node_id": ray.get_runtime_context().get_node_id(),
            "experts": await self.holdings(),
        }

    async def address(self) -> str:
        """host:port of the shard's server (available before the weights are loaded)."""
        await self._serving()
        return self._address

    # ------------------------------------------------------------------ live changes
    async def _weights(self) -> ExpertWeights:
        await self.ready()
        assert self.servicer is not None and self.servicer.weights is not None
        return self.servicer.weights

    async def load(self, additions: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
        """Also hold `additions` ({layer: expert ids}; ones held already are skipped), reading
        only their bytes. Returns the holdings afterwards."""
        await self.ready()
        async with self._changes:
            current = await self._weights()
            held = current.holdings()
            new = {
                layer: [e for e in ids if e not in set(held.get(layer, ()))]
                for layer, ids in layer_assignment(additions).items()
            }
            new = {layer: ids for layer, ids in new.items() if ids}
            if new:
                extra = await asyncio.to_thread(self._read, new)
                assert self.servicer is not None
                self.servicer.set_weights(current.with_experts(extra))
                self._counts["loads"] += 1
                self._counts["experts_loaded"] += sum(len(v) for v in new.values())
        return await self.holdings()

    async def release(self, removals: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
        """Stop holding `removals` ({layer: ids}; ones not held are ignored); calls in flight
        finish first on the old weights. Returns the holdings afterwards."""
        await self.ready()
        async with self._changes:
            current = await self._weights()
            drop = layer_assignment(removals)
            before = sum(len(v) for v in current.experts.values())
            after = current.without_experts(drop)
            released = before - sum(len(v) for v in after.experts.values())
            if released:
                assert self.servicer is not None
                self.servicer.set_weights(after)
                self._counts["releases"] += 1
                self._counts["experts_released"] += released
        return await self.holdings()

    # ------------------------------------------------------------------ queries
    async def holdings(self) -> dict[int, list[int]]:
        """{layer: sorted expert ids} held now ({} before the weights are loaded)."""
        w = self.servicer.weights if self.servicer is not None else None
        return w.holdings() if w is not None else {}

    async def stats(self) -> dict[str, Any]:
        """Lifetime counters (calls, rows, pairs, compute_s, errors, rejected, loads, ...)."""
        base = self.servicer.stats() if self.servicer is not None else {"ready": False}
        return dict(base, **self._counts, shard_id=self.shard_id, address=self._address)

    async def ping(self) -> dict[str, Any]:
        """Cheap liveness answer: shard id, whether the weights are in, and the address."""
        ready = self.servicer is not None and self.servicer.ready
        return {"shard_id": self.shard_id, "ready": ready, "address": self._address}

    async def shutdown(self, grace_s: float = 1.0) -> None:
        """NOT_SERVING, let calls in flight finish for up to `grace_s`, then stop the server."""
        if self.servicer is not None and self._server is not None:
            self.servicer.health.enter_graceful_shutdown()
            await asyncio.to_thread(self._server.stop, grace_s)
