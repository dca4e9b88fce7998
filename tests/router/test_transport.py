"""The same-host transport (router/transport.py): a router on the shard's host dials its local
Unix socket, with the cluster token checked there as on TCP; sockets in a directory that is not
private to the user are neither bound nor dialled; TLS shards open none; a socket that cannot
be used falls back to TCP."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket

import grpc
import pytest
import torch

from cluster.bench.pki import write_pki
from router import transport
from router.client import ExpertRPCError, RemoteExpertBackend
from router.placement import PlacementTable, ShardSpec
from router.rpc import expert_pb2 as pb
from router.rpc import expert_pb2_grpc as pb_grpc
from router.security import TLSFiles
from tests.router.helpers import E, routing
from workers.experts import LocalExpertBackend

ALL = (tuple(range(E)),) * 2
TOKEN = "cluster-s3cret"


@pytest.fixture
def sockets(tmp_path, monkeypatch) -> str:
    path = str(tmp_path / "sockets")
    monkeypatch.setenv(transport.SOCKET_DIR_ENV, path)
    return path


def _one_shard(servers, **kwargs) -> tuple[PlacementTable, object]:
    spec = ShardSpec("shard-0", "", ALL)
    address = servers.start(spec, **kwargs)
    table = PlacementTable(2, E, (dataclasses.replace(spec, address=address),))
    return table, servers.servers[address]


def _check(backend: RemoteExpertBackend, full) -> None:
    step = routing(6, seed=4)
    got = backend.submit(1, *step).result()
    want = LocalExpertBackend(full).submit(1, *step).result()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


async def _info(target: str, metadata=None):
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await pb_grpc.ExpertShardStub(channel).Info(
                pb.InfoRequest(), timeout=10, metadata=metadata
            )
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()


def test_same_host_router_uses_the_socket_and_the_token_still_applies(
    full, servers, sockets
) -> None:
    table, server = _one_shard(servers, token=TOKEN)
    assert server.local_target == transport.UNIX + transport.socket_path(server.address)
    assert (os.stat(sockets).st_mode & 0o777) == 0o700
    assert transport.local_target(server.address) == server.local_target
    with RemoteExpertBackend(table, token=TOKEN) as backend:
        _check(backend, full)
        m = backend.metrics()
        assert (m["channels_unix"], m["channels_tcp"]) == (1, 0)
    with RemoteExpertBackend(table, token=TOKEN, local_sockets=False) as backend:
        _check(backend, full)
        m = backend.metrics()
        assert (m["channels_unix"], m["channels_tcp"]) == (0, 1)
    with RemoteExpertBackend(table, token="nope") as backend:
        with pytest.raises(ExpertRPCError, match="UNAUTH"):
            _check(backend, full)
        assert backend.metrics()["channels_unix"] == 1
    local = server.local_target
    assert asyncio.run(_info(local)) == grpc.StatusCode.UNAUTHENTICATED
    token = (("x-expertmesh-token", TOKEN),)
    assert asyncio.run(_info(local, token)) == grpc.StatusCode.OK
    servers.stop(server.address)
    assert not os.path.exists(local[len(transport.UNIX) :])  # removed with the server


def test_a_socket_directory_others_can_open_is_not_used(full, servers, sockets) -> None:
    table, server = _one_shard(servers, token=TOKEN)
    assert server.local_target is not None
    os.chmod(sockets, 0o755)  # e.g. made by someone else, or loosened: dial TCP instead
    assert transport.local_target(server.address) is None
    with RemoteExpertBackend(table, token=TOKEN) as backend:
        _check(backend, full)
        assert backend.metrics()["channels_tcp"] == 1
    servers.stop(server.address)
    _, again = _one_shard(servers, token=TOKEN)  # and a shard binds none there
    assert again.local_target is None
    servers.stop(again.address)


def test_tls_shards_open_no_socket(servers, sockets, tmp_path) -> None:
    pki = write_pki(tmp_path)
    _, server = _one_shard(servers, tls=TLSFiles(str(pki["ip_cert"]), str(pki["ip_key"])))
    assert server.local_target is None
    assert transport.local_target(server.address) is None
    servers.stop(server.address)


def test_an_unusable_socket_falls_back_to_tcp(full, servers, sockets) -> None:
    table, server = _one_shard(servers, token=TOKEN)
    path = server.local_target[len(transport.UNIX) :]
    os.unlink(path)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # a socket nobody listens on: connections are refused
    try:
        with RemoteExpertBackend(table, token=TOKEN, recovery_timeout_s=30) as backend:
            _check(backend, full)
            m = backend.metrics()
            assert m["channels_tcp"] == 1 and m["channels_unix"] == 0
            assert m["faults"] >= 1  # the socket failed once, then TCP served the step
    finally:
        dead.close()
        servers.stop(server.address)
