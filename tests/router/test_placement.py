"""PlacementTable: contiguous plans, replicas, validation; PlacementHandle: atomic swaps."""

from __future__ import annotations

import threading

import pytest
import torch

from router.placement import PlacementError, PlacementHandle, PlacementTable


@pytest.mark.parametrize("shards", range(1, 8))
def test_contiguous_512(shards: int) -> None:
    addrs = [f"10.0.0.{s}:5000" for s in range(shards)]
    table = PlacementTable.contiguous(512, shards, addrs)
    sizes = [len(table.local_rows(s)) for s in range(shards)]
    assert sum(sizes) == 512 and max(sizes) - min(sizes) <= 1
    flat = [e for s in range(shards) for e in table.local_rows(s)]
    assert flat == list(range(512))  # contiguous, ascending, every expert exactly once
    for e in (0, 255, 511):
        (s,) = table.replicas(e)
        assert table.local_rows(s)[table.row_of(e, s)] == e
    assert table.addresses == tuple(addrs) and table.version == 0
    assert torch.equal(
        table.primary_shard, torch.tensor([table.replicas(e)[0] for e in range(512)])
    )


def test_row_table_matches_local_rows() -> None:
    table = PlacementTable.contiguous(10, 3).with_replica(9, 0).with_replica(0, 2)
    for s in range(3):
        for r, e in enumerate(table.local_rows(s)):
            assert int(table.row_table[e, s]) == r
    assert int((table.row_table >= 0).sum()) == 12


def test_with_replica_appends_and_bumps_version() -> None:
    base = PlacementTable.contiguous(512, 3, ["a", "b", "c"])
    rows_before = base.local_rows(2)
    table = base.with_replica(5, 2)
    assert table.version == 1 and base.version == 0
    assert table.replicas(5) == (0, 2) and base.replicas(5) == (0,)
    assert table.local_rows(2) == rows_before + (5,)  # existing rows keep their positions
    assert table.row_of(5, 2) == len(rows_before)
    assert table.replicated_experts == (5,)
    back = table.without_replica(5, 2)
    assert back.version == 2 and back.replicas(5) == (0,) and back.local_rows(2) == rows_before
    moved = table.with_addresses({1: "b2"})
    assert moved.addresses == ("a", "b2", "c") and moved.version == 2
    grown = table.with_shard([1, 2], "d")
    assert grown.num_shards == 4 and grown.replicas(1) == (0, 3) and grown.version == 2


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda t: t.with_replica(5, 0), "expert 5 is already on shard 0"),
        (lambda t: t.with_replica(512, 1), "expert 512 is outside"),
        (lambda t: t.with_replica(3, 9), "shard 9 does not exist"),
        (lambda t: t.without_replica(3, 0), "expert 3 has no other replica than shard 0"),
        (lambda t: t.without_replica(3, 1), "expert 3 is not on shard 1"),
        (lambda t: t.with_addresses(["x"]), "1 addresses for 3 shards"),
        (lambda t: t.row_of(3, 2), "expert 3 is not held by shard 2"),
        (lambda t: PlacementTable(4, ((0, 1), (2,)), ("", "")), "expert 3 is not placed"),
        (lambda t: PlacementTable(4, ((0, 1, 1), (2, 3)), ("", "")), "expert 1 appears twice"),
        (lambda t: PlacementTable(4, ((0, 1, 7), (2, 3)), ("", "")), "expert 7 on shard 0"),
        (lambda t: PlacementTable.contiguous(4, 5), "num_shards <= 4"),
    ],
)
def test_validation_names_expert_or_shard(make, pattern: str) -> None:
    table = PlacementTable.contiguous(512, 3)
    with pytest.raises(PlacementError, match=pattern):
        make(table)


def test_swap_requires_newer_version() -> None:
    table = PlacementTable.contiguous(8, 2)
    handle = PlacementHandle(table)
    newer = table.with_replica(0, 1)
    assert handle.swap(newer) is table and handle.snapshot() is newer
    with pytest.raises(PlacementError, match="version 1 is not newer than current 1"):
        handle.swap(newer)


def test_atomic_swap_under_concurrent_readers() -> None:
    """Readers always see a whole, valid table and versions never go backwards."""
    base = PlacementTable.contiguous(64, 4, [f"v0-{s}" for s in range(4)])
    handle = PlacementHandle(base)
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        last = -1
        while not stop.is_set():
            t = handle.snapshot()
            if t.version < last:
                errors.append(f"version went back {last} -> {t.version}")
            if any(a != f"v{t.version}-{s}" for s, a in enumerate(t.addresses)):
                errors.append(f"torn table at version {t.version}: {t.addresses}")
            last = t.version

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for r in readers:
        r.start()
    for v in range(1, 300):
        handle.swap(handle.snapshot().with_addresses([f"v{v}-{s}" for s in range(4)]))
    stop.set()
    for r in readers:
        r.join()
    assert not errors and handle.version == 299


def test_concurrent_updates_are_not_lost() -> None:
    handle = PlacementHandle(PlacementTable.contiguous(8, 2))

    def bump() -> None:
        for _ in range(100):
            handle.update(lambda t: t.with_addresses(t.addresses))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert handle.version == 400
