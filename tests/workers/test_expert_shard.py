"""ExpertShardServicer over a real in-process gRPC server on 127.0.0.1 (no Ray; grpc.aio
clients), and the ExpertShardActor's live operations on Ray."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading

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
# the shard holds global experts 10..17 in layer 1 and 20..23 in layer 0
HELD = {0: tuple(range(20, 24)), 1: tuple(range(10, 10 + E))}


def random_weights(held=HELD, seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    w13 = {
        layer: torch.randn(len(ids), 2 * I, H, generator=g) / H**0.5 for layer, ids in held.items()
    }
    w2 = {layer: torch.randn(len(ids), H, I, generator=g) / I**0.5 for layer, ids in held.items()}
    return ExpertWeights(dict(held), w13, w2)


def good_request(layer: int = 1, tokens: int = T, seed: int = 1) -> wire.ExpertRequest:
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(HELD[layer])[torch.randint(0, len(HELD[layer]), (tokens, K), generator=g)]
    ids = ids.to(torch.int32)
    ids[0, -1] = -1  # padding
    weights = torch.rand(tokens, K, generator=g).masked_fill(ids < 0, 0.0)
    hidden = torch.randn(tokens, H, generator=g)
    return wire.ExpertRequest(layer, hidden, ids, weights, "req", 5, "shard-3")


@contextlib.asynccontextmanager
async def serving(target, max_message_mb: float = 64.0, **kwargs):
    server, port = start_expert_server(
        target, max_message_mb=max_message_mb, shard_id="shard-3", **kwargs
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=wire.message_options(64))
    try:
        yield pb_grpc.ExpertShardStub(channel), health_pb2_grpc.HealthStub(channel), channel
    finally:
        await channel.close()
        server.stop(None)


async def health_status(health, service: str = SERVICE_NAME) -> int:
    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def assert_good_call(stub, weights: ExpertWeights, layer: int = 1) -> None:
    req = good_request(layer)
    reply = await stub.Compute(wire.encode_request(req), timeout=10)
    out = wire.decode_response(reply, (T, H), torch.float32).output
    assert (reply.request_id, reply.shard_id) == ("req", "shard-3")
    assert torch.equal(out, weights.compute(layer, req.hidden, req.expert_ids, req.weights))


def test_compute_info_and_health() -> None:
    weights = random_weights()

    async def body() -> None:
        async with serving(weights) as (stub, health, _):
            assert await health_status(health) == health_pb2.HealthCheckResponse.SERVING
            assert await health_status(health, "") == health_pb2.HealthCheckResponse.SERVING
            await assert_good_call(stub, weights, layer=1)
            await assert_good_call(stub, weights, layer=0)
            info = wire.decode_info(await stub.Info(pb.InfoRequest(), timeout=5))
            assert info.shard_id == "shard-3" and info.experts == HELD
            assert (info.dtype, info.hidden_size, info.placement_version) == ("float32", H, 5)
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
    "layer range": (lambda m: setattr(m, "layer", 7), r"layer 7 is outside \[0, 4\)"),
    "ids rows": (
        _set_tensor("expert_ids", torch.full((T - 1, K), 10, dtype=torch.int32)),
        r"expert_ids has 5 rows but hidden has 6",
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
    "no shard id": (lambda m: setattr(m, "shard_id", ""), r"shard_id is required"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_invalid_argument_and_server_keeps_serving(case: str) -> None:
    mutate, pattern = BAD[case]
    weights = random_weights()

    async def body() -> None:
        servicer = ExpertShardServicer(weights, "shard-3", num_layers=4)
        async with serving(servicer) as (stub, _, _):
            msg = wire.encode_request(good_request())
            mutate(msg)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Compute(msg, timeout=10)
            assert err.value.code() == Code.INVALID_ARGUMENT
            assert re.search(pattern, err.value.details()), err.value.details()
            await assert_good_call(stub, weights)

    asyncio.run(body())


NOT_HELD = {
    "expert": (
        _set_tensor("expert_ids", torch.tensor([[10, 20, 5, -1]] * T, dtype=torch.int32)),
        r"shard shard-3 does not hold \(layer 1, expert 5\), \(layer 1, expert 20\) "
        r"\(call planned on placement v5\)",
    ),
    "layer": (
        lambda m: setattr(m, "layer", 2),
        r"shard shard-3 does not hold \(layer 2, expert 10\), .*\(layer 2, expert 17\)",
    ),
    "shard id": (
        lambda m: setattr(m, "shard_id", "shard-9"),
        r"call planned for shard shard-9 on placement v5 reached shard shard-3",
    ),
}


@pytest.mark.parametrize("case", list(NOT_HELD))
def test_call_for_experts_or_shard_not_held_is_failed_precondition(case: str) -> None:
    """The shard never computes with experts it does not hold: it names them and the version."""
    mutate, pattern = NOT_HELD[case]
    weights = random_weights()

    async def body() -> None:
        servicer = ExpertShardServicer(weights, "shard-3", num_layers=4)
        async with serving(servicer) as (stub, _, _):
            msg = wire.encode_request(good_request())
            mutate(msg)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Compute(msg, timeout=10)
            assert err.value.code() == Code.FAILED_PRECONDITION
            assert re.search(pattern, err.value.details()), err.value.details()
            await assert_good_call(stub, weights)
            assert servicer.stats()["rejected"] == 1 and servicer.stats()["calls"] == 1

    asyncio.run(body())


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"\x0a\xff", b"garbage!"])
def test_garbage_protobuf_is_invalid_argument(garbage: bytes) -> None:
    weights = random_weights()

    async def body() -> None:
        async with serving(weights) as (stub, _, channel):
            for method in ("Compute", "Info"):
                raw = channel.unary_unary(f"/{SERVICE_NAME}/{method}")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await raw(garbage, timeout=10)
                assert err.value.code() == Code.INVALID_ARGUMENT, err.value
                assert "not a valid protobuf message" in err.value.details()
            await assert_good_call(stub, weights)

    asyncio.run(body())


def test_oversized_message_is_resource_exhausted() -> None:
    weights = random_weights()

    async def body() -> None:
        async with serving(weights, max_message_mb=0.25) as (stub, _, _):
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
        servicer = ExpertShardServicer(None, "shard-3")
        async with serving(servicer) as (stub, health, _):
            assert await health_status(health) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Compute(wire.encode_request(good_request()), timeout=10)
            assert err.value.code() == Code.UNAVAILABLE
            assert "shard not ready: shard shard-3" in err.value.details()
            assert not wire.decode_info(await stub.Info(pb.InfoRequest(), timeout=5)).ready
            servicer.set_weights(weights)
            assert await health_status(health) == health_pb2.HealthCheckResponse.SERVING
            await assert_good_call(stub, weights)
            assert servicer.stats()["errors"] == 1 and servicer.stats()["calls"] == 1

    asyncio.run(body())


def test_health_answers_and_weights_swap_while_a_call_computes() -> None:
    """A call in flight finishes on the weights it started with while other server threads
    answer health checks and a release swaps in weights without expert 10; later calls see the
    new set (FAILED_PRECONDITION for expert 10)."""
    weights = random_weights()
    servicer = ExpertShardServicer(weights, "shard-3")
    compute, started, release = servicer._compute, threading.Event(), threading.Event()

    def blocked_compute(w, msg):
        started.set()
        assert release.wait(30)
        return compute(w, msg)

    servicer._compute = blocked_compute

    async def body() -> None:
        async with serving(servicer) as (stub, health, _):
            req = good_request()
            call = asyncio.ensure_future(stub.Compute(wire.encode_request(req), timeout=30))
            assert await asyncio.to_thread(started.wait, 30)
            assert await health_status(health) == health_pb2.HealthCheckResponse.SERVING
            servicer.set_weights(weights.without_experts({1: [10]}))
            assert not call.done()
            release.set()
            out = wire.decode_response(await call).output
            want = weights.compute(1, req.hidden, req.expert_ids, req.weights)
            assert torch.equal(out, want)
            servicer._compute = compute
            msg = wire.encode_request(good_request())
            msg.expert_ids.CopyFrom(wire.encode_tensor(torch.full((T, K), 10, dtype=torch.int32)))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Compute(msg, timeout=10)
            assert err.value.code() == Code.FAILED_PRECONDITION

    asyncio.run(body())


def test_expert_shard_actor_on_ray(tmp_path) -> None:
    """Shard actors hold per-layer expert sets, load and release live, and the router's answers
    match the local backend."""
    ray = pytest.importorskip("ray")
    from router.client import RemoteExpertBackend
    from router.placement import PlacementTable
    from workers.checkpoint import load_expert_weights
    from workers.config import ModelConfig
    from workers.experts import LocalExpertBackend
    from workers.make_checkpoint import make_checkpoint

    # bf16 values computed in fp32: shards keep them as bf16 packs (live ops join/split packs)
    model_dir = make_checkpoint(tmp_path / "ck", "tiny", seed=1, dtype="bfloat16", tokenizer=False)
    config = ModelConfig.from_hf(model_dir)
    L, N = config.num_hidden_layers, config.num_experts
    table = PlacementTable.contiguous(L, N, 2)
    started = not ray.is_initialized()
    if started:
        from cluster.launcher import init_ray

        init_ray(None, min_cpus=2)
    try:
        actor = ray.remote(ExpertShardActor).options(num_cpus=0.5)
        shards = [
            actor.remote(str(model_dir), s.shard_id, s.assignment(), "float32")
            for s in table.shards
        ]
        infos = ray.get([a.ready.remote() for a in shards], timeout=120)
        assert [i["shard_id"] for i in infos] == ["shard-0", "shard-1"]
        assert [i["experts"] for i in infos] == [s.assignment() for s in table.shards]
        table = table.with_addresses({i["shard_id"]: i["address"] for i in infos})
        assert ray.get(shards[1].address.remote()) == table.shard("shard-1").address
        assert ray.get(shards[0].ping.remote())["ready"]
        full = load_expert_weights(model_dir, config, progress=False)
        local = LocalExpertBackend(full)
        hidden, ids = torch.randn(9, config.hidden_size), torch.rand(9, N).topk(4).indices
        weights = torch.rand(9, 4)
        with RemoteExpertBackend(table) as backend:
            got = backend.submit(1, hidden, ids, weights).result()
            assert [i.shard_id for i in backend.shard_info()] == ["shard-0", "shard-1"]
        torch.testing.assert_close(got, local.submit(1, hidden, ids, weights).result())
        # shard-1 takes a copy of expert 0 in layer 2 only; shard-0 then drops it there
        held = ray.get(shards[1].load.remote({2: [0, N - 1]}))  # N - 1 is held already
        assert held[2] == sorted([*table.shard("shard-1").experts[2], 0])
        table = table.with_replica(2, 0, "shard-1")
        assert ray.get(shards[0].release.remote({2: [0]}))[2] == list(range(1, N // 2))
        table = table.without_replica(2, 0, "shard-0")
        assert table.holders(2, 0) == ("shard-1",) and table.holders(3, 0) == ("shard-0",)
        zeros = torch.zeros(9, 4, dtype=torch.long)
        with RemoteExpertBackend(table) as backend:
            for layer in (2, 3):
                got = backend.submit(layer, hidden, zeros, weights).result()
                torch.testing.assert_close(
                    got, local.submit(layer, hidden, zeros, weights).result()
                )
            backend.shard_info()  # holdings match the table
        stats = ray.get(shards[1].stats.remote())
        assert stats["loads"] == 1 and stats["experts_loaded"] == 1 and stats["calls"] >= 2
        assert ray.get(shards[0].stats.remote())["experts_released"] == 1
        from workers import expert_kernel

        params = 3 * config.moe_intermediate_size * config.hidden_size  # per expert
        per_param = 2 if expert_kernel.load() else 4  # bf16 packs where the kernel runs
        assert stats["bytes_held"] == stats["experts_held"] * params * per_param
        bad = actor.remote(str(model_dir), "shard-2", {0: [N]}, "float32")
        with pytest.raises(Exception, match=f"expert id {N} out of range"):
            ray.get(bad.ready.remote(), timeout=60)
        ray.get([a.shutdown.remote() for a in shards], timeout=30)
    finally:
        if started:
            ray.shutdown()
