"""Optional API key of the public APIs: HTTP `Authorization: Bearer <key>` and gRPC metadata
(`authorization: Bearer <key>`, or `x-api-key: <key>`). The key comes from `server.api_key`
or, when that is empty, the EXPERTMESH_API_KEY environment variable; no key = open API.
Health probes (HTTP /health*, gRPC grpc.health.v1) and reflection stay open."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

ENV_VAR = "EXPERTMESH_API_KEY"
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
UNAUTHENTICATED_MESSAGE = "missing or invalid API key"


def resolve_api_key(configured: str) -> str:
    return configured or os.environ.get(ENV_VAR, "")


def key_matches(presented: str | None, key: str) -> bool:
    """Constant-time comparison; an empty key accepts everything."""
    if not key:
        return True
    if not presented:
        return False
    return hmac.compare_digest(presented.encode(), key.encode())


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the key with UNAUTHENTICATED (health and reflection stay open)."""

    def __init__(self, key: str) -> None:
        self.key = key

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
            yield  # pragma: no cover (abort raises)

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not self.key or details.method.startswith(OPEN_GRPC_PREFIXES):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        presented = bearer_token(metadata.get("authorization")) or metadata.get("x-api-key")
        if key_matches(presented, self.key):
            return await continuation(details)
        handler = await continuation(details)
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary
