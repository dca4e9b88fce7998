"""PlacementTable v2: per-(layer, expert) holders, stable shard ids, states, versioned changes,
validation; PlacementHandle: atomic swaps; the planner's assignment over live holders."""

from __future__ import annotations

import threading

import pytest
import torch

from router import planner
from router.placement import (
    PlacementError,
    PlacementHandle,
    PlacementTable,
    ShardSpec,
    assignment_diff,
)

L, E = 4, 512


@pytest.mark.parametrize("shards", range(1, 8))
def test_contiguous_512(shards: int) -> None:
    table = PlacementTable.contiguous(L, E, shards)
    assert table.shard_ids == tuple(f"shard-{s}" for s in range(shards))
    sizes = [len(s.experts[0]) for s in table.shards]
    assert sum(sizes) == E and max(sizes) - min(sizes) <= 1
    for layer in range(L):
        flat = [e for s in table.shards for e in s.experts[layer]]
        assert flat == list(range(E))  # contiguous, ascending, every expert exactly once
    for e in (0, 255, 511):
        (sid,) = table.holders(2, e)
        assert e in table.shard(sid).experts[2] and table.live_holders(2, e) == (sid,)
    assert table.version == 0 and table.uncovered() == () and table.retired == ()
    assert all(s.state == "up" and s.address == "" for s in table.shards)
    named = PlacementTable.contiguous(1, 10, ["a", "b"])
    assert named.shard("b").assignment() == {0: [5, 6, 7, 8, 9]}


def test_layers_are_placed_independently() -> None:
    """A hot expert of layer 1 gets a copy in layer 1 only."""
    base = PlacementTable.contiguous(L, E, 3)
    table = base.with_replica(1, 17, "shard-2")
    assert table.version == 1 and base.version == 0
    assert table.holders(1, 17) == ("shard-0", "shard-2")
    assert table.holders(2, 17) == ("shard-0",) and base.holders(1, 17) == ("shard-0",)
    assert table.holds("shard-2", 1, 17) and not table.holds("shard-2", 2, 17)
    assert 17 in table.shard("shard-2").assignment()[1]
    back = table.without_replica(1, 17, "shard-0")
    assert back.version == 2 and back.holders(1, 17) == ("shard-2",)
    assert back.shard("shard-0").experts[2] == base.shard("shard-0").experts[2]
    m = table.live_holder_matrix(1)
    assert m.shape == (E, 2) and m[17].tolist() == [0, 2] and m[18].tolist() == [0, -1]
    assert table.live_holder_matrix(2).shape == (E, 1)


def test_states_live_holders_and_uncovered() -> None:
    table = PlacementTable.contiguous(2, 8, 2).with_replica(0, 1, "shard-1")
    down = table.with_state("shard-0", "down")
    assert down.holders(0, 1) == ("shard-0", "shard-1")
    assert down.live_holders(0, 1) == ("shard-1",) and down.live_holders(0, 2) == ()
    assert down.uncovered() == tuple((layer, e) for layer in range(2) for e in range(4) if
                                     (layer, e) != (0, 1))  # fmt: skip
    draining = table.with_state("shard-1", "draining")
    assert draining.live_holders(0, 1) == ("shard-0",) and len(draining.uncovered()) == 8
    assert draining.with_state("shard-1", "up").uncovered() == ()
    assert down.live_holder_matrix(0)[:4].tolist() == [[-1], [1], [-1], [-1]]


