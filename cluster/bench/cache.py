"""`expertmesh bench cache`: the hybrid cache's figures (docs/performance.md, "The cache").

1. decode attention: seconds inside the attention layers per decode step of B sequences at
   C tokens of context (paged blocks gathered per step), next to the whole step.
2. KV eviction (`sink_window`): fidelity against the exact cache (teacher-forced: both see the
   exact run's greedy tokens; logprob drift, top-1 agreement), KV held per sequence, and the
   decode step time, exact and windowed interleaved.
3. long context: one sequence prefilled in 512-token chunks to N tokens (seconds, growth of
   resident memory sampled after every chunk), and the decode step at growing contexts split
   into attention and the rest (only attention should grow).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cluster.bench import (
    DTYPE,
    LoadedModel,
    load_model,
    machine_info,
    median,
    random_prompts,
    resolve_model,
)
from cluster.bench.report import machine_line, markdown_table, write_json, write_markdown
from workers.attention import GatedAttention
from workers.cache_config import CacheConfig
from workers.runner import ModelRunner

CHUNK = 512


class AttentionClock:
    """Seconds spent in the model's attention layers since the last `take()`."""

    def __init__(self, model: LoadedModel) -> None:
        self.seconds = 0.0
        self.hooks = []
        for mod in model.lm.modules():
            if isinstance(mod, GatedAttention):
                self.hooks.append(mod.register_forward_pre_hook(self._start))
                self.hooks.append(mod.register_forward_hook(self._stop))

    def _start(self, mod: Any, args: Any) -> None:
        self._t = time.perf_counter()

    def _stop(self, mod: Any, args: Any, out: Any) -> None:
        self.seconds += time.perf_counter() - self._t

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


class Decoder:
    """B sequences prefilled in one runner; `step(tokens)` is one decode step."""

    def __init__(self, model: LoadedModel, prompts: list[list[int]], cache: CacheConfig) -> None:
        longest = max(map(len, prompts)) + 1024
        # eager modules: AttentionClock times the attention layers by their hooks
        self.runner = ModelRunner(model.lm, model.experts, len(prompts), DTYPE,
                                  cache_config=cache, max_model_len=longest,
                                  native=False)  # fmt: skip
        self.slots = [self.runner.allocate() for _ in prompts]
        self.last = [self.prefill(s, p) for s, p in zip(self.slots, prompts, strict=True)]

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        for lo in range(0, len(ids), CHUNK):
            logits = self.runner.step([(slot, ids[lo : lo + CHUNK])])[0]
            self.evict(slot)
        return logits

    def evict(self, slot: int) -> None:
        if not self.runner.cache.window.exact:
            self.runner.cache.evict(slot)

    def step(self, tokens: list[int]) -> torch.Tensor:
        logits = self.runner.step([(s, [t]) for s, t in zip(self.slots, tokens, strict=True)])
        for s in self.slots:
            self.evict(s)
        return logits

    def kv_blocks(self) -> int:
        pool = self.runner.cache.pool
        return pool.num_usable - pool.num_available


@torch.inference_mode()
def decode_attention(model: LoadedModel, batch: int, contexts: Sequence[int], steps: int,
                     seed: int) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    clock = AttentionClock(model)
    try:
        for ctx in contexts:
            prompts = random_prompts(batch, ctx, model.config.vocab_size, seed)
            dec = Decoder(model, prompts, CacheConfig(prefix_caching=False))
            tokens = [int(x.argmax()) for x in dec.last]
            attn, total = [], []
            for _ in range(steps):
                clock.take()
                start = time.perf_counter()
                tokens = dec.step(tokens).argmax(-1).tolist()
                total.append(time.perf_counter() - start)
                attn.append(clock.take())
            rows.append({"batch": batch, "context": ctx, "attention_ms": 1e3 * median(attn),
                         "step_ms": 1e3 * median(total)})  # fmt: skip
    finally:
        clock.close()
    return rows


@torch.inference_mode()
def eviction(model: LoadedModel, prompt_len: int, windows: Sequence[int], sinks: int,
             batch: int, steps: int, seed: int) -> list[dict[str, Any]]:  # fmt: skip
    prompts = random_prompts(batch, prompt_len, model.config.vocab_size, seed)
    exact = Decoder(model, prompts, CacheConfig(prefix_caching=False))
    tokens = [[int(x.argmax())] for x in exact.last]
    ref = [torch.stack(exact.last).log_softmax(-1)]
    policies = {w: Decoder(model, prompts, CacheConfig(
        prefix_caching=False, kv_eviction="sink_window", kv_sink_tokens=sinks,
        kv_window_tokens=w)) for w in windows}  # fmt: skip
    got = {w: [torch.stack(d.last).log_softmax(-1)] for w, d in policies.items()}
    times: dict[Any, list[float]] = {"exact": [], **{w: [] for w in windows}}
    for i in range(steps):  # teacher-forced: every cache is fed the exact run's tokens
        feed = [t[-1] for t in tokens]
        order = ["exact", *windows]
        order = order[i % len(order) :] + order[: i % len(order)]
        for name in order:
            dec = exact if name == "exact" else policies[name]
            start = time.perf_counter()
            logits = dec.step(feed)
            times[name].append(time.perf_counter() - start)
            (ref if name == "exact" else got[name]).append(logits.log_softmax(-1))
        for t, x in zip(tokens, ref[-1], strict=True):
            t.append(int(x.argmax()))
    ref_lp = torch.stack(ref)  # [steps + 1, B, V]
    rows = [{"policy": "exact", "kv_blocks_per_seq": exact.kv_blocks() / batch,
             "decode_ms": 1e3 * median(times["exact"]), "max_abs_logprob_drift": 0.0,
             "mean_abs_logprob_drift": 0.0, "top1_agreement": 1.0}]  # fmt: skip
    chosen = torch.tensor(tokens).T[:, :, None]  # [steps + 1, B, 1] the exact run's tokens
    for w in windows:
        lp = torch.stack(got[w])
        drift = (lp.gather(-1, chosen) - ref_lp.gather(-1, chosen)).abs()
        rows.append({
            "policy": f"sinks {sinks} + window {w}",
            "kv_blocks_per_seq": policies[w].kv_blocks() / batch,
            "decode_ms": 1e3 * median(times[w]),
            "max_abs_logprob_drift": float(drift.max()),
            "mean_abs_logprob_drift": float(drift.mean()),
            "top1_agreement": float((lp.argmax(-1) == ref_lp.argmax(-1)).float().mean()),
        })  # fmt: skip
    return rows


