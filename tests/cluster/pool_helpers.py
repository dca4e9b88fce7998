"""Helpers of the pool tests: prompts, a backend wrapper that changes the pool mid-generation,
and the comparison with a static run."""

from __future__ import annotations

import threading

from workers.sampler import SamplingParams

PROMPTS = [list(range(3, 40)), [7, 8, 9], [42], list(range(100, 112)), [5] * 20]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)


class Steps:
    """An ExpertBackend that runs `actions[step]` (a function) on a thread when that layer step
    is submitted, and waits for it `wait` steps later: the change overlaps generation."""

    def __init__(self, inner, actions: dict, wait: int = 6) -> None:
        self.inner, self.actions, self.wait = inner, dict(actions), wait
        self.steps, self.pending, self.results, self.errors = 0, {}, {}, []

    def submit(self, layer, hidden, ids, weights):
        self.steps += 1
        if self.steps in self.actions:
            fn = self.actions[self.steps]
            t = threading.Thread(target=self._run, args=(self.steps, fn))
            t.start()
            self.pending[self.steps + self.wait] = t
        if self.steps in self.pending:
            self.pending.pop(self.steps).join(120)
        return self.inner.submit(layer, hidden, ids, weights)

    def _run(self, step, fn) -> None:
        try:
            self.results[step] = fn()
        except Exception as exc:  # surfaced by the test
            self.errors.append(repr(exc))

    def done(self) -> None:
        for t in self.pending.values():
            t.join(120)


def check_same(outs, static) -> None:
    for out, ref in zip(outs, static, strict=True):
        assert out.error is None, out.error
        assert out.token_ids == ref.token_ids
        assert max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs, strict=True)) < 1e-4
