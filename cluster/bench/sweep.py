"""`expertmesh bench e2e --concurrency 1,4,16,64 --peers llama.cpp,vllm`: side by side over HTTP.

Every contender serves the same checkpoint and gets the same workloads: at concurrency C, C
requests arrive at once (prompts and output lengths drawn from the seeded ranges, token-id
prompts, greedy, ignore_eos, streamed). Contenders: ours (the Ray Serve app with local experts
or `--shards N` expert shards, or the in-process engine with `--mode engine`) and the opt-in
peers (cluster/bench/peers.py: llama.cpp f32 GGUF via llama-server, vLLM CPU in bf16), all
started once and kept up. Rounds interleave them (a different one goes first each round, at
every concurrency); figures are medians over rounds with the min..max spread. Greedy
agreement: the share of requests whose first 16 tokens equal ours (same round).
Writes e2e.json, e2e.md and e2e.png (tokens/s and TPOT p50 against concurrency).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cluster.bench import machine_info, rotate, settle, sse_lines
from cluster.bench.e2e import (
    Record,
    Run,
    Workload,
    engine_session,
    make_workload,
    serve_session,
    summarise,
)
from cluster.bench.report import machine_line, markdown_table, write_json, write_markdown
from cluster.config import DenseConfig

AGREE_TOKENS = 16
CTX_PER_REQUEST = 1024  # llama.cpp slot size / vLLM max-model-len (>= prompt + output)


async def _peer_clients(url: str, peer: str, w: Workload) -> tuple[list[Record], float]:
    import httpx

    from cluster.bench import peers

    limits = httpx.Limits(max_connections=len(w.prompts) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def one(i: int) -> Record:
            path, body = peers.request_body(peer, w.prompts[i], w.max_tokens[i])
            rec = Record(time.perf_counter())
            async with client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"{peer}: HTTP {resp.status_code}: {await resp.aread()!r}")
                async for line in sse_lines(resp):
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    new, ids = peers.chunk_tokens(peer, chunk, len(rec.token_times))
                    now = time.perf_counter()
                    rec.token_times += [now] * new
                    rec.token_ids += ids
            return rec

        start = time.perf_counter()
        return list(await asyncio.gather(*(one(i) for i in range(len(w.prompts))))), start


async def _peer_tokens(url: str, peer: str, w: Workload) -> list[list[int]]:
    """Every request's full output ids, not streamed (the agreement check for llama.cpp,
    whose stream omits some ids), all requests at once like the timed runs."""
    import httpx

    from cluster.bench import peers

    limits = httpx.Limits(max_connections=len(w.prompts) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def one(i: int) -> list[int]:
            path, body = peers.request_body(peer, w.prompts[i], w.max_tokens[i], stream=False)
            resp = await client.post(path, json=body)
            if resp.status_code != 200:
                raise RuntimeError(f"{peer}: HTTP {resp.status_code}: {resp.text[:200]!r}")
            return peers.response_tokens(peer, resp.json())

        return list(await asyncio.gather(*(one(i) for i in range(len(w.prompts)))))


@contextlib.contextmanager
def peer_session(
    peer: str, model_dir: Path, n: int, log, threads: int | None = None
) -> Iterator[Callable[[Workload], Run]]:
    """Yields run(workload). llama-server runs with as many slots as the workload has
    requests (`--parallel C`, C x CTX_PER_REQUEST of context, as a user sizes it: its decode
    attends over the whole context it was given), restarted when C changes (outside the
    timed part); vLLM schedules up to `n` sequences itself and stays up."""
    from cluster.bench import peers

    if peer not in peers.PEERS:
        raise ValueError(f"--peers: expected some of {list(peers.PEERS)}, got {peer!r}")
    with contextlib.ExitStack() as stack:
        state: dict[str, Any] = {}

        def server(c: int) -> str:
            if peer == "vllm":
                c = n
            if state.get("c") != c:
                if "stack" in state:
                    state["stack"].close()
                inner = contextlib.ExitStack()
                stack.callback(inner.close)
                if peer == "llama.cpp":
                    t = threads or os.cpu_count() or 1
                    cm = peers.llama_session(model_dir, c, CTX_PER_REQUEST, t, log)
                else:
                    cm = peers.vllm_session(model_dir, c, CTX_PER_REQUEST, log=log)
                state.update(c=c, stack=inner, url=inner.enter_context(cm))
                asyncio.run(_peer_clients(state["url"], peer, Workload([[1] * 8], [2])))  # warm
            return state["url"]

        def run(w: Workload) -> Run:
            url = server(len(w.prompts))
            records, start = asyncio.run(_peer_clients(url, peer, w))
            if peer == "llama.cpp":  # its stream omits some ids: take them unstreamed
                for rec, ids in zip(records, asyncio.run(_peer_tokens(url, peer, w)), strict=True):
                    rec.token_ids = ids
            return records, start, {"url": url}

        server(n)
        yield run


def run(
    model_dir: Path,
    concurrencies: Sequence[int],
    peers: Sequence[str] = (),
    mode: str = "serve",
    shards: int = 0,
    prompt_range: tuple[int, int] = (16, 512),
    output_range: tuple[int, int] = (16, 128),
    max_batched_tokens: int = 512,
    repeats: int = 3,
    seed: int = 0,
    out_dir: str | Path = "bench-out",
    log: Callable[[str], None] = print,
    serve_app_builder: Callable[[Any, str], Any] | None = None,
    ours: bool = True,
    peer_threads: int | None = None,
    stream_interval: int | None = None,
) -> dict[str, Any]:
    from workers.config import ModelConfig

    vocab = ModelConfig.from_hf(model_dir).vocab_size
    if max(prompt_range) + max(output_range) > CTX_PER_REQUEST:
        raise ValueError(f"prompt + output must fit {CTX_PER_REQUEST} tokens per request")
    loads = [os.getloadavg()[0]]
    workloads = {
        c: make_workload(c, prompt_range, output_range, vocab, seed) for c in concurrencies
    }
    n = max(concurrencies)
    name = f"expertmesh ({mode}, {f'{shards} expert shards' if shards else 'local experts'})"
    results: dict[str, dict[int, list[dict[str, Any]]]] = {}
    tokens: dict[str, dict[int, list[list[list[int]]]]] = {}
    with contextlib.ExitStack() as stack:
        sessions: dict[str, Callable[[Workload], Run]] = {}
        if ours:
            if mode == "serve":
                if serve_app_builder is None:
                    raise ValueError("serve mode needs the Serve app builder (deploy.app)")
                session = functools.partial(serve_session, build_app=serve_app_builder,
                                            stream_interval=stream_interval)  # fmt: skip
            else:
                session = functools.partial(engine_session, stream_interval=stream_interval)
            sessions[name] = stack.enter_context(session(model_dir, n, shards, max_batched_tokens))
        for peer in peers:
            label = {"llama.cpp": "llama.cpp b11434 (f32 GGUF)", "vllm": "vLLM CPU 0.32 (bf16)"}
            log(f"starting {peer} ...")
            session = peer_session(peer, model_dir, n, log, peer_threads)
            sessions[label[peer]] = stack.enter_context(session)
        warm = Workload([workloads[n].prompts[0][:16]], [4])
        for fn in sessions.values():
            fn(warm)
        names = list(sessions)
        for r in range(repeats):
            for i, c in enumerate(concurrencies):
                for who in rotate(names, r + i):
                    waited = settle()  # the previous contender may still be busy after its end
                    if waited >= 0.5:
                        log(f"waited {waited:.1f} s for idle CPUs before {who} C={c}")
                    records, start, _ = sessions[who](workloads[c])
                    s = summarise(records, start)
                    results.setdefault(who, {}).setdefault(c, []).append(s)
                    tokens.setdefault(who, {}).setdefault(c, []).append(
                        [rec.token_ids for rec in records]
                    )
                    log(f"round {r + 1} C={c}: {who} {s['output_tok_s']:.1f} tok/s, "
                        f"TPOT p50 {s['tpot_p50_ms']:.1f} ms")  # fmt: skip
                loads.append(os.getloadavg()[0])
    out = {
        "benchmark": "e2e-sweep",
        "machine": machine_info(),
        "model": str(model_dir),
        "mode": mode,
        "shards": shards,
        "stream_interval": stream_interval,
        "concurrency": list(concurrencies),
        "repeats": repeats,
        "seed": seed,
        "prompt_range": list(prompt_range),
        "output_range": list(output_range),
        "loadavg_1m": [round(x, 2) for x in loads],
        "llama_threads": peer_threads or os.cpu_count(),
        "workloads": {c: w.describe() for c, w in workloads.items()},
        "contenders": _aggregate(results, tokens, name if ours else None),
    }
    write_outputs(out, Path(out_dir))
    return out


def _aggregate(results, tokens, ref: str | None) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for who, by_c in results.items():
        out[who] = {}
        for c, runs in by_c.items():
            row: dict[str, Any] = {}
            for key in ("output_tok_s", "tpot_p50_ms", "tpot_p99_ms", "ttft_p50_ms", "wall_s"):
                xs = [x[key] for x in runs]
                row[key] = statistics.median(xs)
                row[f"{key}_min"], row[f"{key}_max"] = min(xs), max(xs)
            row["output_tok_s_runs"] = [x["output_tok_s"] for x in runs]
            row["output_tokens"] = runs[0]["output_tokens"]
            if ref is not None and who != ref:
                agree = []
                for mine, theirs in zip(tokens[ref][c], tokens[who][c], strict=True):
                    pairs = zip(mine, theirs, strict=True)
                    same = [a[:AGREE_TOKENS] == b[:AGREE_TOKENS] for a, b in pairs]
                    agree.append(sum(same) / len(same))
                row["greedy_agreement_first16"] = min(agree)
            out[who][c] = row
    return out


def write_outputs(out: dict[str, Any], out_dir: Path) -> None:
    cs = out["concurrency"]
    contenders = out["contenders"]
    names = list(contenders)
    ref = names[0]
    headers = ["contender", "C", "output tok/s (min..max)", "TPOT p50 ms (min..max)",
               "TTFT p50 ms", "tok/s vs first row", "greedy agree (first 16)"]  # fmt: skip
    rows = []
    for c in cs:
        base = contenders[ref].get(c, {}).get("output_tok_s")
        for who in names:
            r = contenders[who].get(c)
            if r is None:
                continue
            rows.append([
                who, c, _spread(r, "output_tok_s"), _spread(r, "tpot_p50_ms"),
                r["ttft_p50_ms"],
                r["output_tok_s"] / base if base else float("nan"),
                f"{100 * r['greedy_agreement_first16']:.0f}%" if "greedy_agreement_first16" in r
                else "(reference)",
            ])  # fmt: skip
    ratios = []
    for who in names[1:]:
        tps = {c: (contenders[ref][c]["output_tok_s"], contenders[who][c]["output_tok_s"])
               for c in cs if c in contenders[who] and c in contenders[ref]}  # fmt: skip
        per = [f"C={c}: {a / b:.2f}x" for c, (a, b) in tps.items()]
        ratios.append(f"- {ref} / {who} (tokens/s, medians): " + ", ".join(per))
    wl = out["workloads"][max(cs)]
    notes = [
        f"- workloads: at concurrency C, C requests at once; prompts {out['prompt_range'][0]}.."
        f"{out['prompt_range'][1]} tokens, outputs {out['output_range'][0]}.."
        f"{out['output_range'][1]} (C={max(cs)}: {wl['prompt_tokens']} prompt, "
        f"{wl['output_tokens']} output tokens), seed {out['seed']}, token-id prompts, greedy, "
        "ignore_eos, streamed over HTTP",
        f"- llama-server threads (-t): {out.get('llama_threads')}; vLLM CPU: its default "
        "OpenMP threads; ours: the dense replica's CPUs for steps of >= 16 tokens, one core "
        "fewer for smaller steps (dense.torch_threads / wide_step_threads / wide_step_tokens); "
        f"ours stream {out.get('stream_interval') or DenseConfig.stream_interval} tokens per "
        "delta after the first (dense.stream_interval; the peers one per token)",
        f"- {out['repeats']} interleaved rounds (a different contender first each round; each "
        "run starts once the CPUs are idle again); medians with min..max over rounds",
        *ratios,
        f"- 1-minute load average during the run: {out['loadavg_1m']}",
    ]
    intro = f"{machine_line(out['machine'])} Model `{out['model']}`."
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "e2e.json", out)
    png = plot(out, out_dir / "e2e.png")
    sections = [("Results", markdown_table(headers, rows)), ("Notes", "\n".join(notes))]
    if png:
        sections.append(("Plot", f"![tokens/s and TPOT vs concurrency]({png.name})"))
    write_markdown(out_dir / "e2e.md", "End-to-end serving: side by side", sections, intro)


def _spread(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:.1f} ({r[f'{key}_min']:.1f}..{r[f'{key}_max']:.1f})"


def plot(out: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for who, by_c in out["contenders"].items():
        cs = sorted(by_c)
        for ax, key in zip(axes, ("output_tok_s", "tpot_p50_ms"), strict=True):
            med = [by_c[c][key] for c in cs]
            lo = [by_c[c][key] - by_c[c][f"{key}_min"] for c in cs]
            hi = [by_c[c][f"{key}_max"] - by_c[c][key] for c in cs]
            ax.errorbar(cs, med, yerr=[lo, hi], marker="o", markersize=3, capsize=3, label=who)
    for ax, label in zip(axes, ("output tokens/s", "TPOT p50 (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{out['machine']['cpu']}, {out['machine']['cores']} cores: medians, min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
