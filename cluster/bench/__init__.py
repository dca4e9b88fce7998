"""Benchmarks of expertmesh on the machine they run on (`expertmesh bench moe|roofline|e2e`).

Shared helpers: loading a checkpoint in fp32, capturing realistic MoE inputs (the
post-attention-norm hidden states of every layer while the model prefills random prompts),
interleaved timing with medians, a local Ray expert pool, and a description of the machine.
Every benchmark runs all of its contenders in one process on the same weights and inputs.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.config import ModelConfig
from workers.experts import LocalExpertBackend
from workers.model import Qwen3NextLM
from workers.runner import ModelRunner

DTYPE = torch.float32  # bf16 matmuls are not fast on every CPU; all benchmarks use fp32


@dataclass
class LoadedModel:
    model_dir: Path
    config: ModelConfig
    lm: Qwen3NextLM
    experts: LocalExpertBackend


def resolve_model(model: str | Path | None) -> Path:
    """`model`, or the cached demo checkpoint (preset "small") when None."""
    if model is None:
        from workers.make_checkpoint import ensure_demo_checkpoint

        return ensure_demo_checkpoint("small")
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: no config.json in {path}")
    return path


def load_model(model_dir: str | Path, storage: str | None = None) -> LoadedModel:
    """Dense path in fp32; experts as `storage` (default: as the dense worker loads them)."""
    from workers.dense_worker import load_lm, local_experts

    lm = load_lm(model_dir, DTYPE, progress=False)
    experts = local_experts(model_dir, DTYPE, False, storage)
    return LoadedModel(Path(model_dir), lm.config, lm, experts)


def random_prompts(count: int, length: int, vocab: int, seed: int, low: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (length,), generator=g).tolist() for _ in range(count)]


@torch.inference_mode()
def capture_moe_inputs(
    model: LoadedModel, tokens: int, seed: int = 0, prompt_len: int = 128
) -> dict[int, torch.Tensor]:
    """Inputs of every layer's MoE block ([N, H] per layer, N >= tokens, same token rows in
    every layer), recorded while the model prefills random prompts of `prompt_len` tokens."""
    count = max(1, -(-tokens // prompt_len))
    prompts = random_prompts(count, prompt_len, model.config.vocab_size, seed)
    captured: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.lm.model.layers):

        def hook(_mod, _inp, out, i=i):
            captured.setdefault(i, []).append(out.detach().clone())

        hooks.append(layer.post_attention_layernorm.register_forward_hook(hook))
    try:
        # the eager modules (their hooks record the inputs; the native step bypasses them)
        runner = ModelRunner(model.lm, model.experts, max_seqs=count, dtype=DTYPE, native=False)
        for prompt in prompts:  # one sequence per step keeps the step small
            runner.step([(runner.allocate(), prompt)])
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(xs) for i, xs in captured.items()}


def sample_rows(pool: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` distinct rows of pool (a decode batch mixes tokens of many sequences)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(pool.shape[0], generator=g)[:count]


def time_call(fn: Callable[[], Any], min_time_s: float = 0.02) -> list[float]:
    """Seconds of each call of fn, called until `min_time_s` has passed (at least once).
    Per-call samples let a median ignore the spikes other processes cause."""
    samples: list[float] = []
    deadline = time.perf_counter() + min_time_s
    while True:
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        samples.append(end - start)
        if end >= deadline:
            return samples


async def sse_lines(resp: Any) -> Any:
    """Lines of a streamed HTTP response (server-sent events), split on "\n" only.

    httpx's `aiter_lines` also splits on U+2028, U+0085 and the like, which JSON strings may
    hold unescaped (random-weight models emit them), cutting one `data:` line in two."""
    buffer = b""
    async for chunk in resp.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace").rstrip("\r")
    if buffer:
        yield buffer.decode("utf-8", errors="replace").rstrip("\r")


def free_port() -> int:
    """A TCP port free on the loopback now (for a server a bench starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated q-th percentile (0..100) of values; nan when empty."""
    if not values:
        return float("nan")
    t = torch.tensor(sorted(values), dtype=torch.float64)
    return float(torch.quantile(t, q / 100.0))


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    """items rotated by k: a different contender goes first in every round."""
    k %= max(1, len(items))
    return list(items[k:]) + list(items[:k])


def settle(idle: float = 0.85, window_s: float = 0.25, timeout_s: float = 10.0) -> float:
    """Wait until the CPUs are idle (at least `idle` of a `window_s` window, from /proc/stat)
    or `timeout_s` passed, so a contender does not run while the previous one is still busy
    after its last response (vLLM's processes do). Seconds waited."""
    from cluster.shard_actors import busy_fraction

    start = time.monotonic()
    if not os.path.exists("/proc/stat"):  # busy_fraction would not wait a window
        return 0.0
    while time.monotonic() - start < timeout_s and 1.0 - busy_fraction(window_s) < idle:
        pass
    return time.monotonic() - start


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch build and threads: printed with every result."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "dtype": str(DTYPE).replace("torch.", ""),
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


class PoolBackend:
    """A RemoteExpertBackend plus `metrics()` that also sums the shards' own counters
    (`shard_calls`, `shard_compute_s`: time inside the shards' expert math)."""

    def __init__(self, backend: Any, pool: Any) -> None:
        self.backend, self.pool = backend, pool

    def submit(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> Any:
        return self.backend.submit(layer, hidden, ids, w)

    def metrics(self) -> dict[str, Any]:
        import ray

        out = dict(self.backend.metrics())
        stats = ray.get([s.stats.remote() for s in self.pool.shards])
        out["shard_calls"] = sum(x["calls"] for x in stats)
        out["shard_compute_s"] = sum(x["compute_s"] for x in stats)
        return out


@contextlib.contextmanager
def expert_pool(model_dir: str | Path, shards: int, num_cpus: float = 0.25) -> Iterator[Any]:
    """A local Ray cluster with `shards` expert-shard actors; yields a PoolBackend.
    Closes the backend, shuts the pool down and stops Ray on exit."""
    import ray

    from cluster.config import ClusterConfig
    from cluster.launcher import ExpertPool, connect_expert_backend, init_ray

    config = ClusterConfig.from_dict(
        {"model": str(model_dir), "experts": {"shards": shards, "num_cpus": num_cpus}}
    )
    init_ray(None, min_cpus=8)
    pool = None
    backend = None
    try:
        pool = ExpertPool.start(str(model_dir), config)
        backend = connect_expert_backend(config)
        yield PoolBackend(backend, pool)
    finally:
        if backend is not None:
            backend.close()
        if pool is not None:
            pool.shutdown()
        ray.shutdown()


ROUTER_COLUMNS = ("calls_per_step", "dispatch_ms_per_step", "combine_ms_per_step",
                  "rpc_ms_per_call", "shard_compute_ms_per_call", "bytes_per_step")  # fmt: skip


def metric_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Difference of the numeric router counters between two `metrics()` snapshots."""
    keys = ("steps calls rows_sent bytes_sent bytes_received rpc_s dispatch_s combine_s errors "
            "shard_calls shard_compute_s").split()  # fmt: skip
    return {k: float(after.get(k, 0)) - float(before.get(k, 0)) for k in keys}


def add_metrics(total: dict[str, float], delta: dict[str, float]) -> None:
    for k, v in delta.items():
        total[k] = total.get(k, 0.0) + v


def per_call(total: dict[str, float]) -> dict[str, float]:
    """Router counters as per-step (one layer submit) / per-RPC means, in ms and bytes."""
    steps, calls = max(total.get("steps", 0.0), 1.0), max(total.get("calls", 0.0), 1.0)
    return {
        "calls_per_step": total.get("calls", 0.0) / steps,
        "dispatch_ms_per_step": 1e3 * total.get("dispatch_s", 0.0) / steps,
        "combine_ms_per_step": 1e3 * total.get("combine_s", 0.0) / steps,
        "rpc_ms_per_call": 1e3 * total.get("rpc_s", 0.0) / calls,
        "shard_compute_ms_per_call": 1e3
        * total.get("shard_compute_s", 0.0)
        / max(total.get("shard_calls", 0.0), 1.0),
        "bytes_per_step": (total.get("bytes_sent", 0.0) + total.get("bytes_received", 0.0)) / steps,
    }
