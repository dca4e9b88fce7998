"""Shard faults never fail a step: RemoteExpertBackend against in-process shards (no Ray) that
stop, answer garbage, hold stale rows, or are slow. Nothing here asserts on elapsed time: the
tests wait for counters, and the router's own bounded timeouts end every wait."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from router import wire
from router.client import ExpertsUnavailableError, RemoteExpertBackend
from router.placement import PlacementHandle, PlacementTable, ShardSpec
from tests.router.helpers import E, H, routing, shard_weights
from workers.expert_shard import ExpertShardServicer
from workers.experts import LocalExpertBackend

ALL = (tuple(range(E)),) * 2  # every expert of both layers


def expect(full, layer, step):
    return LocalExpertBackend(full).submit(layer, *step).result()


def wait_for(predicate, what: str, limit_s: float = 120.0) -> None:
    """Poll `predicate` (the limit only stops a hung test; it is not what is tested)."""
    end = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.01)


class Tampered(ExpertShardServicer):
    """A shard that computes correctly and then damages its answer with `mutate(response)`."""

    def __init__(self, weights, shard_id, mutate) -> None:
        super().__init__(weights, shard_id)
        self.mutate = mutate

    def _compute(self, weights, msg):
        response = super()._compute(weights, msg)
        self.mutate(response)
        return response


class Blocking(ExpertShardServicer):
    """A shard whose computes wait for `release` (the event loop keeps answering Info)."""

    def __init__(self, weights, shard_id) -> None:
        super().__init__(weights, shard_id)
        self.release = threading.Event()

    def _compute(self, weights, msg):
        assert self.release.wait(60)
        return super()._compute(weights, msg)


def _output(response) -> torch.Tensor:
    return wire.decode_tensor(response.output).clone()


def _set(response, tensor: torch.Tensor) -> None:
    response.output.CopyFrom(wire.encode_tensor(tensor))


def _nan(r):
    _set(r, _output(r).index_fill_(1, torch.tensor([3]), float("nan")))


BAD_ANSWERS = {
    "nan": (_nan, "output contains non-finite values"),
    "inf": (lambda r: _set(r, _output(r).fill_(float("inf"))), "non-finite"),
    "shape": (lambda r: _set(r, torch.zeros(_output(r).shape[0] + 1, H)), "output shape"),
    "dtype": (lambda r: _set(r, _output(r).double()), "output dtype float64 != expected float32"),
    "request id": (lambda r: setattr(r, "request_id", "7:1:x"), "answer is for shard"),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_bad_answers_are_faults_and_never_merged(full, servers, case: str) -> None:
    mutate, reason = BAD_ANSWERS[case]
    bad_spec, good_spec = ShardSpec("shard-0", "", ALL), ShardSpec("shard-1", "", ALL)
    bad = Tampered(shard_weights(full, bad_spec), "shard-0", mutate)
    table = PlacementTable(2, E, (
        dataclasses.replace(bad_spec, address=servers.start(bad_spec, bad)),
        dataclasses.replace(good_spec, address=servers.start(good_spec)),
    ))  # fmt: skip
    faults: list[tuple[str, str]] = []
    with RemoteExpertBackend(table, on_fault=lambda *f: faults.append(f)) as backend:
        for seed in range(3):
            step = routing(8, seed)
            got = backend.submit(seed % 2, *step).result()
            torch.testing.assert_close(got, expect(full, seed % 2, step), atol=1e-5, rtol=1e-5)
        m = backend.metrics()
    assert bad.stats()["calls"] >= 1  # the bad shard did answer
    assert [s for s, _ in faults] == ["shard-0"] and faults[0][1].startswith("BAD_RESPONSE")
    assert reason in faults[0][1]
    assert (m["faults"], m["replans"], m["errors"], m["waits"]) == (1, 1, 0, 0)
    assert m["excluded_shards"] == ["shard-0"]


def test_shard_stopped_mid_run_replica_takes_over(full, servers) -> None:
    base = PlacementTable.contiguous(2, E, 2)
    table = servers.serve(base.with_shard(ShardSpec("shard-2", "", base.shard("shard-0").experts)))
    faults: list[tuple[str, str]] = []
    with RemoteExpertBackend(table, on_fault=lambda *f: faults.append(f)) as backend:
        for seed in range(6):
            if seed == 2:
                servers.stop(table.shard("shard-0").address)
            for layer in (0, 1):
                step = routing(12, seed)
                got = backend.submit(layer, *step).result()
                torch.testing.assert_close(got, expect(full, layer, step), atol=1e-5, rtol=1e-5)
        m = backend.metrics()
    assert [s for s, _ in faults] == ["shard-0"], faults  # excluded after its first fault
    assert faults[0][1].startswith("UNAVAILABLE")
    assert (m["faults"], m["replans"], m["errors"], m["waits"]) == (1, 1, 0, 0)


def test_no_replica_the_step_waits_for_a_new_table(full, servers) -> None:
    table = servers.serve(PlacementTable.contiguous(2, E, 2))
    handle = PlacementHandle(table)
    step = routing(16, seed=7)
    with RemoteExpertBackend(handle, recovery_timeout_s=300, probe_interval_s=0.05) as backend:
        servers.stop(table.shard("shard-1").address)

        def controller() -> None:  # what the pool controller does once it sees the death
            wait_for(lambda: backend.metrics()["waits"] == 1, "the step to wait")
            spec = ShardSpec("shard-2", "", table.shard("shard-1").experts)
            spec = dataclasses.replace(spec, address=servers.start(spec))
            handle.update(lambda t: t.with_state("shard-1", "down").with_shard(spec))

        thread = threading.Thread(target=controller)
        thread.start()
        got = backend.submit(1, *step).result()
        thread.join()
        torch.testing.assert_close(got, expect(full, 1, step), atol=1e-5, rtol=1e-5)
        m = backend.metrics()
        assert (m["waits"], m["recovered"], m["errors"]) == (1, 1, 0) and m["faults"] >= 1
        backend.reset_metrics()
        got = backend.submit(1, *step).result()
        torch.testing.assert_close(got, expect(full, 1, step), atol=1e-5, rtol=1e-5)
        m = backend.metrics()
        assert m["faults"] == 0 and set(m["rows_sent_per_shard"]) == {"shard-0", "shard-2"}


def test_stale_plan_failed_precondition_is_replanned_on_the_newer_table(full, servers) -> None:
    """The router plans on v_old where shard-0 still holds (layer 1, expert 3); shard-0 has
    already dropped it (v_new). Its FAILED_PRECONDITION re-plans the pairs on v_new, which the
    controller publishes when it hears of the fault."""
    base = PlacementTable.contiguous(2, E, 2).with_replica(1, 3, "shard-1")
    new = base.without_replica(1, 3, "shard-0")
    addresses = {s.shard_id: servers.start(s) for s in new.shards}  # shards hold v_new
    old, new = base.with_addresses(addresses), new.with_addresses(addresses)
    new = PlacementTable(2, E, new.shards, old.version + 1)
    handle = PlacementHandle(old)
    faults: list[tuple[str, str]] = []

    def on_fault(shard_id: str, reason: str) -> None:
        faults.append((shard_id, reason))
        handle.swap(new)

    hidden, _, weights = routing(6, seed=2)
    ids = torch.tensor([[3, 7, 300]] * 6)  # expert 3 round-robins onto shard-0 for some tokens
    step = (hidden, ids, weights[:, :3])
    with RemoteExpertBackend(handle, on_fault=on_fault) as backend:
        got = backend.submit(1, *step).result()
        torch.testing.assert_close(got, expect(full, 1, step), atol=1e-5, rtol=1e-5)
        m = backend.metrics()
        assert [s for s, _ in faults] == ["shard-0"] and faults[0][1].startswith(
            "FAILED_PRECONDITION: shard shard-0 does not hold (layer 1, expert 3)"
        )
        assert f"placement v{old.version}" in faults[0][1]
        assert (m["faults"], m["replans"], m["waits"], m["errors"]) == (1, 1, 0, 0)
        assert m["excluded_shards"] == [] and m["placement_version"] == new.version
        got = backend.submit(1, *step).result()
        assert backend.metrics()["faults"] == 1  # v_new sends expert 3 to shard-1 only


def test_hedging_takes_the_fast_replica(full, servers) -> None:
    spec0, spec1 = ShardSpec("shard-0", "", ALL), ShardSpec("shard-1", "", ALL)
    slow = Blocking(shard_weights(full, spec0), "shard-0")
    table = PlacementTable(2, E, (
        dataclasses.replace(spec0, address=servers.start(spec0, slow)),
        dataclasses.replace(spec1, address=servers.start(spec1)),
    ))  # fmt: skip
    try:
        with RemoteExpertBackend(table, hedge_after_s=0.05) as backend:
            for seed in range(2):
                step = routing(8, seed)
                got = backend.submit(1, *step).result()
                torch.testing.assert_close(got, expect(full, 1, step), atol=1e-5, rtol=1e-5)
            m = backend.metrics()
        assert m["hedges"] >= 2 and m["hedge_wins"] >= 2
        assert (m["faults"], m["errors"], m["waits"]) == (0, 0, 0)
    finally:
        slow.release.set()


def test_slow_shard_without_replica_is_probed_not_declared_dead(full, servers) -> None:
    """A deadline on the only holder is a fault, not a death: the router probes it, and once
    it answers (and computes again) the step completes."""
    spec = ShardSpec("shard-0", "", ALL)
    slow = Blocking(shard_weights(full, spec), "shard-0")
    table = PlacementTable(2, E, (dataclasses.replace(spec, address=servers.start(spec, slow)),))
    step = routing(4, seed=3)
    with RemoteExpertBackend(table, timeout_s=0.5, probe_interval_s=0.05) as backend:
        handle = backend.submit(0, *step)
        wait_for(lambda: backend.metrics()["faults"] >= 1, "a deadline fault")
        slow.release.set()
        got = handle.result()
        m = backend.metrics()
    torch.testing.assert_close(got, expect(full, 0, step), atol=1e-5, rtol=1e-5)
    assert m["probes_ok"] >= 1 and (m["waits"], m["recovered"], m["errors"]) == (1, 1, 0)


def test_recovery_timeout_is_a_clear_error_naming_the_experts(full, servers) -> None:
    table = servers.serve(PlacementTable.contiguous(2, E, 2))
    servers.stop(table.shard("shard-1").address)
    hidden, ids, weights = routing(4, seed=1)
    ids[:, 0] = 400  # held by shard-1 only
    with RemoteExpertBackend(table, recovery_timeout_s=0.2) as backend:
        with pytest.raises(ExpertsUnavailableError) as err:
            backend.submit(1, hidden, ids, weights).result()
        message = str(err.value)
        assert message.startswith("expert pool degraded: no live shard holds (layer 1, expert")
        assert "(layer 1, expert 400)" in message and "after waiting" in message
        assert "127.0.0.1" not in message and err.value.layer == 1 and 400 in err.value.experts
        m = backend.metrics()
        assert (m["errors"], m["waits"], m["recovered"]) == (1, 1, 0)
        low = (hidden, ids.clamp(max=255), weights)  # shard-0's experts still serve
        got = backend.submit(1, *low).result()
    torch.testing.assert_close(got, expect(full, 1, low), atol=1e-5, rtol=1e-5)