def test_shards_come_and_go_ids_are_never_reused() -> None:
    table = PlacementTable.contiguous(2, 8, 2)
    assert table.next_shard_id() == "shard-2"
    spec = ShardSpec.from_assignment("shard-2", 2, {0: [0, 1, 2, 3], 1: [3, 2, 1, 0]}, "h:1")
    assert spec.experts == ((0, 1, 2, 3), (0, 1, 2, 3)) and spec.num_pairs() == 8
    grown = table.with_state("shard-0", "down").with_shard(spec)
    assert grown.version == 2 and grown.num_shards == 3 and grown.shard("shard-2").address == "h:1"
    assert grown.uncovered() == ()
    shrunk = grown.without_shard("shard-0")
    assert shrunk.shard_ids == ("shard-1", "shard-2") and shrunk.retired == ("shard-0",)
    assert shrunk.next_shard_id() == "shard-3"
    with pytest.raises(PlacementError, match="shard id shard-0 was retired and is not reused"):
        shrunk.with_shard(ShardSpec("shard-0", "", ((0,), (0,))))
    with pytest.raises(PlacementError, match="shard shard-0 is not in placement v3"):
        shrunk.shard("shard-0")
    moved = shrunk.with_address("shard-1", "h:2").with_addresses({"shard-2": "h:3"})
    assert [s.address for s in moved.shards] == ["h:2", "h:3"] and moved.version == 5
    reassigned = moved.with_assignment("shard-2", {0: [0, 1, 2, 3, 7], 1: [0, 1, 2, 3]})
    assert reassigned.holders(0, 7) == ("shard-1", "shard-2")
    assert reassigned.with_assignment("shard-2", [(0, 1, 2, 3), (0, 1, 2, 3)]).holders(0, 7) == (
        "shard-1",
    )


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda t: t.with_replica(0, 5, "shard-0"), r"shard shard-0 already holds \(layer 0, ex"),
        (lambda t: t.with_replica(0, 512, "shard-1"), "expert 512 is outside"),
        (lambda t: t.with_replica(4, 3, "shard-1"), r"layer 4 is outside \[0, 4\)"),
        (lambda t: t.with_replica(0, 3, "shard-9"), "shard shard-9 is not in placement v0"),
        (lambda t: t.without_replica(0, 3, "shard-0"),
         r"\(layer 0, expert 3\) has no other holder than shard shard-0"),
        (lambda t: t.without_replica(0, 3, "shard-1"), r"shard-1 does not hold \(layer 0, exp"),
        (lambda t: t.with_replica(0, 3, "shard-1").with_state("shard-1", "down")
         .without_replica(0, 3, "shard-0"), r"no other live holder than shard shard-0"),
        (lambda t: t.without_shard("shard-1"),
         r"\(layer 0, expert 171\) is not placed on any shard"),
        (lambda t: t.with_shard(ShardSpec("shard-1", "", ((),) * 4)), "already in the table"),
        (lambda t: t.with_shard(ShardSpec("x", "", ((),) * 3)), "experts for 3 layers, table h"),
        (lambda t: t.with_state("shard-0", "dead"), r"state 'dead' is not one of"),
        (lambda t: t.with_assignment("shard-0", {0: [1, 1]}), "expert 1 appears twice in layer 0"),
        (lambda t: t.with_assignment("shard-0", {7: [1]}), r"layer 7 is outside \[0, 4\)"),
        (lambda t: t.with_assignment("shard-0", {0: [-1]}), r"expert -1 in layer 0 is outside"),
        (lambda t: ShardSpec(""), "shard id must be a non-empty string"),
        (lambda t: PlacementTable(4, E, (t.shards[0], t.shards[0])), "shard-0 appears twice"),
        (lambda t: PlacementTable.contiguous(4, 4, 5), r"need 1 <= shards <= 4 experts"),
    ],
)  # fmt: skip
def test_validation_names_layer_expert_or_shard(make, pattern: str) -> None:
    table = PlacementTable.contiguous(L, E, 3)
    with pytest.raises(PlacementError, match=pattern):
        make(table)


def test_assignment_diff() -> None:
    add, drop = assignment_diff({0: [1, 2], 3: [5]}, {0: [2, 4], 1: [7]})
    assert add == {0: [4], 1: [7]} and drop == {0: [1], 3: [5]}
    assert assignment_diff({0: [1]}, {0: [1]}) == ({}, {})


def test_planner_spreads_replicas_and_skips_excluded_and_dead() -> None:
    table = PlacementTable.contiguous(2, 8, 2).with_replica(1, 0, "shard-1")
    experts = torch.tensor([0, 0, 0, 0, 5, 0])
    for turn in (0, 1):
        shard = planner.assign(table, 1, experts, turn=turn)
        zeros = shard[experts == 0].tolist()  # expert 0's 5 pairs alternate between copies
        assert zeros == [(i + turn) % 2 for i in range(5)]
        assert shard[4] == 1  # expert 5 lives on shard-1 only
    assert planner.assign(table, 0, experts).tolist() == [0, 0, 0, 0, 1, 0]  # layer 0: no copy
    excluded = planner.assign(table, 1, experts, excluded={1})
    assert excluded.tolist() == [0, 0, 0, 0, -1, 0]
    down = planner.assign(table.with_state("shard-0", "down"), 1, experts)
    assert down.tolist() == [1, 1, 1, 1, 1, 1]
    assert planner.assign(table, 1, torch.empty(0, dtype=torch.long)).numel() == 0


def test_swap_requires_newer_version_and_wait_newer() -> None:
    table = PlacementTable.contiguous(1, 8, 2)
    handle = PlacementHandle(table)
    newer = table.with_replica(0, 0, "shard-1")
    assert handle.wait_newer(0, timeout=0) is None
    assert handle.swap(newer) is table and handle.snapshot() is newer
    assert handle.wait_newer(0, timeout=0) is newer
    with pytest.raises(PlacementError, match="version 1 is not newer than current 1"):
        handle.swap(newer)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(handle.wait_newer(1, timeout=60)))
    waiter.start()
    handle.update(lambda t: t.with_state("shard-0", "draining"))
    waiter.join()
    assert got[0].version == 2 and got[0].shard("shard-0").state == "draining"


def test_atomic_swap_under_concurrent_readers() -> None:
    """Readers always see a whole, valid table and versions never go backwards."""
    base = PlacementTable.contiguous(2, 64, 4)
    base = base.with_addresses({s: f"v1-{s}" for s in base.shard_ids})
    handle = PlacementHandle(base)
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        last = -1
        while not stop.is_set():
            t = handle.snapshot()
            if t.version < last:
                errors.append(f"version went back {last} -> {t.version}")
            if any(s.address != f"v{t.version}-{s.shard_id}" for s in t.shards):
                errors.append(f"torn table at version {t.version}")
            last = t.version

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for r in readers:
        r.start()
    for v in range(2, 200):
        handle.swap(handle.snapshot().with_addresses({s: f"v{v}-{s}" for s in base.shard_ids}))
    stop.set()
    for r in readers:
        r.join()
    assert not errors and handle.version == 199


def test_concurrent_updates_are_not_lost() -> None:
    handle = PlacementHandle(PlacementTable.contiguous(1, 8, 2))

    def bump() -> None:
        for _ in range(100):
            handle.update(lambda t: t.with_address("shard-0", "x"))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert handle.version == 400
