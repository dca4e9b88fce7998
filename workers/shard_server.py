"""The expert shard's gRPC server: computes routed experts for the (layer, expert)s it holds.

`ExpertShardServicer` is the pure servicer (testable without Ray); `start_expert_server` binds
it with health checking (grpc.health.v1), reflection, the optional cluster token and TLS.
The Ray actor around it is `workers.expert_shard.ExpertShardActor`.

Requests carry GLOBAL expert ids. Status codes: not ready -> UNAVAILABLE; a call planned for
another shard, or naming a (layer, expert) not held here -> FAILED_PRECONDITION naming them and
the placement version (never a compute with other experts); garbage bytes, bad shapes, dtypes
or values -> INVALID_ARGUMENT; too big -> RESOURCE_EXHAUSTED (gRPC's size limit). The server
keeps serving after every error; `set_weights` swaps a whole new ExpertWeights in (in-flight
calls finish on the one they started with).

Hot path: a synchronous gRPC server whose handler threads decode, check, compute and encode a
call with no thread or event-loop hop between (grpc.aio plus a compute executor cost three
hops and ~100 us more CPU per call; docs/performance.md). One compute runs at a time (one
OpenMP team per shard); health checks and Info are answered by the other threads meanwhile.
The server listens on TCP and, beside it, on a local Unix socket that routers on the same host
use (router/transport.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router import security, transport, wire
from router.rpc import expert_pb2 as pb
from workers.experts import ExpertWeights

SERVICE_NAME = "expertmesh.v1.ExpertShard"
WIRE_VERSION = "expertmesh.v2"
DEFAULT_MAX_MESSAGE_MB = 256.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_NAMED = 8  # (layer, expert)s named in a FAILED_PRECONDITION message
SERVER_THREADS = 8  # calls from several routers, health checks and Info beside a compute
log = logging.getLogger(__name__)


class ShardRequestError(ValueError):
    """A request this shard cannot serve because it is malformed (INVALID_ARGUMENT)."""


class NotHeldError(ValueError):
    """A call planned for another shard or for experts not held here (FAILED_PRECONDITION)."""


class MalformedMessage:
    """What the lenient deserializer yields for bytes that are not a valid message."""

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            return MalformedMessage(f"request is not a valid protobuf message ({exc})")

    return deserialize


class ExpertShardServicer:
    """Serves Compute/Info for one shard's ExpertWeights; UNAVAILABLE until `set_weights`."""

    def __init__(
        self, weights: ExpertWeights | None = None, shard_id: str = "shard-0", version: str = "",
        num_layers: int | None = None,
    ) -> None:  # fmt: skip
        self.shard_id = shard_id
        self.num_layers = num_layers
        self.version = version or _default_version()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._weights = weights
        self._compute_lock = threading.Lock()  # one compute at a time (one OpenMP team)
        self._lock = threading.Lock()
        self._stats: dict[str, float] = dict.fromkeys(
            ("calls", "errors", "rejected", "rows", "pairs", "compute_s", "placement_version"), 0
        )

    @property
    def ready(self) -> bool:
        return self._weights is not None

    @property
    def weights(self) -> ExpertWeights | None:
        return self._weights

    def set_weights(self, weights: ExpertWeights) -> None:
        """Swap in `weights` (atomically: a call uses one snapshot) and report SERVING."""
        self._weights = weights
        self.publish_health()

    def publish_health(self) -> None:
        status = _SERVING if self.ready else _NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._stats)
        w = self._weights
        out.update(shard_id=self.shard_id, ready=self.ready)
        out["experts_held"] = sum(len(v) for v in w.experts.values()) if w else 0
        out["bytes_held"] = w.nbytes() if w else 0
        out["cpu_s"] = time.process_time()  # the shard process's CPU time (all threads)
        return out

    def Compute(self, request: pb.ComputeRequest | MalformedMessage, context: Any) -> Any:
        """Runs on one of the server's threads: decode, check, compute, encode, no hops."""
        code, details = self._serve(request)
        if code is not None:
            context.abort(code, details)  # raises
        return details

    def _serve(self, request: pb.ComputeRequest | MalformedMessage) -> tuple[Any, Any]:
        """(None, response) or (status code, details)."""
        if isinstance(request, MalformedMessage):
            self._count(errors=1)
            return grpc.StatusCode.INVALID_ARGUMENT, request.error
        weights = self._weights
        if weights is None:
            self._count(errors=1)
            return grpc.StatusCode.UNAVAILABLE, (
                f"shard not ready: shard {self.shard_id} is still loading its weights"
            )
        try:
            return None, self._compute(weights, request)
        except NotHeldError as e:
            self._count(rejected=1)
            return grpc.StatusCode.FAILED_PRECONDITION, str(e)
        except (wire.WireError, ShardRequestError) as e:
            self._count(errors=1)
            return grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Exception as e:  # a bug, not the caller's fault: report it, keep serving
            self._count(errors=1)
            return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"

    def Info(self, request: pb.InfoRequest | MalformedMessage, context: Any) -> Any:
        if isinstance(request, MalformedMessage):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
        return wire.encode_info(self.info())

    def info(self) -> wire.ShardInfo:
        w = self._weights
        version = int(self._stats["placement_version"])
        if w is None:
            return wire.ShardInfo(self.shard_id, {}, "", 0, self.version, False, version)
        held = {layer: tuple(ids) for layer, ids in w.holdings().items()}
        hidden = w.hidden_size if w.w13 else 0
        dtype = wire.dtype_name(w.dtype) if w.w13 else ""
        return wire.ShardInfo(self.shard_id, held, dtype, hidden, self.version, True, version)

    # ------------------------------------------------------------------ server threads
    def _compute(self, weights: ExpertWeights, msg: pb.ComputeRequest) -> pb.ComputeResponse:
        start = time.perf_counter()
        req = wire.decode_request(msg)
        rows = self._check(weights, req)
        with self._compute_lock:
            out = weights.compute_rows(req.layer, req.hidden, rows, req.weights)
        resp = wire.encode_response(wire.ExpertResponse(out, req.request_id, self.shard_id))
        pairs = int((rows >= 0).sum())
        with self._lock:
            s = self._stats
            s["calls"] += 1
            s["rows"] += req.num_tokens
            s["pairs"] += pairs
            s["compute_s"] += time.perf_counter() - start
            s["placement_version"] = max(s["placement_version"], req.placement_version)
        return resp

    def _check(self, weights: ExpertWeights, req: wire.ExpertRequest) -> torch.Tensor:
        """The weight rows of the request's experts; raises for a call this shard must not
        serve."""
        if not req.shard_id:
            raise ShardRequestError("shard_id is required (the shard the call was planned for)")
        if req.shard_id != self.shard_id:
            raise NotHeldError(
                f"call planned for shard {req.shard_id} on placement v{req.placement_version} "
                f"reached shard {self.shard_id}"
            )
        if self.num_layers is not None and req.layer >= self.num_layers:
            raise ShardRequestError(f"layer {req.layer} is outside [0, {self.num_layers})")
        rows, missing = weights.held_rows(req.layer, req.expert_ids)
        if missing:
            named = ", ".join(f"(layer {req.layer}, expert {e})" for e in missing[:_NAMED])
            more = f" and {len(missing) - _NAMED} more" if len(missing) > _NAMED else ""
            raise NotHeldError(
                f"shard {self.shard_id} does not hold {named}{more} (call planned on "
                f"placement v{req.placement_version})"
            )
        hidden = weights.hidden_size if weights.w13 else req.hidden.shape[1]  # none held: any
        if req.hidden.shape[1] != hidden:
            raise ShardRequestError(
                f"hidden size {req.hidden.shape[1]} != {hidden} held by shard {self.shard_id}"
            )
        return rows

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._stats[key] += value