@torch.inference_mode()
def long_context(model: LoadedModel, contexts: Sequence[int], steps: int,
                 seed: int) -> dict[str, Any]:  # fmt: skip
    longest = max(contexts)
    prompt = random_prompts(1, longest, model.config.vocab_size, seed)[0]
    runner = ModelRunner(
        model.lm,
        model.experts,
        1,
        DTYPE,
        cache_config=CacheConfig(prefix_caching=False),
        max_model_len=longest + steps * len(contexts) + 8,
        native=False,
    )  # fmt: skip  (eager: AttentionClock times the attention modules)
    slot = runner.allocate()
    clock = AttentionClock(model)
    rss0 = peak = _rss()
    rows, done, prefill_s, token = [], 0, 0.0, 0
    try:
        for ctx in sorted(contexts):
            start = time.perf_counter()
            for lo in range(done, ctx, CHUNK):
                token = int(runner.step([(slot, prompt[lo : min(lo + CHUNK, ctx)])])[0].argmax())
                peak = max(peak, _rss())
            prefill_s += time.perf_counter() - start
            done = ctx
            attn, total = [], []
            for _ in range(steps):
                clock.take()
                start = time.perf_counter()
                token = int(runner.step([(slot, [token])])[0].argmax())
                total.append(time.perf_counter() - start)
                attn.append(clock.take())
            rows.append({"context": ctx, "step_ms": 1e3 * median(total),
                         "attention_ms": 1e3 * median(attn),
                         "rest_ms": 1e3 * (median(total) - median(attn))})  # fmt: skip
    finally:
        clock.close()
    return {
        "prompt_tokens": longest,
        "prefill_s": prefill_s,
        "peak_rss_growth_mb": (peak - rss0) / 2**20,
        "kv_mb": longest * runner.cache.plan.kv_token_bytes / 2**20,
        "decode": rows,
    }


def _rss() -> int:
    """Resident bytes of this process now (sampled after every prefill chunk)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run(model_dir: str | Path | None = None, batch: int = 64, contexts: Sequence[int] = (200,
        1000), windows: Sequence[int] = (256, 1024), sinks: int = 64, prompt_len: int = 4096,
        long_contexts: Sequence[int] = (1024, 4096, 16384, 32000), steps: int = 16,
        seed: int = 0, out_dir: str | Path = "bench-out") -> dict[str, Any]:  # fmt: skip
    model = load_model(resolve_model(model_dir))
    result = {"machine": machine_info(), "model": str(model.model_dir)}
    result["decode_attention"] = decode_attention(model, batch, contexts, steps, seed)
    result["eviction"] = eviction(model, prompt_len, windows, sinks, 4, steps, seed)
    lc = [c for c in long_contexts if c <= model.config.max_position_embeddings - 64]
    result["long_context"] = long_context(model, lc, max(4, steps // 2), seed) if lc else None
    write_json(Path(out_dir, "cache.json"), result)
    write_markdown(Path(out_dir, "cache.md"), "Hybrid cache", _sections(result),
                   intro=machine_line(result["machine"]))  # fmt: skip
    return result


def _sections(r: dict[str, Any]) -> list[tuple[str, str]]:
    da = markdown_table(["batch", "context", "attention ms/step", "whole step ms"], [
        [x["batch"], x["context"], x["attention_ms"], x["step_ms"]]
        for x in r["decode_attention"]])  # fmt: skip
    ev = markdown_table(
        ["policy", "KV blocks/seq", "decode ms (B=4)", "max abs dlogprob", "mean abs dlogprob",
         "top-1 agreement"],
        [[x["policy"], x["kv_blocks_per_seq"], x["decode_ms"], x["max_abs_logprob_drift"],
          x["mean_abs_logprob_drift"], x["top1_agreement"]] for x in r["eviction"]])  # fmt: skip
    sections = [("Decode attention (paged blocks)", da),
                ("KV eviction vs exact (teacher-forced)", ev)]  # fmt: skip
    lc = r["long_context"]
    if lc:
        table = markdown_table(
            ["context", "decode step ms", "attention ms", "rest ms"],
            [[x["context"], x["step_ms"], x["attention_ms"], x["rest_ms"]] for x in lc["decode"]],
        )
        growth = lc["peak_rss_growth_mb"]
        head = (f"Prefill of {lc['prompt_tokens']:,} tokens in {CHUNK}-token chunks: "
                f"{lc['prefill_s']:.1f} s, resident memory +{growth:.0f} MB at most "
                f"(its KV: {lc['kv_mb']:.1f} MB).\n\n")  # fmt: skip
        sections.append(("Long context (one sequence)", head + table))
    return sections
