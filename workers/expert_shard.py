"""An expert shard: a gRPC (grpc.aio) server computing routed experts for a subset of experts.

`ExpertShardServicer` is the pure servicer (testable without Ray); `start_expert_server` binds
it with health checking (grpc.health.v1) and reflection; `ExpertShardActor` is the Ray actor
that loads its experts from a checkpoint and serves them on the node IP.

Requests carry shard-LOCAL expert rows (row r = global expert `weights.expert_ids[r]`), -1 for
padding; the reply is one combined vector per token. Errors map to status codes:
not ready -> UNAVAILABLE, bad layer/row/shape/dtype/values -> INVALID_ARGUMENT, too big ->
RESOURCE_EXHAUSTED (gRPC's own size limit). The server keeps serving after every error.
Compute runs on one worker thread so the event loop keeps answering health checks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router import wire
from router.rpc import expert_pb2 as pb
from router.rpc import expert_pb2_grpc as pb_grpc
from workers.config import compute_dtype
from workers.experts import ExpertWeights
from workers.resources import pin_torch_threads

SERVICE_NAME = "expertmesh.v1.ExpertShard"
WIRE_VERSION = "expertmesh.v1"
DEFAULT_MAX_MESSAGE_MB = 256.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ShardRequestError(ValueError):
    """A request this shard cannot serve (wrong layer, row not held, hidden size)."""


class ExpertShardServicer(pb_grpc.ExpertShardServicer):
    """Serves Compute/Info for one ExpertWeights; UNAVAILABLE until `set_weights`."""

    def __init__(
        self, weights: ExpertWeights | None = None, shard_index: int = 0, version: str = ""
    ) -> None:
        self.shard_index = shard_index
        self.version = version or _default_version()
        self.health = health.aio.HealthServicer()
        self._weights = weights
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"expert-shard-{shard_index}")
        self._lock = threading.Lock()
        self._stats = {"calls": 0, "errors": 0, "tokens": 0, "pairs": 0, "compute_s": 0.0}

    @property
    def ready(self) -> bool:
        return self._weights is not None

    async def set_weights(self, weights: ExpertWeights) -> None:
        """Install the weights (from the event loop) and report SERVING."""
        self._weights = weights
        await self.publish_health()

    async def publish_health(self) -> None:
        status = _SERVING if self.ready else _NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._stats, shard_index=self.shard_index, ready=self.ready)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def Compute(self, request: pb.ComputeRequest, context: Any) -> pb.ComputeResponse:
        weights = self._weights
        if weights is None:
            self._count(errors=1)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"shard not ready: shard {self.shard_index} is still loading its weights",
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._compute, weights, request)
        except (wire.WireError, ShardRequestError) as e:
            self._count(errors=1)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # a bug, not the caller's fault: report it, keep serving
            self._count(errors=1)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    async def Info(self, request: pb.InfoRequest, context: Any) -> pb.InfoResponse:
        return wire.encode_info(self.info())

    def info(self) -> wire.ShardInfo:
        w = self._weights
        if w is None:
            return wire.ShardInfo((), (), "", 0, self.version, self.shard_index, False)
        hidden = int(next(iter(w.w13.values())).shape[2])
        held = (tuple(w.expert_ids), w.layers, wire.dtype_name(w.dtype), hidden)
        return wire.ShardInfo(*held, self.version, self.shard_index, True)

    # ------------------------------------------------------------------ worker thread
    def _compute(self, weights: ExpertWeights, msg: pb.ComputeRequest) -> pb.ComputeResponse:
        start = time.perf_counter()
        req = wire.decode_request(msg)
        ids = req.local_ids.long()
        self._check(weights, req, ids)
        out = weights.compute(req.layer, req.hidden, ids, req.weights)
        resp = wire.encode_response(wire.ExpertResponse(out, req.request_id))
        pairs = int((ids >= 0).sum())
        self._count(
            calls=1, tokens=req.num_tokens, pairs=pairs, compute_s=time.perf_counter() - start
        )
        return resp

    def _check(self, weights: ExpertWeights, req: wire.ExpertRequest, ids: torch.Tensor) -> None:
        if req.layer not in weights.w13:
            raise ShardRequestError(
                f"layer {req.layer} is not held by shard {self.shard_index} "
                f"(layers {list(weights.layers)})"
            )
        rows, _, hidden = weights.w13[req.layer].shape
        if req.hidden.shape[1] != hidden:
            raise ShardRequestError(
                f"hidden size {req.hidden.shape[1]} != {hidden} held by shard {self.shard_index}"
            )
        if ids.numel() and int(ids.max()) >= rows:
            raise ShardRequestError(
                f"expert row {int(ids.max())} is not held by shard {self.shard_index} "
                f"(it holds rows 0..{rows - 1})"
            )

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._stats[key] += value


async def start_expert_server(
    weights: ExpertWeights | ExpertShardServicer | None,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
    *,
    shard_index: int = 0,
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server for `weights` (or a prepared servicer); returns (server, port).

    Pass a servicer built with `weights=None` to start serving UNAVAILABLE before loading and
    call `await servicer.set_weights(w)` later. Binds `host` only; port 0 = ephemeral.
    """
    servicer = (
        weights
        if isinstance(weights, ExpertShardServicer)
        else ExpertShardServicer(weights, shard_index)
    )
    options = wire.message_options(max_message_mb) + [
        ("grpc.keepalive_permit_without_calls", 1),  # clients keep idle channels warm
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_ExpertShardServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer.health, server)
    services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(bind)
    if bound == 0:
        raise OSError(f"expert shard {servicer.shard_index} could not bind {bind}")
    await server.start()
    await servicer.publish_health()
    return server, bound


