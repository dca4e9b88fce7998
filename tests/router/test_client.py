"""RemoteExpertBackend against in-process expert shards on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import threading

import pytest
import torch

from router.client import ExpertRPCError, RemoteExpertBackend
from router.placement import PlacementHandle, PlacementTable
from tests.router.helpers import E, H, K, ShardServers, routing
from workers.experts import LocalExpertBackend, UnknownExpertError


@pytest.fixture(scope="module")
def tables(servers: ShardServers) -> dict[int, PlacementTable]:
    return {n: servers.serve(PlacementTable.contiguous(2, E, n)) for n in (1, 2, 3, 4)}


def shards_with_work(table: PlacementTable, layer: int, ids: torch.Tensor) -> dict[str, int]:
    """shard id -> number of distinct tokens routed to it (no replicas)."""
    out: dict[str, int] = {}
    for row in ids.tolist():
        for sid in {table.holders(layer, e)[0] for e in row if e >= 0}:
            out[sid] = out.get(sid, 0) + 1
    return out


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
    work = shards_with_work(table, 1, ids)
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
        with torch.inference_mode():  # how the model runner calls it
            inf = backend.submit(0, hidden, ids, weights).result()
        assert torch.equal(inf, got)
        bf = backend.submit(0, hidden.bfloat16(), ids, weights).result()
        assert bf.dtype == torch.bfloat16
        torch.testing.assert_close(bf.float(), got, atol=0.05, rtol=0.05)
        backend.reset_metrics()
        empty = backend.submit(0, hidden, torch.full_like(ids, -1), weights).result()
        assert torch.equal(empty, torch.zeros_like(hidden))
        assert backend.metrics()["calls"] == 0 and backend.metrics()["steps"] == 1


def test_replicas_share_an_experts_tokens(full, servers) -> None:
    """Expert 0 of layer 1 has copies on both shards: its tokens are split between them, each
    token's row goes at most once to each shard, and the sum equals the local backend."""
    table = PlacementTable.contiguous(2, E, 2).with_replica(1, 0, "shard-1")
    table = servers.serve(table.with_replica(1, 300, "shard-0"))
    hidden = torch.randn(5, H)
    ids = torch.tensor([[0, 300]] * 5)
    weights = torch.full((5, 2), 0.5)
    expected = LocalExpertBackend(full).submit(1, hidden, ids, weights).result()
    with RemoteExpertBackend(table) as backend:
        for _ in range(3):
            got = backend.submit(1, hidden, ids, weights).result()
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            m = backend.metrics()
            assert m["last_calls_per_step"] == 2  # both shards share the work
        rows = m["rows_sent_per_shard"]
        assert rows.keys() == {"shard-0", "shard-1"} and all(r <= 15 for r in rows.values())
        assert sum(rows.values()) >= 15  # each token goes to at least one shard per step
        # layer 0 has no replicas: expert 0 stays on shard-0 only
        backend.reset_metrics()
        got = backend.submit(0, hidden, ids, weights).result()
        torch.testing.assert_close(
            got, LocalExpertBackend(full).submit(0, hidden, ids, weights).result()
        )
        assert backend.metrics()["rows_sent_per_shard"] == {"shard-0": 5, "shard-1": 5}
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
        handle.swap(PlacementTable(2, E, three.shards, version=7))
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
        assert [info.shard_id for info in backend.shard_info()] == list(three.shard_ids)


def test_request_errors_fail_the_step_naming_shard_and_layer_not_address(full, tables) -> None:
    """A mistake no retry fixes (INVALID_ARGUMENT) fails the step with ExpertRPCError; the
    message names the shard id, layer and status but never the address."""
    hidden, ids, weights = routing(8, seed=1)
    with RemoteExpertBackend(tables[2]) as backend:
        with pytest.raises(ExpertRPCError, match=r"expert shard shard-\d failed for layer 1: "
                           r"INVALID_ARGUMENT: hidden size 63 != 64") as err:  # fmt: skip
            backend.submit(1, hidden[:, :63], ids, weights).result()
        assert "127.0.0.1" not in str(err.value) and err.value.address.startswith("127.0.0.1")
        assert err.value.code == "INVALID_ARGUMENT" and err.value.layer == 1
        assert backend.metrics()["errors"] == 1 and backend.metrics()["faults"] == 0
        with pytest.raises(UnknownExpertError, match="layer 5 is not in the placement table"):
            backend.submit(5, hidden, ids, weights)
        good = backend.submit(1, hidden, ids, weights).result()
        torch.testing.assert_close(
            good,
            LocalExpertBackend(full).submit(1, hidden, ids, weights).result(),
            atol=1e-5,
            rtol=1e-5,
        )
