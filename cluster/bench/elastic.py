"""`expertmesh bench elastic`: the elastic expert pool under steady concurrent load.

On a skewed checkpoint (`make-checkpoint --skew`), one dense engine (in this process, its
router on the pool) keeps `concurrency` greedy requests in flight while the pool changes:

1. before: the contiguous placement; imbalance (max/mean routed rows per shard, per layer,
   over the phase) and output tok/s;
2. rebalance (EPLB with `redundant_per_shard` copies), then the same figures after;
3. rising load (`rise` x concurrency) with the autoscaler on: the time from its decision to
   the new shard serving, tok/s before/after (if it refuses because no node has idle cores it
   says so, and the bench then adds the shard itself, labelled "forced");
4. falling load: the autoscaler retires a shard (or the bench does, "forced"), tok/s after.

Every request's tokens are compared with a static run (local experts, same prompts): equal,
or different only after a near-tie (top-2 logprob margin < 1e-4 in the static run). Failed
requests through every change are counted (the target is 0). Writes elastic.json/.md/.png.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.bench import machine_info, random_prompts
from cluster.bench.elastic_report import write_report
from cluster.bench.elastic_static import compare_with_static, skewed_demo

__all__ = ["run", "skewed_demo"]


@dataclass
class Phase:
    name: str
    concurrency: int
    seconds: float = 0.0
    start: float = -1.0  # seconds since the load generator started
    tokens: int = 0
    finished: int = 0
    failed: int = 0
    metrics: dict = field(default_factory=dict)  # controller gauges at the end
    shards: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class LoadGen:
    """Keeps `concurrency` requests in flight on one engine; records every finished output."""

    def __init__(self, engine, vocab: int, prompt_len: int, max_tokens: int, seed: int) -> None:
        from workers.sampler import SamplingParams

        self.engine, self.vocab, self.prompt_len = engine, vocab, prompt_len
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                     logprobs=True)  # fmt: skip
        self.seed, self.ids = seed, itertools.count()
        self.prompts: dict[str, list[int]] = {}
        self.outputs: dict[str, Any] = {}
        self.partial: dict[str, Any] = {}
        self.timeline: list[tuple[float, int]] = []  # (time, tokens generated so far)
        self.tokens = 0
        self.t0 = time.perf_counter()

    def _top_up(self, concurrency: int) -> None:
        while len(self.partial) < concurrency:
            n = next(self.ids)
            rid = f"r{n}"
            (prompt,) = random_prompts(1, self.prompt_len, self.vocab, self.seed * 100_003 + n,
                                       low=3)  # fmt: skip
            self.prompts[rid] = prompt
            self.partial[rid] = None
            self.engine.add_request(rid, prompt, self.params)

    def run(self, phase: Phase, until: Callable[[], bool]) -> Phase:
        """Step until `until()` is true; tokens and finished requests go to `phase`."""
        start, tokens0 = time.perf_counter(), self.tokens
        if phase.start < 0:
            phase.start = start - self.t0
        while not until():
            self._top_up(phase.concurrency)
            for out in self.engine.step():
                prev = self.partial.get(out.request_id)
                merged = out if prev is None else prev.merge(out)
                self.tokens += len(out.token_ids)
                if out.finished:
                    self.partial.pop(out.request_id, None)
                    self.outputs[out.request_id] = merged
                    phase.finished += 1
                    phase.failed += int(out.error is not None)
                else:
                    self.partial[out.request_id] = merged
            self.timeline.append((time.perf_counter() - self.t0, self.tokens))
        phase.seconds += time.perf_counter() - start
        phase.tokens += self.tokens - tokens0
        return phase

    def drain(self) -> None:
        """Finish what is in flight (counted in no phase)."""
        self.run(Phase("drain", 0), lambda: not self.partial)


def _for(seconds: float) -> Callable[[], bool]:
    end = time.perf_counter() + seconds
    return lambda: time.perf_counter() >= end


def _in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        t = time.perf_counter()
        try:
            box["result"] = fn()
        except Exception as exc:
            box["error"] = repr(exc)
        box["seconds"] = time.perf_counter() - t

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def run(
    model_dir: str | Path, *, shards: int = 2, concurrency: int = 8, rise: float = 2.0,
    phase_s: float = 20.0, prompt_len: int = 32, max_tokens: int = 32,
    redundant_per_shard: int = 2, seed: int = 0, out_dir: str | Path = "bench-out",
    command: str = "",
) -> dict[str, Any]:  # fmt: skip
    import ray

    from cluster.config import ClusterConfig
    from cluster.launcher import ExpertPool, connect_expert_backend, init_ray
    from workers.dense_worker import DenseWorker
    from workers.requests import EngineConfig

    high = max(concurrency + 1, int(round(concurrency * rise)))
    config = ClusterConfig.from_dict({"model": str(model_dir), "experts": {
        "shards": shards, "num_cpus": 0.5, "redundant_per_shard": redundant_per_shard,
        "load": {"window_s": phase_s}, "recovery_timeout_s": 120.0,
        "rebalance": {"enabled": True, "trigger": 1.0, "min_gain": 0.02, "min_pairs": 100},
        "autoscaling": {"enabled": True, "min_shards": 1, "max_shards": shards + 1,
                        "upscale_delay_s": phase_s / 4, "downscale_delay_s": phase_s / 4},
    }})  # fmt: skip
    engine_config = EngineConfig(max_num_seqs=high, max_model_len=prompt_len + max_tokens + 8)
    init_ray(None, min_cpus=8)
    pool = ExpertPool.start(str(model_dir), config)
    backend = None
    try:
        ray.get(pool.controller.set_policies.remote(rebalance=False, autoscale=False))
        backend = connect_expert_backend(config)
        worker = DenseWorker(str(model_dir), "float32", engine_config, experts=backend)
        gen = LoadGen(worker.engine, worker.config.vocab_size, prompt_len, max_tokens, seed)
        bench = Stages(gen, pool.controller, phase_s)
        bench.run(concurrency, high)
        report = ray.get(pool.controller.load_report.remote())
    finally:
        if backend is not None:
            backend.close()
        pool.shutdown()
        ray.shutdown()
    result = {
        "machine": machine_info(), "model": str(model_dir), "shards": shards,
        "command": command or f"expertmesh bench elastic --model {model_dir}",
        "concurrency": concurrency, "high_concurrency": high, "phase_s": phase_s,
        "redundant_per_shard": redundant_per_shard, "target_load": bench.target_load,
        "phases": [vars(p) | {"tok_s": p.tok_s} for p in bench.phases],
        "changes": bench.changes, "failed_requests": sum(p.failed for p in bench.phases),
        "requests": len(gen.outputs), "timeline": gen.timeline, "events": report["events"],
        "final_rates": report["rates"],
        "equality": compare_with_static(str(model_dir), gen, engine_config),
    }  # fmt: skip
    write_report(result, out_dir)
    return result


class Stages:
    """The bench's sequence of load phases and pool changes (see the module docstring)."""

    def __init__(self, gen: LoadGen, controller: Any, phase_s: float) -> None:
        self.gen, self.c, self.phase_s = gen, controller, phase_s
        self.phases: list[Phase] = []
        self.changes: list[dict] = []
        self.target_load = 0.0

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(getattr(self.c, method).remote(*args, **kwargs))

    def measure(self, name: str, conc: int) -> Phase:
        """A phase of `phase_s` at `conc`, with the controller's figures at its end."""
        phase = self.gen.run(Phase(name, conc), _for(self.phase_s))
        m = self._call("metrics")
        phase.metrics, phase.shards, phase.layers = m["gauges"], m["shards"], m["layers"]
        self.phases.append(phase)
        return phase

    def change(self, name: str, method: str, conc: int, **kwargs: Any) -> None:
        """Run a controller operation while the load goes on."""
        thread, box = _in_background(lambda: self._call(method, **kwargs))
        during = self.gen.run(Phase(f"during {name}", conc), lambda: not thread.is_alive())
        self.phases.append(during)
        self.changes.append({"change": name, **box, "failed_during": during.failed})

    def run(self, low: int, high: int) -> None:
        self.gen.run(Phase("warm-up", low), _for(self.phase_s / 4))
        self.measure("before rebalance", low)
        self.change("rebalance", "rebalance_now", low, force=True)
        self.measure("after rebalance", low)
        rising = self.measure("rising load", high)
        # the target busy fraction that asks for exactly one more shard at this load
        busy = sum(v["busy"] for v in rising.shards.values() if v["state"] == "up")
        up = sum(v["state"] == "up" for v in rising.shards.values())
        self.target_load = min(1.0, max(0.01, busy / (up + 0.5)))
        self._call("set_policies", autoscale=True, target_load=self.target_load)
        if self.wait_scale("up", high, up):
            self.change("scale-up (forced)", "add_shard", high)
        self.measure("after scale-up", high)
        live = self._live()
        self._call("set_policies", autoscale=True)
        if self.wait_scale("down", max(1, low // 2), live):
            self.change("scale-down (forced)", "retire_shard", max(1, low // 2))
        self.measure("after scale-down", max(1, low // 2))
        self.gen.drain()

    def wait_scale(self, action: str, conc: int, before: int) -> bool:
        """Load at `conc` until the autoscaler scales `action`, then pause it; True if it
        refused or did not within 3 phases (the bench then makes the change itself)."""
        seen: dict[str, Any] = {"change": f"scale-{action} (autoscaler)", "forced": False}
        t0 = time.perf_counter()

        def done() -> bool:
            live = self._live()
            seen["decision"] = self._call("load_report")["decision"]
            if action == "up" and seen["decision"].startswith("blocked"):
                seen["forced"] = True
                return True
            if time.perf_counter() - t0 > 3 * self.phase_s:
                seen["forced"] = True
                return True
            return live > before if action == "up" else live < before

        phase = self.gen.run(Phase(f"waiting for scale-{action}", conc), _throttle(done, 1.0))
        self.phases.append(phase)
        self._call("set_policies", autoscale=False)  # returns once no change is in flight
        live = self._live()
        if seen["forced"] and (live > before if action == "up" else live < before):
            seen["forced"] = False  # the autoscaler's change landed as the wait ended
        kind = f"scale_{action}"
        events = [e for e in self._call("load_report")["events"] if e["kind"] == kind]
        if events and not seen["forced"]:
            seen["seconds"] = events[-1].get("seconds")
        seen["failed_during"] = phase.failed
        self.changes.append(seen)
        return seen["forced"]

    def _live(self) -> int:
        return len([s for s in self._call("get").shards if s.live])


def _throttle(fn: Callable[[], bool], every_s: float) -> Callable[[], bool]:
    last = [0.0, False]

    def check() -> bool:
        now = time.perf_counter()
        if now - last[0] >= every_s:
            last[0], last[1] = now, fn()
        return last[1]

    return check
