"""`expertmesh bench e2e`: C concurrent mixed-length requests against the server, and the same
requests through transformers `generate()` on the same checkpoint.

Ours, `mode="engine"`: an in-process Engine (AsyncEngine thread) over a ModelRunner with local
experts (or `shards` gRPC shards); all C requests arrive at once as asyncio clients.
Ours, `mode="serve"`: the Ray Serve app (deploy.app) over its OpenAI-compatible HTTP API,
streamed with httpx (`return_token_ids` gives the tokens of every chunk).
Transformers: Qwen3NextForCausalLM.from_pretrained(fp32), greedy, batches of `hf_batch`
requests left-padded to their longest prompt, max_new_tokens = the batch's longest request.
Throughput counts the tokens the requests asked for (both sides produce exactly those; tokens
transformers generates past a request's own limit are reported but not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cluster.bench import (
    DTYPE,
    expert_pool,
    free_port,
    load_model,
    machine_info,
    percentile,
    resolve_model,
    sse_lines,
)
from cluster.bench.report import machine_line, markdown_table, write_json, write_markdown
from workers.sampler import SamplingParams

DENSE_CPUS = 2.0  # the Serve dense replica's num_cpus (Ray sets its OMP threads from it)


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    def describe(self) -> dict[str, Any]:
        lens = [len(p) for p in self.prompts]
        outs = self.max_tokens
        return {"requests": len(lens), "prompt_tokens": sum(lens), "prompt_min": min(lens),
                "prompt_max": max(lens), "output_tokens": sum(outs), "output_min": min(outs),
                "output_max": max(outs)}  # fmt: skip


Run = tuple[list["Record"], float, dict[str, Any]]


@dataclass
class Record:
    submitted: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


def make_workload(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int = 0
) -> Workload:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(prompt_range[0], prompt_range[1] + 1, (n,), generator=g).tolist()
    outs = torch.randint(output_range[0], output_range[1] + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]
    return Workload(prompts, outs)


def summarise(records: list[Record], start: float) -> dict[str, Any]:
    end = max(r.token_times[-1] for r in records if r.token_times)
    tokens = sum(len(r.token_times) for r in records)
    ttft = [r.token_times[0] - r.submitted for r in records if r.token_times]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
            for r in records if len(r.token_times) > 1]  # fmt: skip
    out = {"wall_s": end - start, "output_tokens": tokens, "output_tok_s": tokens / (end - start)}
    for name, xs in (("ttft", ttft), ("tpot", tpot)):
        for q in (50, 99):
            out[f"{name}_p{q}_ms"] = 1e3 * percentile(xs, q)
    return out


# ----------------------------------------------------------------------------- engine mode
async def _engine_clients(engine: Any, w: Workload) -> tuple[list[Record], float]:
    async def one(i: int) -> Record:
        rec = Record(time.perf_counter())
        params = SamplingParams(max_tokens=w.max_tokens[i], temperature=0.0, ignore_eos=True)
        async for out in engine.generate(w.prompts[i], params, f"bench-{i}"):
            now = time.perf_counter()
            rec.token_times += [now] * len(out.token_ids)
            rec.token_ids += out.token_ids
        return rec

    return await _gather(one, len(w.prompts))


async def _gather(one: Callable[[int], Any], n: int) -> tuple[list[Record], float]:
    start = time.perf_counter()
    return list(await asyncio.gather(*(one(i) for i in range(n)))), start


@contextlib.contextmanager
def engine_session(
    model_dir: Path,
    n: int,
    shards: int,
    max_batched_tokens: int,
    num_cpus: float = 0.25,
    stream_interval: int | None = None,
) -> Iterator[Callable[[Workload], Run]]:
    """Yields run(workload): a fresh Engine (new cache) over one loaded model per call."""
    from workers.async_engine import AsyncEngine
    from workers.engine import Engine
    from workers.requests import EngineConfig
    from workers.runner import ModelRunner

    model = load_model(model_dir)
    cfg = EngineConfig(max_num_seqs=n, max_num_batched_tokens=max_batched_tokens,
                       max_model_len=4096, max_queue=max(256, n))  # fmt: skip

    def run(w: Workload) -> Run:
        runner = ModelRunner(model.lm, backend or model.experts, max_seqs=n, dtype=DTYPE)
        engine = AsyncEngine(Engine(runner, cfg), stream_interval or 1)
        threads = torch.get_num_threads()
        # like a dense replica: leave a core to the clients' event loop (workers.resources)
        torch.set_num_threads(max(1, threads - 1))
        try:
            records, start = asyncio.run(_engine_clients(engine, w))
            return records, start, engine.stats() | {"torch_threads": torch.get_num_threads()}
        finally:
            engine.shutdown()
            torch.set_num_threads(threads)

    with (
        expert_pool(model_dir, shards, num_cpus) if shards else contextlib.nullcontext() as backend
    ):
        yield run


# ------------------------------------------------------------------------------ serve mode
async def _http_clients(url: str, name: str, w: Workload) -> tuple[list[Record], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(w.prompts) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def one(i: int) -> Record:
            body = {"model": name, "prompt": w.prompts[i], "max_tokens": w.max_tokens[i],
                    "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "return_token_ids": True}  # fmt: skip
            rec = Record(time.perf_counter())
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()!r}")
                async for line in sse_lines(resp):
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    for choice in json.loads(line[6:]).get("choices", []):
                        ids = choice.get("token_ids") or []
                        rec.token_times += [now] * len(ids)
                        rec.token_ids += ids
            return rec

        return await _gather(one, len(w.prompts))


@contextlib.contextmanager
def serve_session(
    model_dir: Path,
    n: int,
    shards: int,
    max_batched_tokens: int,
    num_cpus: float = 0.25,
    *,
    build_app: Callable[[Any, str], Any],
    stream_interval: int | None = None,
) -> Iterator[Callable[[Workload], Run]]:
    """Starts Ray, the expert pool (shards > 0) and the Serve app (`build_app(config,
    model_dir)`, injected by deploy/); yields run(workload)."""
    import httpx
    import ray
    from ray import serve

    from cluster.config import load_config
    from cluster.launcher import ExpertPool, init_ray

    http = free_port()
    config = load_config({
        "model": str(model_dir), "experts": {"shards": shards, "num_cpus": num_cpus},
        "dense": {"num_cpus": DENSE_CPUS, "max_num_seqs": n, "max_queue": max(256, n),
                  "max_num_batched_tokens": max_batched_tokens,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
        | ({} if stream_interval is None else {"stream_interval": stream_interval}),
        "server": {"http_port": http, "grpc_port": free_port(), "model_name": "bench"},
    })  # fmt: skip
    url = f"http://127.0.0.1:{http}"

    def run(w: Workload) -> Run:
        records, start = asyncio.run(_http_clients(url, "bench", w))
        return records, start, {"url": url, "dense_num_cpus": DENSE_CPUS}

    init_ray(None, min_cpus=8)
    pool = None
    try:
        if shards:
            pool = ExpertPool.start(str(model_dir), config)
        serve.start(http_options={"host": "127.0.0.1", "port": http})
        serve.run(build_app(config, str(model_dir)), name="expertmesh-bench", blocking=False)
        deadline = time.time() + 300
        while httpx.get(f"{url}/health", timeout=30).status_code != 200:
            if time.time() > deadline:
                raise RuntimeError("the Serve app did not become healthy in 300 s")
            time.sleep(1.0)
        yield run
    finally:
        serve.shutdown()
        if pool is not None:
            pool.shutdown()
        ray.shutdown()


# ------------------------------------------------------------------------------ transformers
def hf_session(model_dir: Path, batch: int) -> Callable[[Workload], tuple[dict, list[list[int]]]]:
    """Loads transformers' model once; returns run(workload) -> (summary, output tokens)."""
    from transformers import Qwen3NextForCausalLM

    model = Qwen3NextForCausalLM.from_pretrained(model_dir, dtype=DTYPE).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: every request runs its length
    pad = model.config.pad_token_id or 0

    @torch.inference_mode()
    def generate(prompts: list[list[int]], new: int) -> torch.Tensor:
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             do_sample=False, pad_token_id=pad)  # fmt: skip
        return out[:, longest:]

    def run(w: Workload) -> tuple[dict[str, Any], list[list[int]]]:
        outputs: list[list[int]] = []
        generated = 0
        start = time.perf_counter()
        for i in range(0, len(w.prompts), batch):
            out = generate(w.prompts[i : i + batch], max(w.max_tokens[i : i + batch]))
            generated += out.numel()
            outputs += [row[:m].tolist() for row, m in zip(out, w.max_tokens[i : i + batch],
                                                           strict=True)]  # fmt: skip
        wall = time.perf_counter() - start
        useful = sum(w.max_tokens)
        impl = model.config._experts_implementation
        info = {"wall_s": wall, "output_tokens": useful, "output_tok_s": useful / wall,
                "generated_tokens": generated, "generated_tok_s": generated / wall,
                "batch": batch, "experts_implementation": impl}  # fmt: skip
        return info, outputs

    generate([[1] * 16], 4)  # warm-up
    return run