def _handlers(servicer: ExpertShardServicer) -> grpc.GenericRpcHandler:
    """ExpertShard methods with lenient deserializers (garbage -> INVALID_ARGUMENT, not
    UNKNOWN)."""
    methods = {
        "Compute": (servicer.Compute, pb.ComputeRequest, pb.ComputeResponse),
        "Info": (servicer.Info, pb.InfoRequest, pb.InfoResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=_lenient(req.FromString),
            response_serializer=resp.SerializeToString,
        )
        for name, (fn, req, resp) in methods.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class ExpertServer:
    """A started shard server: `port` (TCP; 0 when it serves a unix: address only),
    `address` (what routers dial), `local_target` (the unix: socket beside TCP, or None)."""

    def __init__(self, server: grpc.Server, servicer: ExpertShardServicer, port: int,
                 address: str, local_target: str | None) -> None:  # fmt: skip
        self.server, self.servicer, self.port = server, servicer, port
        self.address, self.local_target = address, local_target

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (calls in flight get `grace` seconds) and remove the local socket."""
        self.server.stop(grace).wait()
        transport.remove_socket(self.local_target)


def start_expert_server(
    weights: ExpertWeights | ExpertShardServicer | None,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
    *,
    shard_id: str = "shard-0",
    token: str | None = None,
    tls: security.TLSFiles | None = None,
    advertise_host: str | None = None,
    local_socket: bool = True,
    threads: int = SERVER_THREADS,
) -> tuple[ExpertServer, int]:
    """Start a gRPC server for `weights` (or a prepared servicer); returns (server, port).

    Pass a servicer built with `weights=None` to serve UNAVAILABLE while loading and call
    `servicer.set_weights(w)` later. Binds `host` only (a `unix:` host: that socket only);
    port 0 = ephemeral. Routers dial `advertise_host` (default `host`) : port; with
    `local_socket`, the server also listens on that address's local socket
    (router/transport.py), which routers on this host use. With `token`, ExpertShard calls
    need it (UNAUTHENTICATED otherwise); with `tls` (cert + key), TLS only (and no local
    socket).
    """
    servicer = (
        weights
        if isinstance(weights, ExpertShardServicer)
        else ExpertShardServicer(weights, shard_id)
    )
    options = wire.message_options(max_message_mb) + [
        ("grpc.keepalive_permit_without_calls", 1),  # clients keep idle channels warm
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    token = security.check_token(token)
    interceptors = [security.TokenInterceptor(token)] if token else []
    server = grpc.server(
        ThreadPoolExecutor(threads, thread_name_prefix=f"expert-{servicer.shard_id}"),
        options=options, interceptors=interceptors,
    )  # fmt: skip
    server.add_generic_rpc_handlers((_handlers(servicer),))
    health_pb2_grpc.add_HealthServicer_to_server(servicer.health, server)
    services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    tls_on = tls is not None and tls.serves_tls
    if host.startswith(transport.UNIX):
        _bind(server, host, tls, servicer.shard_id)
        server.start()
        servicer.publish_health()
        return ExpertServer(server, servicer, 0, host, None), 0
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = _bind(server, bind, tls, servicer.shard_id)
    advertise = advertise_host or host
    address = f"[{advertise}]:{bound}" if ":" in advertise else f"{advertise}:{bound}"
    # TLS deployments stay on TLS everywhere: no plaintext socket beside it
    local = transport.prepare_socket(address) if local_socket and not tls_on else None
    if local is not None:
        try:
            if server.add_insecure_port(local) == 0:
                raise RuntimeError("bind returned 0")
        except RuntimeError:
            log.warning("shard %s: no local socket at %s; TCP only", servicer.shard_id, local)
            local = None
    server.start()
    servicer.publish_health()
    return ExpertServer(server, servicer, bound, address, local), bound


def _bind(server: grpc.Server, bind: str, tls: security.TLSFiles | None, shard_id: str) -> int:
    try:
        if tls is not None and tls.serves_tls:
            bound = server.add_secure_port(bind, security.server_credentials(tls))
        else:
            bound = server.add_insecure_port(bind)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"expert shard {shard_id} could not bind {bind}")
    return bound


def layer_assignment(assignment: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """Normalise {layer: ids} (keys may arrive as strings through JSON): ints, sorted, no empty
    layers."""
    return {int(k): sorted(int(e) for e in v) for k, v in sorted(assignment.items()) if len(v)}


def _default_version() -> str:
    try:
        from importlib.metadata import version

        return f"expertmesh {version('expertmesh')} ({WIRE_VERSION})"
    except Exception:  # not installed as a distribution (source checkout)
        return f"expertmesh dev ({WIRE_VERSION})"
