"""RemoteExpertBackend: the ExpertBackend seam over gRPC expert shards.

`submit` (called from the synchronous model code) groups the step's (token, expert) pairs by
shard using a snapshot of the placement table, sends each shard ONE request holding each of its
tokens' hidden rows once (with per-token local rows and weights, padded to K with -1 / 0), and
returns a handle at once. The calls run concurrently on the backend's own asyncio loop (a daemon
thread); `handle.result()` waits for them and scatter-adds the per-token partial sums into
[T, H] in token order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from router import wire
from router.placement import PlacementHandle, PlacementTable
from router.rpc import expert_pb2 as pb
from router.rpc import expert_pb2_grpc as pb_grpc
from workers.experts import DoneHandle, UnknownExpertError

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
]  # fmt: skip


class ExpertRPCError(RuntimeError):
    """A shard call failed; names the shard, its address, the layer and the gRPC status."""

    def __init__(self, shard: int, address: str, layer: int, code: str, details: str) -> None:
        self.shard, self.address, self.layer, self.code, self.details = (
            shard, address, layer, code, details
        )  # fmt: skip
        super().__init__(
            f"expert shard {shard} at {address or '<no address>'} failed for layer {layer}: "
            f"{code}: {details}"
        )


class ClientMetrics:
    """Thread-safe counters of a RemoteExpertBackend (times in seconds, sizes in bytes)."""

    _COUNTERS = (
        "steps", "calls", "max_calls_per_step", "last_calls_per_step", "tokens_submitted",
        "rows_sent", "bytes_sent", "bytes_received", "rpc_s", "dispatch_s", "combine_s", "errors",
    )  # fmt: skip

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._v: dict[str, float] = dict.fromkeys(self._COUNTERS, 0)
            self._rows_per_shard: dict[int, int] = {}
            self._calls_per_layer: dict[int, int] = {}

    def add(self, name: str, value: float) -> None:
        with self._lock:
            self._v[name] += value

    def record_step(self, layer: int, calls: int, tokens: int) -> None:
        """One submit: `calls` = number of shards with work (one call each)."""
        with self._lock:
            v = self._v
            v["steps"] += 1
            v["calls"] += calls
            v["tokens_submitted"] += tokens
            v["last_calls_per_step"] = calls
            v["max_calls_per_step"] = max(v["max_calls_per_step"], calls)
            self._calls_per_layer[layer] = self._calls_per_layer.get(layer, 0) + calls

    def record_call(self, shard: int, rows: int, sent: int, received: int, latency: float) -> None:
        with self._lock:
            v = self._v
            v["rows_sent"] += rows
            v["bytes_sent"] += sent
            v["bytes_received"] += received
            v["rpc_s"] += latency
            self._rows_per_shard[shard] = self._rows_per_shard.get(shard, 0) + rows

    def snapshot(self) -> dict[str, Any]:
        """Counters plus rows_sent_per_shard, calls_per_layer, calls_per_step, mean_rpc_ms."""
        with self._lock:
            out: dict[str, Any] = dict(self._v)
            out["rows_sent_per_shard"] = dict(self._rows_per_shard)
            out["calls_per_layer"] = dict(self._calls_per_layer)
        done = out["calls"] - out["errors"]
        out["calls_per_step"] = out["calls"] / out["steps"] if out["steps"] else 0.0
        out["mean_rpc_ms"] = 1e3 * out["rpc_s"] / done if done > 0 else 0.0
        return out


@dataclass
class _ShardWork:
    shard: int
    address: str
    tokens: torch.Tensor  # [T_s] long: which of the step's tokens this shard got
    message: pb.ComputeRequest


class RemoteHandle:
    """Result of one submit: `result()` blocks for every shard's reply and combines them."""

    def __init__(self, backend: RemoteExpertBackend, future, work, layer, shape, dtype) -> None:
        self._backend, self._future, self._work = backend, future, work
        self._layer, self._shape, self._dtype = layer, shape, dtype
        self._value: torch.Tensor | None = None

    def result(self, timeout: float | None = None) -> torch.Tensor:
        if self._value is None:
            try:
                replies = self._future.result(timeout)
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"layer {self._layer}: shards did not answer in time") from None
            self._value = self._backend._combine(
                self._layer, self._work, replies, self._shape, self._dtype
            )
        return self._value