# ------------------------------------------------------------------------------------- run
def run(
    model_dir: str | Path | None = None,
    concurrency: int = 64,
    mode: str = "engine",
    shards: int = 0,
    prompt_range: tuple[int, int] = (16, 512),
    output_range: tuple[int, int] = (16, 128),
    hf: bool = True,
    hf_batch: int | None = None,
    max_batched_tokens: int = 512,
    repeats: int = 3,
    seed: int = 0,
    out_dir: str | Path = "bench-out",
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    serve_app_builder: Callable[[Any, str], Any] | None = None,
    stream_interval: int | None = None,
) -> dict[str, Any]:
    """`repeats` rounds, ours and transformers alternating first; medians of the rounds."""
    from workers.config import ModelConfig

    model_dir = resolve_model(model_dir)
    w = make_workload(concurrency, prompt_range, output_range,
                      ModelConfig.from_hf(model_dir).vocab_size, seed)  # fmt: skip
    load_start = os.getloadavg()[0]
    log(f"{mode} mode, {shards} expert shards; workload {w.describe()}")
    if mode == "serve":
        if serve_app_builder is None:
            raise ValueError("serve mode needs the Serve app builder (deploy.app.build_app)")
        session = functools.partial(serve_session, build_app=serve_app_builder,
                                    stream_interval=stream_interval)  # fmt: skip
    else:
        session = functools.partial(engine_session, stream_interval=stream_interval)
    ours_runs: list[dict[str, Any]] = []
    hf_runs: list[dict[str, Any]] = []
    agreement = []
    with session(model_dir, concurrency, shards, max_batched_tokens) as ours_fn:
        ours_fn(Workload([w.prompts[0][:16]], [4]))  # warm-up
        hf_fn = hf_session(model_dir, hf_batch or concurrency) if hf else None
        for r in range(repeats):
            for who in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):
                if who == "ours":
                    records, start, extra = ours_fn(w)
                    ours_runs.append(summarise(records, start) | {"details": extra})
                    log(f"round {r + 1}: ours {ours_runs[-1]['output_tok_s']:.1f} tok/s")
                elif hf_fn is not None:
                    info, tokens = hf_fn(w)
                    hf_runs.append(info)
                    log(f"round {r + 1}: transformers {info['output_tok_s']:.1f} tok/s")
            if hf_fn is not None:
                same = [a.token_ids[:16] == b[:16] for a, b in zip(records, tokens, strict=True)]
                agreement.append(sum(same) / len(same))
    ours = _median_run(ours_runs) | {"mode": mode, "shards": shards}
    ours["output_tok_s_runs"] = [x["output_tok_s"] for x in ours_runs]
    out: dict[str, Any] = {"benchmark": "e2e", "machine": machine_info(), "model": str(model_dir),
                           "loadavg_1m_start": round(load_start, 2), "workload": w.describe(),
                           "seed": seed, "repeats": repeats, "ours": ours}  # fmt: skip
    if hf_runs:
        theirs = _median_run(hf_runs)
        theirs["output_tok_s_runs"] = [x["output_tok_s"] for x in hf_runs]
        theirs["first16_greedy_agreement"] = min(agreement)
        out["transformers"] = theirs
        out["ratio_output_tok_s"] = ours["output_tok_s"] / theirs["output_tok_s"]
        out["ratio_per_round"] = [a["output_tok_s"] / b["output_tok_s"]
                                  for a, b in zip(ours_runs, hf_runs, strict=True)]  # fmt: skip
        log(f"median ratio ours / transformers: {out['ratio_output_tok_s']:.2f}x")
    out["machine"]["loadavg_1m"] = round(os.getloadavg()[0], 2)
    write_outputs(out, Path(out_dir))
    return out


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (the lower middle one for an even count)."""
    return dict(sorted(runs, key=lambda x: x["output_tok_s"])[(len(runs) - 1) // 2])


def write_outputs(out: dict[str, Any], out_dir: Path) -> None:
    o, wl = out["ours"], out["workload"]
    experts = f"{o['shards']} expert shards" if o["shards"] else "local experts"
    name = f"expertmesh ({o['mode']}, {experts})"
    cols = ("output_tok_s", "wall_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
    rows: list[list[Any]] = [[name, *(o[c] for c in cols)]]
    t = out.get("transformers")
    if t:
        label = f"transformers generate() (batch {t['batch']}, {t['experts_implementation']})"
        rows.append([label, t["output_tok_s"], t["wall_s"], *["n/a"] * 4])
    headers = ["system", "output tok/s", "wall s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
               "TPOT p99 ms"]  # fmt: skip
    table = markdown_table(headers, rows)
    notes = [
        f"- workload: {wl['requests']} concurrent requests, prompts {wl['prompt_min']}.."
        f"{wl['prompt_max']} tokens ({wl['prompt_tokens']} total), outputs "
        f"{wl['output_min']}..{wl['output_max']} ({wl['output_tokens']} total), seed "
        f"{out['seed']}, greedy, ignore_eos",
        f"- {out['repeats']} rounds"
        + (" (ours and transformers alternate going first)" if t else "")
        + "; each row is the round with the median throughput; ours per round: "
        + ", ".join(f"{x:.1f}" for x in o["output_tok_s_runs"])
        + " tok/s",
    ]
    if t:
        notes += [
            f"- throughput ratio ours / transformers (medians): "
            f"**{out['ratio_output_tok_s']:.2f}x**; per round: "
            + ", ".join(f"{x:.2f}x" for x in out["ratio_per_round"]),
            f"- transformers generated {t['generated_tokens']} tokens incl. padding to the "
            f"batch's longest request ({t['generated_tok_s']:.1f} tok/s counting those)",
            "- transformers per round: " + ", ".join(f"{x:.1f}" for x in t["output_tok_s_runs"]),
            f"- requests whose first 16 greedy tokens agree (worst round): "
            f"{100 * t['first16_greedy_agreement']:.0f}%",
        ]
    intro = (
        f"{machine_line(out['machine'])} Model `{out['model']}`. Load average at start "
        f"{out['loadavg_1m_start']}, end {out['machine']['loadavg_1m']}."
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "e2e.json", out)
    sections = [("Results", table), ("Notes", "\n".join(notes))]
    write_markdown(out_dir / "e2e.md", "End-to-end serving benchmark", sections, intro)
