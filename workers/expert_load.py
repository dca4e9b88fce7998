"""Per-(layer, expert) routing counts, taken where the routing is known: the dense side.

`CountingExpertBackend` wraps any ExpertBackend. Every `submit` adds one `bincount` of the
step's routed expert ids to a [L, E] counter (one small op per layer step; the ids are already
on the CPU) and passes the work on unchanged. `take()` returns the counts since the last take
and zeroes them, so a reporter thread can push deltas to the pool controller, which keeps the
sliding window (cluster/expert_load.py).

Shape legend: L MoE layers, E experts, T tokens, K experts per token.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from workers.experts import ExpertBackend, ExpertHandle


class CountingExpertBackend:
    """An ExpertBackend that counts routed (token, expert) pairs per (layer, expert).

    Attributes it does not define (e.g. `metrics`, `placement`, `close`) are the wrapped
    backend's, so callers that inspect the router see through the wrapper.
    """

    def __init__(self, inner: ExpertBackend, num_layers: int, num_experts: int) -> None:
        if num_layers < 1 or num_experts < 1:
            raise ValueError(
                f"need num_layers >= 1 and num_experts >= 1, got {num_layers}, {num_experts}"
            )
        self.inner = inner
        self.num_layers, self.num_experts = num_layers, num_experts
        self._lock = threading.Lock()
        self._counts = torch.zeros(num_layers, num_experts, dtype=torch.long)  # [L, E]
        self._total = 0  # pairs counted over the wrapper's life

    def submit(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> ExpertHandle:
        """Count ids [T, K] (global; -1 = padding) for `layer`, then submit to the inner one."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside [0, {self.num_layers})")
        flat = ids.reshape(-1).long()
        if flat.numel():
            # shift by one so padding (-1) lands in bin 0, which is dropped
            counts = torch.bincount(flat + 1, minlength=self.num_experts + 1)
            if counts.numel() > self.num_experts + 1:
                raise ValueError(f"expert id {int(flat.max())} is outside [0, {self.num_experts})")
            with self._lock:
                self._counts[layer] += counts[1:]
                self._total += int(flat.numel()) - int(counts[0])
        return self.inner.submit(layer, hidden, ids, weights)

    def take(self) -> torch.Tensor:
        """[L, E] int64 routed pairs since the previous take (the counter restarts at zero)."""
        fresh = torch.zeros_like(self._counts)
        with self._lock:
            out, self._counts = self._counts, fresh
        return out

    def peek(self) -> torch.Tensor:
        """A copy of the counts since the previous take (does not reset them)."""
        with self._lock:
            return self._counts.clone()

    @property
    def total_pairs(self) -> int:
        """Routed pairs counted since this wrapper was made (never reset)."""
        with self._lock:
            return self._total

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)
