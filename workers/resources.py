"""Process-level resource settings for actors that share CPU cores."""

from __future__ import annotations

import torch


def pin_torch_threads(threads: int | None = None, reserve: int = 0) -> int:
    """Size torch's intra-op pool to `threads`, or to the CPUs Ray assigned to this actor
    minus `reserve` (at least 1). More threads than the actor's share is catastrophic on a busy
    machine: every small op waits for a descheduled OpenMP worker (100x slower measured on 2
    cores). Actors whose engine thread runs beside an event loop reserve a core for the loop
    (3x faster measured: 178 vs 63 tok/s on 2 cores)."""
    if threads is None:
        import ray

        cpus = 0.0
        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
        threads = int(cpus) if cpus else torch.get_num_threads()
        threads = max(1, threads - reserve)
    torch.set_num_threads(threads)
    return threads