class RemoteExpertBackend:
    """ExpertBackend that ships each layer-step's routed work to the shards in `placement`."""

    def __init__(
        self, placement: PlacementTable | PlacementHandle, *, timeout_s: float = 30.0,
        max_message_mb: float = 256.0,
    ) -> None:  # fmt: skip
        if isinstance(placement, PlacementTable):
            placement = PlacementHandle(placement)
        self.placement = placement
        self.timeout_s = timeout_s
        self._options = wire.message_options(max_message_mb) + _KEEPALIVE
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.ExpertShardStub]] = {}
        self._rr_lock, self._rr = threading.Lock(), {}  # expert -> next replica turn
        self._steps = itertools.count()
        self._metrics = ClientMetrics()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rpc", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> RemoteHandle | DoneHandle:
        """Start layer `layer`'s routed work: hidden [T, H], ids [T, K] global, weights [T, K]."""
        if self._closed:
            raise RuntimeError("RemoteExpertBackend is closed")
        start = time.perf_counter()
        table = self.placement.snapshot()
        work = self._plan(table, layer, hidden, ids, weights)
        self._metrics.record_step(layer, len(work), int(hidden.shape[0]))
        if not work:
            return DoneHandle(torch.zeros_like(hidden))
        future = asyncio.run_coroutine_threadsafe(self._call_all(layer, work), self._loop)
        self._metrics.add("dispatch_s", time.perf_counter() - start)
        return RemoteHandle(self, future, work, layer, tuple(hidden.shape), hidden.dtype)

    def metrics(self) -> dict[str, Any]:
        return self._metrics.snapshot()

    def reset_metrics(self) -> None:
        self._metrics.reset()

    def shard_info(self) -> list[wire.ShardInfo]:
        """Info from every shard of the current table (checks rows match `local_rows`)."""
        table = self.placement.snapshot()
        coro = self._info_all(table)
        infos = asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout_s)
        for s, info in enumerate(infos):
            if info.ready and info.expert_ids != table.local_rows(s):
                raise ExpertRPCError(
                    s, table.addresses[s], -1, "PLACEMENT_MISMATCH",
                    "shard rows differ from the placement table's local_rows",
                )  # fmt: skip
        return infos

    def close(self) -> None:
        """Close every channel and stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._close_channels(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> RemoteExpertBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ dispatch (caller thread)
    def _plan(self, table, layer, hidden, ids, weights) -> list[_ShardWork]:
        ids = ids.long()
        valid = ids >= 0
        if not bool(valid.any()):
            return []
        if int(ids.max()) >= table.num_experts:
            raise UnknownExpertError(f"expert {int(ids.max())} is not in the placement table")
        safe = ids.clamp(min=0)
        shard_tk = torch.where(valid, self._shard_of(table, ids[valid])[safe], -1)
        rows_tk = table.row_table[safe, shard_tk.clamp(min=0)]
        weights = weights.float()
        step = next(self._steps)
        work = []
        for s in torch.unique(shard_tk[valid]).tolist():
            mask = shard_tk == s
            tokens = mask.any(1).nonzero().squeeze(1)
            request = wire.ExpertRequest(
                layer,
                hidden[tokens],
                torch.where(mask, rows_tk, -1)[tokens].to(torch.int32),
                torch.where(mask, weights, 0.0)[tokens],
                f"{step}:{layer}:{s}",
            )
            work.append(_ShardWork(s, table.addresses[s], tokens, wire.encode_request(request)))
        return work

    def _shard_of(self, table: PlacementTable, present: torch.Tensor) -> torch.Tensor:
        """[num_experts] shard per expert for this step; replicas chosen round-robin."""
        if not table.replicated_experts:
            return table.primary_shard
        wanted = set(torch.unique(present).tolist())
        shard_of = table.primary_shard.clone()
        with self._rr_lock:
            for e in wanted.intersection(table.replicated_experts):
                turn = self._rr[e] = self._rr.get(e, -1) + 1
                shard_of[e] = table.expert_shards[e][turn % len(table.expert_shards[e])]
        return shard_of

    # ------------------------------------------------------------------ calls (loop thread)
    def _stub(self, address: str) -> pb_grpc.ExpertShardStub:
        if address not in self._channels:  # one reused channel per shard endpoint
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = (channel, pb_grpc.ExpertShardStub(channel))
        return self._channels[address][1]

    async def _call_all(self, layer: int, work: list[_ShardWork]) -> list[pb.ComputeResponse]:
        calls = (self._call(layer, w) for w in work)
        replies = await asyncio.gather(*calls, return_exceptions=True)  # every call settles
        failed = [r for r in replies if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        return replies

    async def _call(self, layer: int, w: _ShardWork) -> pb.ComputeResponse:
        if not w.address:
            raise ExpertRPCError(w.shard, w.address, layer, "NO_ADDRESS", "shard not started")
        start = time.perf_counter()
        try:
            reply = await self._stub(w.address).Compute(w.message, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            self._metrics.add("errors", 1)
            raise ExpertRPCError(w.shard, w.address, layer, e.code().name, e.details()) from None
        latency = time.perf_counter() - start
        sizes = (w.message.ByteSize(), reply.ByteSize())
        self._metrics.record_call(w.shard, len(w.tokens), *sizes, latency)
        return reply

    async def _info_all(self, table: PlacementTable) -> list[wire.ShardInfo]:
        async def one(s: int) -> wire.ShardInfo:
            address = table.addresses[s]
            try:
                reply = await self._stub(address).Info(pb.InfoRequest(), timeout=self.timeout_s)
            except grpc.aio.AioRpcError as e:
                raise ExpertRPCError(s, address, -1, e.code().name, e.details()) from None
            return wire.decode_info(reply)

        return list(await asyncio.gather(*(one(s) for s in range(table.num_shards))))

    async def _close_channels(self) -> None:
        channels = [ch for ch, _ in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(ch.close() for ch in channels))

    # ------------------------------------------------------------------ combine (caller thread)
    def _combine(self, layer, work, replies, shape, dtype) -> torch.Tensor:
        start = time.perf_counter()
        out = torch.zeros(shape, dtype=torch.float64)  # see workers.experts.grouped_swiglu
        for w, reply in zip(work, replies, strict=True):
            try:
                part = wire.decode_response(reply, (len(w.tokens), shape[1])).output
            except wire.WireError as e:
                raise ExpertRPCError(w.shard, w.address, layer, "BAD_RESPONSE", str(e)) from None
            out.index_add_(0, w.tokens, part.double())
        self._metrics.add("combine_s", time.perf_counter() - start)
        return out.to(dtype)
