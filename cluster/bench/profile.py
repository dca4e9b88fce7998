"""`expertmesh bench profile`: where a decode step's time goes (torch profiler), per batch size,
with the fused expert kernel and with the torch expert path, in one process.

For each batch B: B random prompts are prefilled, a few decode steps warm up, then decode steps
alternate between the expert paths (medians of the step times) and one profiled burst per
path gives the ops: self time per step, calls per step, and the number of torch ops per step
(the per-token Python/dispatch overhead is roughly that count times a few microseconds).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from cluster.bench import load_model, machine_info, median, random_prompts, resolve_model
from cluster.bench.report import machine_line, markdown_table, write_json, write_markdown
from workers import expert_kernel
from workers.runner import ModelRunner

PATHS = ("fused", "torch")


def _use(path: str, fused_ok: bool) -> None:
    """Switch grouped_swiglu between the fused op and torch (the kernel stays loaded)."""
    expert_kernel.LIBRARY.state["ok"] = path == "fused" and fused_ok


@torch.inference_mode()
def run(
    model_dir: str | Path | None = None,
    batches: Sequence[int] = (1, 4, 64),
    prompt_len: int = 128,
    steps: int = 10,
    top: int = 8,
    seed: int = 0,
    out_dir: str | Path = "bench-out",
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> dict[str, Any]:
    model_dir = resolve_model(model_dir)
    model = load_model(model_dir, storage="float32")  # both paths read the same fp32 weights
    fused_ok = expert_kernel.load()
    paths = PATHS if fused_ok else ("torch",)
    results: dict[str, Any] = {}
    try:
        for b in batches:
            log(f"B={b}: prefill {b} x {prompt_len} tokens ...")
            runner = ModelRunner(model.lm, model.experts, max_seqs=b)
            slots = [runner.allocate() for _ in range(b)]
            for s, p in zip(slots, random_prompts(b, prompt_len, model.config.vocab_size, seed),
                            strict=True):  # fmt: skip
                runner.step([(s, p)])
            batch = [(s, [1]) for s in slots]
            times: dict[str, list[float]] = {p: [] for p in paths}
            for path in paths:
                _use(path, fused_ok)
                runner.step(batch)
            for i in range(steps):
                for path in paths if i % 2 == 0 else paths[::-1]:
                    _use(path, fused_ok)
                    t = time.perf_counter()
                    runner.step(batch)
                    times[path].append(time.perf_counter() - t)
            for path in paths:
                _use(path, fused_ok)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        runner.step(batch)
                ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
                results.setdefault(path, {})[b] = {
                    "step_ms": 1e3 * median(times[path]),
                    "ops_per_step": sum(e.count for e in ops) / 3,
                    "top": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 3e3,
                             "calls_per_step": e.count / 3} for e in ops[:top]],
                }  # fmt: skip
    finally:
        _use("fused", fused_ok)
    out = {"benchmark": "profile", "machine": machine_info(), "model": str(model_dir),
           "prompt_len": prompt_len, "steps": steps, "results": results}  # fmt: skip
    write_outputs(out, Path(out_dir))
    return out


def write_outputs(out: dict[str, Any], out_dir: Path) -> None:
    res = out["results"]
    sections = []
    rows = [[path, b, r["step_ms"], r["ops_per_step"], b / (r["step_ms"] / 1e3)]
            for path, by_b in res.items() for b, r in by_b.items()]  # fmt: skip
    sections.append(
        (
            "Decode step",
            markdown_table(
                ["experts", "batch", "step ms (median)", "torch ops per step", "tokens/s"], rows
            ),
        )
    )
    for path, by_b in res.items():
        for b, r in by_b.items():
            top = [[t["op"], t["self_ms_per_step"], t["calls_per_step"]] for t in r["top"]]
            sections.append(
                (
                    f"{path} experts, B={b}: top ops by self time",
                    markdown_table(["op", "self ms per step", "calls per step"], top),
                )
            )
    intro = (f"{machine_line(out['machine'])} Model `{out['model']}`, context "
             f"{out['prompt_len']} tokens, experts fp32.")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "profile.json", out)
    write_markdown(out_dir / "profile.md", "Decode-step profile", sections, intro)
