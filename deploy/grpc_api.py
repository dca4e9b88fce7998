"""gRPC `expertmesh.v1.Generation` service (proto/generate.proto) over the shared Frontend, plus
the grpc.aio server with health checking and reflection."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deploy.frontend import Frontend
from deploy.params import DEFAULT_MAX_TOKENS, InvalidParam, prompt_ids, sampling_params
from router.rpc import generate_pb2, generate_pb2_grpc
from workers.requests import RequestError, RequestOutput
from workers.sampler import SamplingParams

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
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
            ids, params = await self._inputs(request)
            rid = self.frontend.new_id("grpc")
            out = await self.frontend.generate(ids, params, rid)
        except RequestError as exc:
            await context.abort(GRPC_CODES.get(exc.kind, grpc.StatusCode.INTERNAL), exc.message)
        return to_response(out, request.request_id or rid, params.logprobs)

    async def GenerateStream(  # noqa: N802 (gRPC method name)
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        try:
            ids, params = await self._inputs(request)
            rid = self.frontend.new_id("grpc")
            echo = request.request_id or rid
            async for out in self.frontend.stream(ids, params, rid):
                yield to_response(out, echo, params.logprobs)
        except RequestError as exc:
            await context.abort(GRPC_CODES.get(exc.kind, grpc.StatusCode.INTERNAL), exc.message)

    async def _inputs(
        self, request: generate_pb2.GenerateRequest
    ) -> tuple[list[int], SamplingParams]:
        self.frontend.check_model(request.model)
        info = await self.frontend.info()
        return request_inputs(request, self.frontend, info.max_model_len)


def request_inputs(
    request: generate_pb2.GenerateRequest, frontend: Frontend, max_model_len: int
) -> tuple[list[int], SamplingParams]:
    """GenerateRequest -> (prompt ids, SamplingParams), with the HTTP API's rules."""
    kind = request.WhichOneof("prompt")
    tok = frontend.tokenizer
    if kind == "text":
        ids = prompt_ids(tok, text=request.text)
    elif kind == "token_ids":
        ids = prompt_ids(tok, token_ids=request.token_ids.ids)
    elif kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        ids = prompt_ids(tok, messages=messages, param="chat.messages")
    else:
        raise InvalidParam("prompt", "prompt: set one of text, token_ids or chat")

    def opt(name: str):
        return getattr(request, name) if request.HasField(name) else None

    params = sampling_params(
        prompt_len=len(ids),
        max_model_len=max_model_len,
        max_tokens=opt("max_tokens"),
        default_max_tokens=None if kind == "chat" else DEFAULT_MAX_TOKENS,
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),
        seed=opt("seed"),
        stop=list(request.stop),
        stop_token_ids=list(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        logprobs=request.logprobs,
    )
    return ids, params


def to_response(
    out: RequestOutput, request_id: str, logprobs: bool
) -> generate_pb2.GenerateResponse:
    response = generate_pb2.GenerateResponse(
        request_id=request_id,
        text=out.text,
        token_ids=out.token_ids,
        logprobs=out.logprobs if logprobs else [],
        finish_reason=out.finish_reason or "" if out.finished else "",
    )
    if out.finished:
        total = out.prompt_tokens + out.completion_tokens
        response.usage.CopyFrom(
            generate_pb2.Usage(
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                total_tokens=total,
            )
        )
    return response


async def start_server(frontend: Frontend, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server with Generation, health (SERVING) and reflection."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    generate_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(frontend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
