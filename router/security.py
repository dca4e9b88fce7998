"""Security of the internal expert RPC: a shared cluster token and optional TLS.

* Token: every ExpertShard call carries `x-expertmesh-token: <token>` metadata; a shard started
  with a token answers UNAUTHENTICATED to calls without it (compared in constant time). The
  gRPC health service stays open so probes work without secrets; it reveals only SERVING /
  NOT_SERVING. The token comes from the cluster YAML (`experts.token`) or the environment
  (`EXPERTMESH_CLUSTER_TOKEN`), resolved by the cluster layer.
* TLS: a shard with a certificate and key serves over TLS; routers verify it against a CA
  bundle (`ca`). Shards are addressed by IP, so the certificate needs that IP as a subject
  alternative name, or one cluster-wide name that routers check instead (`server_name`).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_METADATA = "x-expertmesh-token"
TOKEN_ENV = "EXPERTMESH_CLUSTER_TOKEN"
OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # method prefixes callable without the token


class SecurityConfigError(ValueError):
    """A token or TLS file is unusable; the message names it (never its contents)."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM file paths. A shard needs `cert` and `key`; a router needs `ca` (and optionally
    `server_name`, the name to verify in the shard's certificate instead of its IP)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert or self.key)


def check_token(token: str | None) -> str | None:
    """The token if usable as gRPC metadata (printable ASCII, no spaces at the ends)."""
    if token is None or token == "":
        return None
    if not token.isascii() or not token.isprintable() or token.strip() != token:
        raise SecurityConfigError("cluster token must be printable ASCII without edge spaces")
    return token


def _read(path: str | None, what: str) -> bytes:
    if not path:
        raise SecurityConfigError(f"TLS {what} file is not set")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"TLS {what} file {path}: {exc.strerror}") from None


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """Server credentials from tls.cert + tls.key."""
    if not (tls.cert and tls.key):
        raise SecurityConfigError("TLS needs both a certificate and a key file")
    return grpc.ssl_server_credentials([(_read(tls.key, "key"), _read(tls.cert, "certificate"))])


def channel_credentials(ca: str) -> grpc.ChannelCredentials:
    """Client credentials verifying shards against the CA bundle at `ca`."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "CA"))


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return ((TOKEN_METADATA, token),) if token else None


def _presented(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == TOKEN_METADATA:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the cluster token (UNAUTHENTICATED), except OPEN_SERVICES."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        presented = _presented(details.invocation_metadata)
        if presented is not None and hmac.compare_digest(presented.encode(), self._token):
            return handler
        reason = "missing cluster token" if presented is None else "wrong cluster token"
        return _deny(handler, reason)


def _deny(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
