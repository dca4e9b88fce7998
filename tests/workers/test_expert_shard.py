"""ExpertShardServicer over a real in-process grpc.aio server on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router import wire
from router.rpc import expert_pb2 as pb
from router.rpc import expert_pb2_grpc as pb_grpc
from workers.expert_shard import (
    SERVICE_NAME,
    ExpertShardActor,
    ExpertShardServicer,
    start_expert_server,
)
from workers.experts import ExpertWeights

H, I, E, K, T = 64, 32, 8, 4, 6
Code = grpc.StatusCode


def random_weights(expert_ids=tuple(range(E)), layers=(0, 1), seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    n = len(expert_ids)
    w13 = {layer: torch.randn(n, 2 * I, H, generator=g) / H**0.5 for layer in layers}
    w2 = {layer: torch.randn(n, H, I, generator=g) / I**0.5 for layer in layers}
    return ExpertWeights(tuple(expert_ids), w13, w2)


def good_request(layer: int = 1, tokens: int = T, seed: int = 1) -> wire.ExpertRequest:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (tokens, K), generator=g, dtype=torch.int32)
    ids[0, -1] = -1  # padding
    weights = torch.rand(tokens, K, generator=g).masked_fill(ids < 0, 0.0)
    return wire.ExpertRequest(layer, torch.randn(tokens, H, generator=g), ids, weights, "req")


@contextlib.asynccontextmanager
async def serving(target, max_message_mb: float = 64.0):
    server, port = await start_expert_server(target, max_message_mb=max_message_mb, shard_index=3)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=wire.message_options(64))
    try:
        yield pb_grpc.ExpertShardStub(channel), health_pb2_grpc.HealthStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def health_status(health, service: str = SERVICE_NAME) -> int:
    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def assert_good_call(stub, weights: ExpertWeights) -> None:
    req = good_request()
    reply = await stub.Compute(wire.encode_request(req), timeout=10)
    out = wire.decode_response(reply, (T, H)).output
    assert reply.request_id == "req"
    assert torch.equal(out, weights.compute(1, req.hidden, req.local_ids.long(), req.weights))


def test_compute_info_and_health() -> None:
    weights = random_weights(expert_ids=range(10, 10 + E))

    async def body() -> None:
        async with serving(weights) as (stub, health):
            assert await health_status(health) == health_pb2.HealthCheckResponse.SERVING
            assert await health_status(health, "") == health_pb2.HealthCheckResponse.SERVING
            await assert_good_call(stub, weights)
            info = wire.decode_info(await stub.Info(pb.InfoRequest(), timeout=5))
            assert info.expert_ids == tuple(range(10, 10 + E)) and info.layers == (0, 1)
            assert (info.dtype, info.hidden_size, info.shard_index) == ("float32", H, 3)
            assert info.ready and info.version.startswith("expertmesh ")

    asyncio.run(body())


def _set_tensor(field: str, tensor: torch.Tensor):
    return lambda m: getattr(m, field).CopyFrom(wire.encode_tensor(tensor))


def _relabel(field: str, dtype: str):
    return lambda m: setattr(getattr(m, field), "dtype", dtype)


def _truncate(m: pb.ComputeRequest) -> None:
    m.hidden.data = m.hidden.data[:-8]


def _nan(m: pb.ComputeRequest) -> None:
    h = torch.randn(T, H)
    h[2, 5] = float("nan")
    m.hidden.CopyFrom(wire.encode_tensor(h))


BAD = {
    "wrong layer": (lambda m: setattr(m, "layer", 7), r"layer 7 is not held by shard 3"),
    "row not held": (
        _set_tensor("local_ids", torch.full((T, K), 40, dtype=torch.int32)),
        r"expert row 40 is not held by shard 3 \(it holds rows 0..7\)",
    ),
    "ids rows": (
        _set_tensor("local_ids", torch.zeros(T - 1, K, dtype=torch.int32)),
        r"local_ids has 5 rows but hidden has 6",
    ),
    "weights shape": (_set_tensor("weights", torch.ones(T, K + 1)), r"weights shape \[6, 5\]"),
    "byte size": (_truncate, r"hidden: 1528 bytes do not match shape \[6, 64\] of float32"),
    "unknown dtype": (_relabel("hidden", "float8"), r"hidden: unknown dtype 'float8'"),
    "dtype relabel": (_relabel("weights", "float64"), r"weights: 96 bytes do not match"),
    "weights dtype": (
        _set_tensor("weights", torch.ones(T, K, dtype=torch.float16)),
        r"weights dtype torch.float16 does not match the wire's float32",
    ),
    "hidden int": (
        _set_tensor("hidden", torch.ones(T, H, dtype=torch.int32)),
        r"hidden dtype int32 is not floating point",
    ),
    "hidden size": (_set_tensor("hidden", torch.ones(T, 32)), r"hidden size 32 != 64 held by"),
    "non-finite": (_nan, r"hidden contains non-finite values \(NaN/inf\), first at token 2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_invalid_argument_and_server_keeps_serving(case: str) -> None:
    mutate, pattern = BAD[case]
    weights = random_weights()

    async def body() -> None:
        async with serving(weights) as (stub, _):
            msg = wire.encode_request(good_request())
            mutate(msg)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Compute(msg, timeout=10)
            assert err.value.code() == Code.INVALID_ARGUMENT
            assert re.search(pattern, err.value.details()), err.value.details()
            await assert_good_call(stub, weights)

    asyncio.run(body())


def test_oversized_message_is_resource_exhausted() -> None:
    weights = random_weights()

    async def body() -> None:
        async with serving(weights, max_message_mb=0.25) as (stub, _):
            big = good_request(tokens=1500)  # 1500 x 64 x 4 B = 375 KiB > 256 KiB
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Compute(wire.encode_request(big), timeout=10)
            assert err.value.code() == Code.RESOURCE_EXHAUSTED
            assert "larger than max" in err.value.details()
            await assert_good_call(stub, weights)

    asyncio.run(body())


def test_not_ready_shard_is_unavailable_until_weights_are_set() -> None:
    weights = random_weights()

    async def body() -> None:
        servicer = ExpertShardServicer(None, shard_index=3)
        async with serving(servicer) as (stub, health):
            assert await health_status(health) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Compute(wire.encode_request(good_request()), timeout=10)
            assert err.value.code() == Code.UNAVAILABLE
            assert "shard not ready: shard 3" in err.value.details()
            assert not wire.decode_info(await stub.Info(pb.InfoRequest(), timeout=5)).ready
            await servicer.set_weights(weights)
            assert await health_status(health) == health_pb2.HealthCheckResponse.SERVING
            await assert_good_call(stub, weights)
            assert servicer.stats()["errors"] == 1 and servicer.stats()["calls"] == 1

    asyncio.run(body())


def test_health_is_answered_while_computing() -> None:
    weights = random_weights()
    servicer = ExpertShardServicer(weights, shard_index=3)
    compute = servicer._compute

    def slow_compute(w, msg):
        time.sleep(0.6)
        return compute(w, msg)

    servicer._compute = slow_compute

    async def body() -> None:
        async with serving(servicer) as (stub, health):
            call = asyncio.ensure_future(stub.Compute(wire.encode_request(good_request())))
            await asyncio.sleep(0.1)
            start = time.perf_counter()
            assert await health_status(health) == health_pb2.HealthCheckResponse.SERVING
            assert time.perf_counter() - start < 0.3 and not call.done()
            await call

    asyncio.run(body())


def test_expert_shard_actor_on_ray(tmp_path) -> None:
    """Two ExpertShardActors load their experts from a checkpoint; the router matches local."""
    ray = pytest.importorskip("ray")
    from router.client import RemoteExpertBackend
    from router.placement import PlacementTable
    from workers.checkpoint import load_expert_weights
    from workers.config import ModelConfig
    from workers.experts import LocalExpertBackend
    from workers.make_checkpoint import make_checkpoint

    model_dir = make_checkpoint(tmp_path / "ck", "tiny", seed=1, tokenizer=False)
    config = ModelConfig.from_hf(model_dir)
    table = PlacementTable.contiguous(config.num_experts, 2)
    started = not ray.is_initialized()
    if started:
        from cluster.launcher import init_ray

        init_ray(None, min_cpus=2)
    try:
        actor = ray.remote(ExpertShardActor).options(num_cpus=0.5)
        shards = [
            actor.remote(str(model_dir), table.local_rows(s), s, "float32", [0, 1])
            for s in range(2)
        ]
        infos = ray.get([a.ready.remote() for a in shards], timeout=120)
        assert [i["experts"] for i in infos] == [list(table.local_rows(s)) for s in range(2)]
        table = table.with_addresses([i["address"] for i in infos])
        assert ray.get(shards[1].address.remote()) == table.addresses[1]
        full = load_expert_weights(model_dir, config, layers=[0, 1], progress=False)
        hidden, ids = torch.randn(9, config.hidden_size), torch.rand(9, 32).topk(4).indices
        weights = torch.rand(9, 4)
        with RemoteExpertBackend(table) as backend:
            got = backend.submit(1, hidden, ids, weights).result()
            assert [i.expert_ids for i in backend.shard_info()] == list(table.shard_experts)
        want = LocalExpertBackend(full).submit(1, hidden, ids, weights).result()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert sum(ray.get(a.stats.remote())["calls"] for a in shards) == 2
        bad = actor.remote(str(model_dir), [40], 2, "float32", [0])
        with pytest.raises(Exception, match="expert id 40 out of range"):
            ray.get(bad.ready.remote(), timeout=60)
        ray.get([a.shutdown.remote() for a in shards], timeout=30)
    finally:
        if started:
            ray.shutdown()
