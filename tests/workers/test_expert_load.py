"""The counting wrapper: exact per-(layer, expert) counts of routed pairs, deltas on take(),
results passed through unchanged, and the wrapped backend's attributes still reachable."""

from __future__ import annotations

import threading

import pytest
import torch

from workers.expert_load import CountingExpertBackend
from workers.experts import DoneHandle


class Echo:
    """A backend returning its hidden input (so pass-through is visible)."""

    def __init__(self) -> None:
        self.calls = 0

    def submit(self, layer, hidden, ids, weights):
        self.calls += 1
        return DoneHandle(hidden * 2)

    def metrics(self) -> dict:
        return {"calls": self.calls}


def test_counts_match_a_reference_and_take_returns_deltas():
    gen = torch.Generator().manual_seed(0)
    backend = CountingExpertBackend(Echo(), num_layers=3, num_experts=16)
    expected = torch.zeros(3, 16, dtype=torch.long)
    for step in range(20):
        layer = step % 3
        ids = torch.randint(0, 16, (5, 4), generator=gen)
        ids[0, 0] = -1  # padding is not counted
        hidden = torch.randn(5, 8, generator=gen)
        out = backend.submit(layer, hidden, ids, torch.ones(5, 4)).result()
        torch.testing.assert_close(out, hidden * 2)
        for e in ids[ids >= 0].tolist():
            expected[layer, e] += 1
    assert torch.equal(backend.peek(), expected)
    assert torch.equal(backend.take(), expected)
    assert backend.take().sum() == 0  # a delta: restarts at zero
    assert backend.total_pairs == int(expected.sum())


def test_forwards_attributes_and_rejects_bad_ids():
    inner = Echo()
    backend = CountingExpertBackend(inner, 2, 4)
    backend.submit(0, torch.zeros(1, 2), torch.tensor([[0, 3]]), torch.ones(1, 2))
    assert backend.metrics() == {"calls": 1}  # the wrapped backend's method
    with pytest.raises(ValueError, match="expert id 4 is outside"):
        backend.submit(0, torch.zeros(1, 2), torch.tensor([[4, 0]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="layer 2 is outside"):
        backend.submit(2, torch.zeros(1, 2), torch.tensor([[0, 1]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="num_layers"):
        CountingExpertBackend(inner, 0, 4)


def test_concurrent_submit_and_take_lose_nothing():
    backend = CountingExpertBackend(Echo(), 1, 8)
    ids = torch.arange(8).reshape(2, 4)
    taken = []

    def work():
        for _ in range(500):
            backend.submit(0, torch.zeros(2, 1), ids, torch.ones(2, 4))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        taken.append(backend.take())
    for t in threads:
        t.join()
    taken.append(backend.take())
    assert torch.equal(sum(taken), torch.full((1, 8), 1500, dtype=torch.long))
