"""RemoteExpertBackend against in-process expert shards on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import torch

from router.client import ExpertRPCError, RemoteExpertBackend
from router.placement import PlacementHandle, PlacementTable
from workers.expert_shard import start_expert_server
from workers.experts import ExpertWeights, LocalExpertBackend

E, H, I, K = 512, 64, 32, 10
LAYERS = (0, 1)


def random_weights(seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    w13 = {layer: torch.randn(E, 2 * I, H, generator=g) / H**0.5 for layer in LAYERS}
    w2 = {layer: torch.randn(E, H, I, generator=g) / I**0.5 for layer in LAYERS}
    return ExpertWeights(tuple(range(E)), w13, w2)


def shard_weights(full: ExpertWeights, rows: tuple[int, ...]) -> ExpertWeights:
    """The rows a shard loads: global experts `rows`, in that order."""
    idx = torch.tensor(rows)
    return ExpertWeights(
        rows,
        {layer: full.w13[layer][idx] for layer in LAYERS},
        {layer: full.w2[layer][idx] for layer in LAYERS},
    )


def routing(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    scores = torch.randn(T, E, generator=g).softmax(-1)
    weights, ids = scores.topk(K, dim=-1)
    return hidden, ids, weights / weights.sum(-1, keepdim=True)


class ShardServers:
    """Expert shard servers on their own event-loop thread (the client has its own loop)."""

    def __init__(self, full: ExpertWeights) -> None:
        self.full = full
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list = []

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def serve(self, table: PlacementTable) -> PlacementTable:
        """Start one server per shard of `table`; returns the table with their addresses."""
        addresses = []
        for s in range(table.num_shards):
            weights = shard_weights(self.full, table.local_rows(s))
            server, port = self._run(start_expert_server(weights, shard_index=s))
            self.servers.append(server)
            addresses.append(f"127.0.0.1:{port}")
        return table.with_addresses(addresses)

    def close(self) -> None:
        for server in self.servers:
            self._run(server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def full() -> ExpertWeights:
    return random_weights()


@pytest.fixture(scope="module")
def servers(full: ExpertWeights):
    servers = ShardServers(full)
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def tables(servers: ShardServers) -> dict[int, PlacementTable]:
    return {n: servers.serve(PlacementTable.contiguous(E, n)) for n in (1, 2, 3, 4)}


def shards_with_work(table: PlacementTable, ids: torch.Tensor) -> dict[int, int]:
    """shard -> number of distinct tokens routed to it (no replicas)."""
    shard = table.primary_shard[ids.clamp(min=0)].masked_fill(ids < 0, -1)
    return {s: int((shard == s).any(1).sum()) for s in torch.unique(shard[shard >= 0]).tolist()}


@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_matches_local_backend(full, tables, n: int, T: int) -> None:
    table = tables[n]
    hidden, ids, weights = routing(T, seed=10 * n + T)
    expected = LocalExpertBackend(full).submit(1, hidden, ids, weights).result()
    with RemoteExpertBackend(table) as backend:
        got = backend.submit(1, hidden, ids, weights).result()
        m = backend.metrics()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    work = shards_with_work(table, ids)
    assert m["steps"] == 1 and m["calls"] == len(work) == m["last_calls_per_step"]
    assert m["rows_sent_per_shard"] == work  # each token's hidden row once per shard
    assert all(rows <= T for rows in m["rows_sent_per_shard"].values())
    assert m["bytes_sent"] / T <= 2 * H * 4 * min(K, n)
    assert m["bytes_received"] > 0 and m["rpc_s"] > 0 and m["errors"] == 0


def test_padding_bf16_and_empty_steps(full, tables) -> None:
    hidden, ids, weights = routing(7, seed=3)
    ids[:, 5:] = -1
    weights[:, 5:] = 0
    ids[2] = -1
    local = LocalExpertBackend(full)
    with RemoteExpertBackend(tables[3]) as backend:
        got = backend.submit(0, hidden, ids, weights).result()
        torch.testing.assert_close(
            got, local.submit(0, hidden, ids, weights).result(), atol=1e-5, rtol=0
        )
        assert torch.all(got[2] == 0)
        bf = backend.submit(0, hidden.bfloat16(), ids, weights).result()
        assert bf.dtype == torch.bfloat16
        torch.testing.assert_close(bf.float(), got, atol=0.05, rtol=0.05)
        backend.reset_metrics()
        empty = backend.submit(0, hidden, torch.full_like(ids, -1), weights).result()
        assert torch.equal(empty, torch.zeros_like(hidden))
        assert backend.metrics()["calls"] == 0 and backend.metrics()["steps"] == 1


def test_replicas_round_robin_one_call_per_shard(full, servers) -> None:
    table = servers.serve(PlacementTable.contiguous(E, 2).with_replica(0, 1).with_replica(300, 0))
    hidden = torch.randn(5, H)
    ids = torch.tensor([[0, 300]] * 5)
    weights = torch.full((5, 2), 0.5)
    expected = LocalExpertBackend(full).submit(1, hidden, ids, weights).result()
    with RemoteExpertBackend(table) as backend:
        for step in range(4):
            got = backend.submit(1, hidden, ids, weights).result()
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            m = backend.metrics()
            assert m["last_calls_per_step"] == 1  # both replicas chosen on the same shard
            want = {0: 5 * (step // 2 + 1), 1: 5 * ((step + 1) // 2)}  # alternating shards
            assert m["rows_sent_per_shard"] == {s: r for s, r in want.items() if r}
        hidden, ids, weights = routing(16, seed=5)
        got = backend.submit(1, hidden, ids, weights).result()
        expected = LocalExpertBackend(full).submit(1, hidden, ids, weights).result()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert backend.metrics()["last_calls_per_step"] <= 2


def test_swap_placement_between_steps_and_concurrent_submits(full, tables) -> None:
    handle = PlacementHandle(tables[2])
    local = LocalExpertBackend(full)
    with RemoteExpertBackend(handle) as backend:
        steps = [routing(8, seed=s) for s in range(6)]
        handles = [backend.submit(s % 2, *step) for s, step in enumerate(steps[:3])]
        three = tables[3]
        handle.swap(PlacementTable(E, three.shard_experts, three.addresses, version=7))
        handles += [backend.submit(s % 2, *step) for s, step in enumerate(steps[3:], 3)]
        for s, (h, step) in enumerate(zip(handles, steps, strict=True)):
            torch.testing.assert_close(
                h.result(), local.submit(s % 2, *step).result(), atol=1e-5, rtol=1e-5
            )
        errors: list[BaseException] = []

        def worker(seed: int) -> None:
            try:
                for i in range(5):
                    step = routing(4, seed=100 * seed + i)
                    want = local.submit(0, *step).result()
                    torch.testing.assert_close(
                        backend.submit(0, *step).result(), want, atol=1e-5, rtol=1e-5
                    )
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert {info.shard_index for info in backend.shard_info()} == {0, 1, 2}


def _dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_rpc_errors_name_shard_layer_and_status(full, tables) -> None:
    dead = tables[2].with_addresses({1: _dead_address()})
    hidden, ids, weights = routing(8, seed=1)
    with RemoteExpertBackend(dead, timeout_s=5) as backend:
        with pytest.raises(
            ExpertRPCError, match=rf"shard 1 at {dead.addresses[1]} .*layer 1: UNAVAILABLE"
        ):
            backend.submit(1, hidden, ids, weights).result()
        assert backend.metrics()["errors"] >= 1
    with RemoteExpertBackend(tables[2]) as backend:
        with pytest.raises(
            ExpertRPCError, match=r"layer 5: INVALID_ARGUMENT: layer 5 is not held"
        ) as err:
            backend.submit(5, hidden, ids, weights).result()
        assert err.value.code == "INVALID_ARGUMENT" and err.value.layer == 5
        good = backend.submit(1, hidden, ids, weights).result()
        torch.testing.assert_close(
            good,
            LocalExpertBackend(full).submit(1, hidden, ids, weights).result(),
            atol=1e-5,
            rtol=1e-5,
        )
