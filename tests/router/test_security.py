"""Internal expert RPC security: the cluster token (UNAUTHENTICATED without it) and TLS (a CA
and certificates generated here), through RemoteExpertBackend and raw gRPC calls."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.bench.pki import write_pki
from router.client import ExpertRPCError, ExpertsUnavailableError, RemoteExpertBackend
from router.placement import PlacementTable, ShardSpec
from router.rpc import expert_pb2 as pb
from router.rpc import expert_pb2_grpc as pb_grpc
from router.security import SecurityConfigError, TLSFiles, channel_credentials
from tests.router.helpers import E, routing
from workers.experts import LocalExpertBackend

ALL = (tuple(range(E)),) * 2
TOKEN = "cluster-s3cret"


def _one_shard(servers, **kwargs) -> PlacementTable:
    spec = ShardSpec("shard-0", "", ALL)
    address = servers.start(spec, **kwargs)
    return PlacementTable(2, E, (dataclasses.replace(spec, address=address),))


def _check(backend: RemoteExpertBackend, full) -> None:
    step = routing(6, seed=4)
    got = backend.submit(1, *step).result()
    want = LocalExpertBackend(full).submit(1, *step).result()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


async def _raw_calls(address: str, credentials=None, metadata=None) -> tuple:
    """(Info status, health status) of one shard through a fresh channel."""
    if credentials is None:
        channel = grpc.aio.insecure_channel(address)
    else:
        channel = grpc.aio.secure_channel(address, credentials)
    async with channel:
        try:
            await pb_grpc.ExpertShardStub(channel).Info(
                pb.InfoRequest(), timeout=10, metadata=metadata
            )
            info = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            info = (e.code(), e.details())
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    return info, health.status


def test_token_is_required_and_checked(full, servers) -> None:
    table = _one_shard(servers, token=TOKEN)
    address = table.shards[0].address
    info, health = asyncio.run(_raw_calls(address))
    assert info == (grpc.StatusCode.UNAUTHENTICATED, "missing cluster token")
    assert health == health_pb2.HealthCheckResponse.SERVING  # probes need no secret
    wrong = asyncio.run(_raw_calls(address, metadata=(("x-expertmesh-token", "nope"),)))[0]
    assert wrong == (grpc.StatusCode.UNAUTHENTICATED, "wrong cluster token")
    for token in (None, "nope"):
        with RemoteExpertBackend(table, token=token) as backend:  # a config error: no retries
            with pytest.raises(ExpertRPCError, match=r"shard-0 failed for layer 1: UNAUTH"):
                _check(backend, full)
            assert backend.metrics()["faults"] == 0
    with RemoteExpertBackend(table, token=TOKEN) as backend:
        _check(backend, full)
        assert backend.shard_info()[0].shard_id == "shard-0"


# ----------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return write_pki(tmp_path_factory.mktemp("pki"))


def test_tls_with_token(full, servers, pki) -> None:
    tls = TLSFiles(str(pki["ip_cert"]), str(pki["ip_key"]))
    table = _one_shard(servers, token=TOKEN, tls=tls)
    address = table.shards[0].address
    with RemoteExpertBackend(table, token=TOKEN, tls_ca=str(pki["ca"])) as backend:
        _check(backend, full)
    info, health = asyncio.run(_raw_calls(address, channel_credentials(str(pki["ca"]))))
    assert info[0] == grpc.StatusCode.UNAUTHENTICATED  # TLS does not replace the token
    assert health == health_pb2.HealthCheckResponse.SERVING
    # a plaintext router cannot talk to a TLS shard: a fault, then a clear degraded error
    with RemoteExpertBackend(table, token=TOKEN, recovery_timeout_s=0.2) as backend:
        with pytest.raises(ExpertsUnavailableError, match=r"no live shard holds \(layer 1"):
            _check(backend, full)
        assert backend.metrics()["faults"] >= 1


def test_tls_server_name_override(full, servers, pki) -> None:
    """A cluster-wide certificate names no IP: routers verify the configured name instead."""
    tls = TLSFiles(str(pki["name_cert"]), str(pki["name_key"]))
    table = _one_shard(servers, tls=tls)
    ca = str(pki["ca"])
    with RemoteExpertBackend(table, tls_ca=ca, tls_server_name="expertmesh-shard") as backend:
        _check(backend, full)
    with RemoteExpertBackend(table, tls_ca=ca, recovery_timeout_s=0.2) as backend:
        with pytest.raises(ExpertsUnavailableError):  # 127.0.0.1 is not in the certificate
            _check(backend, full)


def test_unusable_security_settings_name_the_problem(tmp_path) -> None:
    with pytest.raises(SecurityConfigError, match=r"TLS CA file .*/nope.pem: No such file"):
        RemoteExpertBackend(PlacementTable.contiguous(1, 4, 1), tls_ca=str(tmp_path / "nope.pem"))
    with pytest.raises(SecurityConfigError, match="printable ASCII"):
        RemoteExpertBackend(PlacementTable.contiguous(1, 4, 1), token="two words ")
