"""gRPC `expertmesh.v1.Generation` service (proto/generate.proto) over the shared Frontend, plus
the grpc.aio server with health checking and reflection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deploy.auth import ApiKeyInterceptor
from deploy.frontend import Frontend
from deploy.grpc_format import GrpcFormat, request_inputs
from router.rpc import generate_pb2, generate_pb2_grpc
from workers.requests import RequestError
from workers.sampler import SamplingParams

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRPC_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "too_long": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "queue_full": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.GenerateResponse:
        try:
            ids, params, fmt = await self._inputs(request)
            rid = self.frontend.new_id("grpc")
            async for out in self.frontend.stream(ids, params, rid):
                fmt.add(out)
        except RequestError as exc:
            await context.abort(GRPC_CODES.get(exc.kind, grpc.StatusCode.INTERNAL), exc.message)
        return fmt.unary(request.request_id or rid)

    async def GenerateStream(  # noqa: N802 (gRPC method name)
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        try:
            ids, params, fmt = await self._inputs(request)
            rid = self.frontend.new_id("grpc")
            echo = request.request_id or rid
            async for out in self.frontend.stream(ids, params, rid):
                yield fmt.stream(out, echo)
        except RequestError as exc:
            await context.abort(GRPC_CODES.get(exc.kind, grpc.StatusCode.INTERNAL), exc.message)

    async def _inputs(
        self, request: generate_pb2.GenerateRequest
    ) -> tuple[list[int], SamplingParams, GrpcFormat]:
        self.frontend.gate.check()
        self.frontend.check_model(request.model)
        info = await self.frontend.info()
        _precheck(request, self.frontend, info.max_model_len)
        tok = self.frontend.tokenizer
        ids, params, fmt = await asyncio.to_thread(request_inputs, request, tok, info.max_model_len)
        self.frontend.check_params(params, info)
        return ids, params, fmt


def _precheck(request: generate_pb2.GenerateRequest, frontend: Frontend, limit: int) -> None:
    """Refuse a prompt that cannot fit before tokenizing it (Frontend.precheck_prompt)."""
    kind = request.WhichOneof("prompt")
    if kind == "text":
        frontend.precheck_prompt(limit, text=request.text)
    elif kind == "token_ids":
        frontend.precheck_prompt(limit, token_ids=request.token_ids.ids)
    elif kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        frontend.precheck_prompt(limit, messages=messages, param="chat.messages")


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message (answered INVALID_ARGUMENT
    by the handler instead of grpc's UNKNOWN)."""

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError and anything else protobuf raises
            return _Undecodable(f"{type(exc).__name__}: {exc}")

    return deserialize


async def _reject(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request is not a valid expertmesh.v1.GenerateRequest ({request.error})",
    )


def _generation_handlers(servicer: GenerationServicer) -> grpc.GenericRpcHandler:
    async def generate(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _reject(request, context)
        return await servicer.Generate(request, context)

    async def generate_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _reject(request, context)
        async for response in servicer.GenerateStream(request, context):
            yield response

    parse = _lenient(generate_pb2.GenerateRequest.FromString)
    serialize = generate_pb2.GenerateResponse.SerializeToString
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            generate, request_deserializer=parse, response_serializer=serialize
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            generate_stream, request_deserializer=parse, response_serializer=serialize
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class ReadinessHealth(health.aio.HealthServicer):
    """grpc.health.v1 whose status follows the ingress's readiness; a NOT_SERVING answer
    carries the reason in the `reason` trailing metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = "starting"

    async def update(self, readiness: Any) -> None:
        self.reason = readiness.reason
        status = _SERVING if readiness.ready else _NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.set(service, status)

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        reply = await super().Check(request, context)
        if reply.status == _NOT_SERVING and self.reason:
            context.set_trailing_metadata((("reason", self.reason),))
        return reply


async def start_server(
    frontend: Frontend,
    host: str,
    port: int,
    *,
    api_key: str = "",
    max_message_mb: float = 8.0,
) -> tuple[grpc.aio.Server, int, ReadinessHealth]:
    """A started grpc.aio server with Generation, health (NOT_SERVING until the readiness
    monitor says otherwise) and reflection. Raises OSError naming the address if the port is
    taken."""
    limit = int(max_message_mb * 2**20)
    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", limit),
    ]
    interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    server.add_generic_rpc_handlers((_generation_handlers(GenerationServicer(frontend)),))
    health_servicer = ReadinessHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises "Failed to bind" for a taken port
        raise OSError(f"gRPC port {address} is not available (server.grpc_port): {exc}") from None
    if bound == 0:
        raise OSError(f"gRPC port {address} is not available (server.grpc_port)")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, _NOT_SERVING)
    return server, bound, health_servicer
