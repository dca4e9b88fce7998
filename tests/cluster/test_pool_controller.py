"""The pool controller's protocol and healing, on fake shard handles (no Ray processes): loads
come before the table that needs them, releases only after every router acknowledged the table
that dropped them, a retired shard drains first; a dead shard is marked down at once and
replaced with exactly its experts; one slow answer is not a death; a restarted shard is
re-synced; with no room for a replacement the survivors take the experts."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
import ray

from cluster import healing, pool_ops, shard_actors
from cluster.config import ClusterConfig
from cluster.controllers import PoolController
from router.placement import PlacementTable
from workers.make_checkpoint import make_checkpoint

LAYERS, EXPERTS = 4, 32  # the tiny preset


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args, **kwargs):
        return asyncio.ensure_future(self.fn(*args, **kwargs))


class FakeShard:
    """Records every call in a shared log; `mode` makes stats() die, hang or be slow once."""

    ports = itertools.count(1000)

    def __init__(self, sid: str, assignment: dict, log: list) -> None:
        self.sid, self.log = sid, log
        self.held = {int(k): set(v) for k, v in assignment.items()}
        self.addr = f"10.0.0.1:{next(self.ports)}"
        self.mode = "ok"
        for name in ("ready", "load", "release", "stats", "shutdown", "address"):
            setattr(self, name, _Method(getattr(self, f"_{name}")))

    def holdings(self) -> dict:
        return {k: sorted(v) for k, v in self.held.items() if v}

    async def _ready(self):
        return {"shard_id": self.sid, "address": self.addr, "node_id": "n" * 40,
                "experts": self.holdings()}  # fmt: skip

    async def _address(self):
        return self.addr

    async def _load(self, add):
        self.log.append(("load", self.sid, {k: list(v) for k, v in add.items()}))
        for layer, ids in add.items():
            self.held.setdefault(int(layer), set()).update(ids)
        return self.holdings()

    async def _release(self, drop):
        self.log.append(("release", self.sid, {k: list(v) for k, v in drop.items()}))
        for layer, ids in drop.items():
            self.held.get(int(layer), set()).difference_update(ids)
        return self.holdings()

    async def _stats(self):
        if self.mode == "dead":
            raise ray.exceptions.ActorDiedError()
        if self.mode in ("hang", "slow_once"):
            if self.mode == "slow_once":
                self.mode = "ok"
            await asyncio.sleep(3600)
        return {"compute_s": 0.0, "rows": 0, "address": self.addr}

    async def _shutdown(self, grace_s=1.0):
        self.log.append(("shutdown", self.sid))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("m"), "tiny", tokenizer=False))


def controller(model_dir, log, shards=2, **experts) -> PoolController:
    experts = {"shards": shards, **experts}
    experts.setdefault("health", {"probe_interval_s": 0.05, "probe_timeout_s": 0.2,
                                  "probe_failures": 3})  # fmt: skip
    c = PoolController(model_dir, ClusterConfig.from_dict({"experts": experts}))
    table = PlacementTable.contiguous(LAYERS, EXPERTS, shards)
    fakes = {s.shard_id: FakeShard(s.shard_id, s.assignment(), log) for s in table.shards}
    c._table = table.with_addresses({sid: f.addr for sid, f in fakes.items()})
    c._shards = {sid: c._record(f) for sid, f in fakes.items()}
    c.fakes = fakes
    return c


async def wait_retired(c: PoolController, sid: str, tries: int = 100) -> None:
    """Until `sid` has left the table, or `tries` x 20 ms passed (the caller checks)."""
    for _ in range(tries):
        await asyncio.sleep(0.02)
        if sid not in c._table.shard_ids:
            return


def no_ray_nodes(monkeypatch) -> None:
    """Node queries without Ray: one node (the fakes' "nnn..."), Ray picks the place."""
    monkeypatch.setattr(shard_actors, "alive_nodes", lambda: {"n" * 40})
    monkeypatch.setattr(shard_actors, "choose_node", lambda config, per_node, exclude=(): None)


def no_kills(monkeypatch) -> None:
    """ray.kill of a fake handle: nothing to do."""
    monkeypatch.setattr(pool_ops, "_kill", lambda handle: None)
    monkeypatch.setattr(healing, "_kill", lambda handle, no_restart=True: None)


@pytest.fixture
def spawn(monkeypatch):
    """start_shard makes FakeShards (collected in the returned dict)."""
    made = {}

    def start_shard(model_dir, config, sid, assignment, *, bundle=None, node_id=None):
        made[sid] = FakeShard(sid, assignment, made.setdefault("log", []))
        return made[sid]

    monkeypatch.setattr(shard_actors, "start_shard", start_shard)
    no_ray_nodes(monkeypatch)
    no_kills(monkeypatch)
    return made


async def _router(c: PoolController, rid: str, delay: float, acks: list) -> None:
    """A router that acknowledges each new version `delay` s after it appears."""
    version = c._table.version
    while True:
        table = await c.sync(rid, version, None, wait_s=0.2)
        if table is not None:
            await asyncio.sleep(delay)
            version = table.version
            acks.append(("ack", version))
            await c.sync(rid, version)


def test_live_ops_load_first_and_release_after_every_router_acked(model_dir):
    async def run():
        log = []
        c = controller(model_dir, log)
        await c.sync("r-slow", c._table.version)  # registered: the controller waits for it
        router = asyncio.ensure_future(_router(c, "r-slow", 0.3, log))
        v0 = c._table.version
        v1 = await c.add_replica(1, 3, "shard-1")  # expert 3 lives on shard-0
        assert log[0] == ("load", "shard-1", {1: [3]}) and v1 == v0 + 1
        assert c._table.holders(1, 3) == ("shard-0", "shard-1")
        v2 = await c.drop_replica(1, 3, "shard-0")
        assert c._table.holders(1, 3) == ("shard-1",)
        # the release came only after the (slow) router acknowledged v2
        assert log[-2:] == [("ack", v2), ("release", "shard-0", {1: [3]})]
        v3 = await c.move_expert(2, 5, "shard-0", "shard-1")
        assert c._table.holders(2, 5) == ("shard-1",)
        assert log[-3:] == [("load", "shard-1", {2: [5]}), ("ack", v3),
                            ("release", "shard-0", {2: [5]})]  # fmt: skip
        with pytest.raises(Exception, match="no other holder"):
            await c.drop_replica(1, 3, "shard-1")  # its last replica
        router.cancel()
        return c

    c = asyncio.run(run())
    assert 3 in c.fakes["shard-1"].held[1] and 3 not in c.fakes["shard-0"].held[1]


def test_add_and_retire_shard_move_experts_and_drain(model_dir, spawn):
    async def run():
        log = []
        c = controller(model_dir, log, redundant_per_shard=2)
        counts = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
        counts[:, 2] = 5000  # a hot expert: the new shard takes a copy
        c.window.add(counts)
        added = await c.add_shard()
        sid = added["shard_id"]
        assert sid == "shard-2" and c._table.shard(sid).live
        assert all(2 in c._table.shard(sid).experts[layer] for layer in range(LAYERS))
        states = []
        orig = c._publish
        c._publish = lambda t, why: (states.append({s.shard_id: s.state for s in t.shards}),
                                     orig(t, why))[1]  # fmt: skip
        await c.retire_shard("shard-0")
        assert {"shard-0": "draining"}.items() <= states[0].items()  # drained before it left
        assert "shard-0" not in c._table.shard_ids and "shard-0" in c._table.retired
        assert not c._table.uncovered()
        assert ("shutdown", "shard-0") in log
        assert (await c.status())["ready"]

    asyncio.run(run())


def test_dead_shard_marked_down_at_once_and_replaced_with_its_experts(model_dir, spawn):
    async def run():
        c = controller(model_dir, [])
        c._start_loops()
        expected = c._table.shard("shard-1").experts
        versions = []
        orig = c._publish
        c._publish = lambda t, why: (versions.append((t.version, why)), orig(t, why))[1]
        c.fakes["shard-1"].mode = "dead"
        for _ in range(200):
            await asyncio.sleep(0.02)
            if "shard-2" in c._table.shard_ids:
                break
        await c.shutdown()
        return c, versions, expected

    c, versions, expected = asyncio.run(run())
    assert "down" in versions[0][1]  # the first new version marks it down
    assert c._table.shard("shard-2").experts == expected and c._table.shard("shard-2").live
    assert "shard-1" in c._table.retired and not c._table.uncovered()
    assert c.counters["shard_faults"] == 1 and c.counters["shards_replaced"] == 1
    kinds = [e["kind"] for e in c.events]
    assert kinds.index("shard_down") < kinds.index("recovered")


def test_replacement_avoids_the_dead_shards_node_and_retries_one_that_dies_starting(
    model_dir, monkeypatch
):
    """Our probes often notice a lost node before Ray does: Ray still lists it alive, with the
    most free room. The replacement is placed elsewhere; one that dies while starting anyway
    is retried under a fresh name instead of giving the experts to the survivors."""
    tries, made = [], {}

    def start_shard(model_dir, config, sid, assignment, *, bundle=None, node_id=None):
        tries.append((sid, node_id))
        made[sid] = FakeShard(sid, assignment, [])
        if len(tries) == 1:  # landed on the dying node after all
            made[sid].ready = made[sid].address = _Method(_died)
        return made[sid]

    async def _died():
        raise ray.exceptions.ActorDiedError()

    def choose_node(config, per_node, exclude=()):
        return next(n for n in ("node-a", "node-b") if n not in exclude)

    monkeypatch.setattr(shard_actors, "start_shard", start_shard)
    monkeypatch.setattr(shard_actors, "choose_node", choose_node)
    monkeypatch.setattr(shard_actors, "alive_nodes", lambda: {"node-a", "node-b"})
    no_kills(monkeypatch)

    async def run():
        c = controller(model_dir, [], shards=3)
        c._shards["shard-1"].node_id = "node-a"  # the node that is going away
        expected = c._table.shard("shard-1").experts
        await c._on_dead("shard-1", "test", permanent=True)
        await wait_retired(c, "shard-1", 200)
        return c, expected

    c, expected = asyncio.run(run())
    assert tries == [("shard-3", "node-b"), ("shard-4", "node-b")]
    assert c._table.shard_ids == ("shard-0", "shard-4", "shard-2")
    assert c._table.shard("shard-4").experts == expected and c._table.shard("shard-4").live
    assert c.counters["shards_replaced"] == 1


def test_a_replacement_that_never_schedules_leaves_the_bundle_free_once(model_dir, monkeypatch):
    """No node has room (the replacement in the dead shard's bundle never gets scheduled):
    the survivors take the experts and the bundle is free exactly once (not twice)."""

    def start_shard(model_dir, config, sid, assignment, *, bundle=None, node_id=None):
        shard = FakeShard(sid, assignment, [])
        shard.address = _Method(lambda: asyncio.sleep(3600))  # never scheduled
        return shard

    monkeypatch.setattr(shard_actors, "start_shard", start_shard)
    no_ray_nodes(monkeypatch)  # one node, alive; no other node has room
    monkeypatch.setattr(healing, "SCHEDULE_TIMEOUT_S", 0.5)
    no_kills(monkeypatch)

    async def run():
        c = controller(model_dir, [], shards=3)
        c._shards["shard-1"].node_id = "n" * 40
        c._shards["shard-1"].bundle = "bundle-1"
        await c._on_dead("shard-1", "test", permanent=True)
        await wait_retired(c, "shard-1", 300)
        return c

    c = asyncio.run(run())
    assert c._table.shard_ids == ("shard-0", "shard-2") and not c._table.uncovered()
    assert c._free_bundles == ["bundle-1"]


def test_one_slow_answer_is_not_death_but_repeated_ones_are(model_dir, spawn):
    async def run():
        c = controller(model_dir, [])
        c.fakes["shard-0"].mode = "slow_once"
        for _ in range(3):
            await c._probe_all()
        assert c._table.shard("shard-0").live and c.counters["shard_faults"] == 0
        c.fakes["shard-0"].mode = "hang"
        for _ in range(3):
            await c._probe_all()
        assert c.counters["shard_faults"] == 1
        await wait_retired(c, "shard-0", 100)
        return c

    c = asyncio.run(run())
    assert not c._table.uncovered() and "shard-2" in c._table.shard_ids


def test_restarted_shard_is_resynced_to_the_table(model_dir, spawn):
    async def run():
        c = controller(model_dir, [])
        await c.add_replica(0, 31, "shard-0")
        fake = c.fakes["shard-0"]
        fake.held = {layer: set(range(16)) for layer in range(LAYERS)}  # constructor's experts
        fake.addr = "10.0.0.1:9999"  # a new port
        await c._probe_all()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if c._table.shard("shard-0").address == fake.addr:
                break
        return c, fake

    c, fake = asyncio.run(run())
    assert fake.holdings() == c._table.shard("shard-0").assignment()
    assert 31 in fake.held[0] and c.counters["restarts_resynced"] == 1


def test_no_room_for_a_replacement_survivors_take_over(model_dir, monkeypatch):
    def no_room(*args, **kwargs):
        raise RuntimeError("no node has room")

    monkeypatch.setattr(shard_actors, "start_shard", no_room)
    no_ray_nodes(monkeypatch)
    no_kills(monkeypatch)

    async def run():
        c = controller(model_dir, [], shards=3)
        await c._on_dead("shard-1", "test", permanent=True)
        assert not (await c.status())["ready"]  # down at once: its experts are uncovered
        await wait_retired(c, "shard-1", 100)
        return c

    c = asyncio.run(run())
    assert not c._table.uncovered() and c._table.shard_ids == ("shard-0", "shard-2")
    held = set()
    for sid in ("shard-0", "shard-2"):
        held |= {(layer, e) for layer, ids in c.fakes[sid].held.items() for e in ids}
    assert held == {(layer, e) for layer in range(LAYERS) for e in range(EXPERTS)}


def test_policy_rebalances_skewed_load_and_blocked_scale_out_says_why(model_dir, monkeypatch):
    from cluster.autoscaler import NodeRoom

    async def rooms(per_node, timeout_s=10.0):
        return [NodeRoom("n" * 40, 2.0, 1.9, 4.0, 2)]

    monkeypatch.setattr(shard_actors, "node_rooms", rooms)

    async def run():
        c = controller(model_dir, [], redundant_per_shard=2,
                       rebalance={"enabled": True, "interval_s": 0, "min_pairs": 100},
                       autoscaling={"enabled": True, "min_shards": 1, "max_shards": 4,
                                    "target_load": 0.5, "upscale_delay_s": 0})  # fmt: skip
        counts = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
        counts[:, :4] = 1000  # all on shard-0
        c.window.add(counts)
        assert await c.policy_tick() == "rebalance"
        metrics = await c.metrics()
        assert metrics["gauges"]["imbalance"] < 1.15
        for sid in c.fakes:
            c.window.add_shard_stats(sid, 0.0, 0, now=0.0)
            c.window.add_shard_stats(sid, 0.95, 0, now=1.0)
        assert await c.policy_tick() == ""
        return c

    c = asyncio.run(run())
    assert c.counters["scale_blocked"] == 1 and "only share busy cores" in c.last_decision
    assert c.counters["rebalances"] == 1


def test_pausing_the_autoscaler_waits_for_its_change_and_stops_one_being_decided(
    model_dir, monkeypatch
):
    from cluster.autoscaler import NodeRoom

    async def run():
        c = controller(model_dir, [], autoscaling={"enabled": True, "min_shards": 1,
                                                   "max_shards": 4, "target_load": 0.1,
                                                   "upscale_delay_s": 0})  # fmt: skip

        async def rooms(per_node, timeout_s=10.0):  # an operator pauses it meanwhile
            await c.set_policies(autoscale=False)
            return [NodeRoom("n" * 40, 16.0, 1.0, 16.0, len(c.fakes))]

        monkeypatch.setattr(shard_actors, "node_rooms", rooms)
        for sid in c.fakes:
            c.window.add_shard_stats(sid, 0.0, 0, now=0.0)
            c.window.add_shard_stats(sid, 0.95, 0, now=1.0)
        before = c._table.shard_ids
        assert await c.policy_tick() == ""  # it had decided "up", then saw the pause
        assert c._table.shard_ids == before and c.last_decision == ""
        await c.set_policies(autoscale=True)
        async with c._ops:  # a change in flight: the pause returns after it
            pause = asyncio.ensure_future(c.set_policies(autoscale=False))
            await asyncio.sleep(0.05)
            assert not pause.done()
        assert (await asyncio.wait_for(pause, 1.0))["autoscale"] is False

    asyncio.run(run())
