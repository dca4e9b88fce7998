"""The router's gRPC channels to the shards (one reused channel per address, on the router's
event loop) with the cluster token and TLS applied, and the Info calls used as probes.

A TCP address whose shard runs on this host is dialled through the shard's local Unix socket
(router/transport.py) unless `local_sockets` is off or the router uses TLS; an explicit
`unix:` address always is.
A channel to a shard that failed at the connection level is dropped, so a replacement that
reuses the address is reached through a fresh connection instead of a channel sitting in
reconnect backoff; when it went through a local socket, later channels to that address use
TCP (a socket this router cannot use must not keep a reachable shard out of its plans).
"""

from __future__ import annotations

import asyncio

import grpc

from router import security, transport, wire
from router.rpc import expert_pb2 as pb
from router.rpc import expert_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2_000),
]  # fmt: skip


class ShardChannels:
    """Channels and stubs by address; use from one event loop only."""

    def __init__(
        self,
        max_message_mb: float,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_server_name: str | None = None,
        local_sockets: bool = True,
    ) -> None:
        self.metadata = security.call_metadata(security.check_token(token))
        self._credentials = security.channel_credentials(tls_ca) if tls_ca else None
        self.local_sockets = local_sockets
        self._tcp_only: set[str] = set()  # addresses whose local socket failed
        self._local: set[str] = set()  # addresses whose channel is a local socket
        self._options = wire.message_options(max_message_mb) + CHANNEL_OPTIONS
        if tls_server_name:
            self._options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.ExpertShardStub]] = {}

    def stub(self, address: str) -> pb_grpc.ExpertShardStub:
        entry = self._channels.get(address)
        if entry is None:
            entry = self._channels[address] = self._open(address)
        return entry[1]

    def _open(self, address: str) -> tuple[grpc.aio.Channel, pb_grpc.ExpertShardStub]:
        target, credentials = address, self._credentials
        local = address if address.startswith(transport.UNIX) else None
        upgrade = self.local_sockets and self._credentials is None  # TLS routers stay TLS
        if local is None and upgrade and address not in self._tcp_only:
            local = transport.local_target(address)
        if local is not None:
            target = local
            self._local.add(address)
        else:
            self._local.discard(address)
        if credentials is not None:
            channel = grpc.aio.secure_channel(target, credentials, self._options)
        else:
            channel = grpc.aio.insecure_channel(target, options=self._options)
        return channel, pb_grpc.ExpertShardStub(channel)

    def transports(self) -> dict[str, str]:
        """address -> "unix" or "tcp" for the open channels."""
        return {a: "unix" if a in self._local else "tcp" for a in list(self._channels)}

    async def compute(
        self, address: str, message: pb.ComputeRequest, timeout: float
    ) -> pb.ComputeResponse:
        return await self.stub(address).Compute(message, timeout=timeout, metadata=self.metadata)

    async def info(self, address: str, timeout: float) -> wire.ShardInfo:
        """The shard's Info (raises grpc.aio.AioRpcError)."""
        reply = await self.stub(address).Info(
            pb.InfoRequest(), timeout=timeout, metadata=self.metadata
        )
        return wire.decode_info(reply)

    def drop(self, address: str) -> None:
        """Forget the channel to `address` (closed in the background)."""
        entry = self._channels.pop(address, None)
        if address in self._local and not address.startswith(transport.UNIX):
            self._tcp_only.add(address)
        self._local.discard(address)
        if entry is not None:
            asyncio.ensure_future(entry[0].close(grace=None))

    async def close(self) -> None:
        channels = [ch for ch, _ in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(ch.close() for ch in channels))