class ExpertShardActor:
    """Ray actor serving one shard: `ray.remote(ExpertShardActor).options(...).remote(...)`.

    Loads `expert_ids` (in that order: row r = expert_ids[r]) from `model_dir` and serves them
    on the node IP (ephemeral port). The server starts first (UNAVAILABLE / NOT_SERVING while
    loading); `ready()` returns once the weights are in. All methods are async, so the
    grpc.aio server runs on the actor's event loop.
    """

    def __init__(
        self,
        model_dir: str,
        expert_ids: Sequence[int],
        shard_index: int,
        dtype: str = "float32",
        layers: Sequence[int] | None = None,
        *,
        max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
        torch_threads: int | None = None,
        expert_dtype: str | None = None,
    ) -> None:
        self.model_dir = str(model_dir)
        self.expert_dtype = expert_dtype  # storage (workers/quant.py); None: as `dtype`
        self.expert_ids = tuple(int(e) for e in expert_ids)
        self.shard_index = shard_index
        self.dtype = compute_dtype(dtype)
        self.layers = None if layers is None else tuple(layers)
        self.max_message_mb = max_message_mb
        self.torch_threads = torch_threads
        self.servicer = ExpertShardServicer(None, shard_index)
        self._server: grpc.aio.Server | None = None
        self._address = ""
        self._serve_task: asyncio.Task | None = None
        self._load_task: asyncio.Task | None = None

    async def _serving(self) -> None:
        if self._serve_task is None:
            self._serve_task = asyncio.ensure_future(self._serve())
        await asyncio.shield(self._serve_task)

    async def _serve(self) -> None:
        import ray

        pin_torch_threads(self.torch_threads)
        host = ray.util.get_node_ip_address()
        self._server, port = await start_expert_server(self.servicer, host, 0, self.max_message_mb)
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _load(self) -> None:
        weights = await asyncio.to_thread(self._load_weights)
        await self.servicer.set_weights(weights)

    def _load_weights(self) -> ExpertWeights:
        from workers.checkpoint import load_expert_weights
        from workers.config import ModelConfig

        config = ModelConfig.from_hf(self.model_dir)
        weights = load_expert_weights(
            self.model_dir,
            config,
            experts=list(self.expert_ids),
            layers=self.layers,
            dtype=self.dtype,
            progress=False,
            storage=self.expert_dtype,
        )
        if tuple(weights.expert_ids) != self.expert_ids:
            raise RuntimeError(
                f"shard {self.shard_index}: loader returned experts in another order than "
                f"requested (rows must match the placement table)"
            )
        return weights

    async def ready(self) -> dict[str, Any]:
        """Start serving and load the weights (once); returns address, experts, node_id."""
        import ray

        await self._serving()
        if self._load_task is None:
            self._load_task = asyncio.ensure_future(self._load())
        await asyncio.shield(self._load_task)
        node_id = ray.get_runtime_context().get_node_id()
        return {"address": self._address, "experts": list(self.expert_ids), "node_id": node_id}

    async def address(self) -> str:
        """host:port of the shard's server (available before the weights are loaded)."""
        await self._serving()
        return self._address

    async def stats(self) -> dict[str, Any]:
        return dict(self.servicer.stats(), address=self._address, experts=len(self.expert_ids))

    async def shutdown(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            await self.servicer.health.enter_graceful_shutdown()
            await self._server.stop(grace_s)
        self.servicer.close()


def _default_version() -> str:
    try:
        from importlib.metadata import version

        return f"expertmesh {version('expertmesh')} ({WIRE_VERSION})"
    except Exception:  # not installed as a distribution (source checkout)
        return f"expertmesh dev ({WIRE_VERSION})"
