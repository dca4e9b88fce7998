"""`expertmesh bench agent`: a multi-turn coding-agent trace, with and without prefix caching.

The trace (seeded, token ids): S sessions of one agent share a system prompt with its tool
schemas; each session opens with a user message, then every turn sends the whole growing
conversation, gets `--output-tokens` greedy tokens (the assistant's tool call), and appends a
tool result of random length. Turns are released in rounds: turn t of every session at once
(S concurrent requests), so sessions interleave as an agent fleet's would.

Contenders follow the same trace, each on its own conversation (it only differs if their
outputs do): ours with prefix caching, ours without (same engine settings otherwise), and
opt-in vLLM's CPU build over HTTP (`--peers vllm`; needs a bf16-compatible checkpoint with
linear head dims 64/128, e.g. `make-checkpoint --preset peers`). Rounds interleave the
contenders (a different one goes first every turn). Reported: TTFT per turn (median over
sessions), total time, our prefix-cache hit rate, and whether the outputs are identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cluster.bench import (
    DTYPE,
    LoadedModel,
    load_model,
    machine_info,
    median,
    resolve_model,
    sse_lines,
)
from cluster.bench.report import machine_line, markdown_table, write_json, write_markdown
from workers.cache_config import CacheConfig
from workers.engine import Engine
from workers.requests import EngineConfig
from workers.runner import ModelRunner
from workers.sampler import SamplingParams


@dataclass(frozen=True)
class Trace:
    system: list[int]  # system prompt + tool schemas, shared by every session
    openers: list[list[int]]  # each session's first user message
    tool_results: list[list[list[int]]]  # [session][turn] appended after each turn
    output_tokens: int

    @property
    def turns(self) -> int:
        return len(self.tool_results[0])


def make_trace(vocab: int, sessions: int, turns: int, system_tokens: int,
               tool_tokens: tuple[int, int], output_tokens: int, seed: int) -> Trace:  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    lo, hi = tool_tokens
    results = [[ids(int(torch.randint(lo, hi + 1, (1,), generator=g))) for _ in range(turns)]
               for _ in range(sessions)]  # fmt: skip
    return Trace(ids(system_tokens), [ids(100) for _ in range(sessions)], results, output_tokens)


@dataclass
class Contender:
    name: str
    conversations: list[list[int]]
    ttft: list[list[float]] = field(default_factory=list)  # [turn][session]
    outputs: list[list[list[int]]] = field(default_factory=list)  # [turn][session]
    seconds: float = 0.0

    def run_round(self, max_tokens: int) -> list[tuple[float, list[int]]]:
        raise NotImplementedError

    def turn(self, trace: Trace, t: int) -> None:
        start = time.perf_counter()
        results = self.run_round(trace.output_tokens)
        self.seconds += time.perf_counter() - start
        self.ttft.append([r[0] for r in results])
        self.outputs.append([r[1] for r in results])
        for s, (_, out) in enumerate(results):
            self.conversations[s] += out + trace.tool_results[s][t]


class Ours(Contender):
    def __init__(self, name: str, model: LoadedModel, trace: Trace, prefix: bool) -> None:
        super().__init__(name, [trace.system + o for o in trace.openers])
        sessions = len(trace.openers)
        longest = len(trace.system) + 100 + trace.turns * (trace.output_tokens + max(
            len(r) for rs in trace.tool_results for r in rs)) + 64  # fmt: skip
        config = EngineConfig(max_num_seqs=sessions, max_model_len=longest)
        cache = CacheConfig(prefix_caching=prefix)
        runner = ModelRunner(model.lm, model.experts, sessions, DTYPE, cache_config=cache,
                             max_model_len=longest)  # fmt: skip
        self.engine = Engine(runner, config)

    def run_round(self, max_tokens: int) -> list[tuple[float, list[int]]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        ids = [f"s{s}" for s in range(len(self.conversations))]
        for rid, conv in zip(ids, self.conversations, strict=True):
            self.engine.add_request(rid, list(conv), params)
        first: dict[str, float] = {}
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.engine.has_work():
            for out in self.engine.step():
                if out.token_ids and out.request_id not in first:
                    first[out.request_id] = time.perf_counter() - start
                tokens[out.request_id] += out.token_ids
        return [(first[rid], tokens[rid]) for rid in ids]

    def hit_rate(self) -> float:
        stats = self.engine.cache_stats()
        queried = stats.get("prefix_cache_queried_tokens", 0)
        return stats.get("prefix_cache_hit_tokens", 0) / queried if queried else 0.0


class Peer(Contender):
    """A peer's OpenAI server (streamed token-id completions, greedy, ignore_eos)."""

    def __init__(self, name: str, url: str, trace: Trace) -> None:
        super().__init__(name, [trace.system + o for o in trace.openers])
        self.url = url

    def run_round(self, max_tokens: int) -> list[tuple[float, list[int]]]:
        return asyncio.run(self._round(max_tokens))

    async def _round(self, max_tokens: int) -> list[tuple[float, list[int]]]:
        import httpx

        from cluster.bench import peers

        async with httpx.AsyncClient(base_url=self.url, timeout=None) as client:

            async def one(conv: list[int], start: float) -> tuple[float, list[int]]:
                path, body = peers.request_body("vllm", list(conv), max_tokens)
                first, out = None, []
                async with client.stream("POST", path, json=body) as resp:
                    if resp.status_code != 200:
                        raise RuntimeError(f"{self.name}: HTTP {resp.status_code}")
                    async for line in sse_lines(resp):
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        _, ids = peers.chunk_tokens("vllm", json.loads(line[6:]), len(out))
                        if ids and first is None:
                            first = time.perf_counter() - start
                        out += ids
                return first if first is not None else float("nan"), out

            start = time.perf_counter()
            return list(await asyncio.gather(*(one(c, start) for c in self.conversations)))


def run(model_dir: str | Path | None = None, sessions: int = 4, turns: int = 8,
        system_tokens: int = 1500, tool_tokens: tuple[int, int] = (100, 600),
        output_tokens: int = 32, peers: Sequence[str] = (), seed: int = 0,
        out_dir: str | Path = "bench-out") -> dict[str, Any]:  # fmt: skip
    path = resolve_model(model_dir)
    model = load_model(path)
    trace = make_trace(model.config.vocab_size, sessions, turns, system_tokens, tool_tokens,
                       output_tokens, seed)  # fmt: skip
    contenders: list[Contender] = [
        Ours("expertmesh, prefix cache", model, trace, True),
        Ours("expertmesh, no prefix cache", model, trace, False),
    ]
    longest = contenders[0].engine.config.max_model_len
    with _peer_servers(peers, path, sessions, longest) as urls:
        contenders += [Peer(name, url, trace) for name, url in urls.items()]
        for t in range(trace.turns):  # a different contender goes first every turn
            order = contenders[t % len(contenders) :] + contenders[: t % len(contenders)]
            for c in order:
                c.turn(trace, t)
    result = _summary(contenders, trace, machine_info(), str(path))
    write_json(Path(out_dir, "agent.json"), result)
    write_markdown(Path(out_dir, "agent.md"), "Agent trace: prefix caching", _sections(result),
                   intro=machine_line(result["machine"]))  # fmt: skip
    return result


@contextlib.contextmanager
def _peer_servers(names: Sequence[str], path: Path, sessions: int,
                  max_model_len: int) -> Iterator[dict[str, str]]:  # fmt: skip
    from cluster.bench import peers

    with contextlib.ExitStack() as stack:
        urls = {}
        for name in names:
            if name != "vllm":
                raise ValueError(f"--peers: the agent trace supports vllm, got {name!r}")
            cm = peers.vllm_session(path, sessions, max_model_len)
            urls["vLLM CPU (bf16)"] = stack.enter_context(cm)
        yield urls


def _summary(contenders: list[Contender], trace: Trace, machine: dict, model: str) -> dict:
    ours, base = contenders[0], contenders[1]
    rows = []
    for c in contenders:
        rows.append({
            "contender": c.name,
            "ttft_ms_per_turn": [1e3 * median(t) for t in c.ttft],
            "total_s": c.seconds,
            "outputs_equal_ours": c.outputs == ours.outputs,
            "hit_rate": c.hit_rate() if isinstance(c, Ours) else None,
        })  # fmt: skip
    late = slice(trace.turns // 2, None)
    pairs = zip(base.ttft[late], ours.ttft[late], strict=True)
    late_ratio = median([median(b) / median(o) for b, o in pairs])
    return {
        "machine": machine, "model": model,
        "trace": {"sessions": len(trace.openers), "turns": trace.turns,
                  "system_tokens": len(trace.system), "output_tokens": trace.output_tokens,
                  "last_prompt_tokens": max(len(c) for c in ours.conversations)},
        "contenders": rows,
        "late_turn_ttft_speedup": late_ratio,
    }  # fmt: skip


def _sections(r: dict[str, Any]) -> list[tuple[str, str]]:
    turns = r["trace"]["turns"]
    ttft = markdown_table(["contender", *[f"turn {t}" for t in range(turns)]], [
        [c["contender"], *c["ttft_ms_per_turn"]] for c in r["contenders"]])  # fmt: skip
    total = markdown_table(["contender", "total s", "hit rate", "outputs equal ours"], [
        [c["contender"], c["total_s"], "n/a" if c["hit_rate"] is None else c["hit_rate"],
         c["outputs_equal_ours"]] for c in r["contenders"]])  # fmt: skip
    t = r["trace"]
    head = (
        f"{t['sessions']} sessions x {turns} turns, system prompt {t['system_tokens']} "
        f"tokens, {t['output_tokens']} output tokens per turn, last prompt "
        f"{t['last_prompt_tokens']} tokens. Late turns (second half): TTFT without / with "
        f"the prefix cache = **{r['late_turn_ttft_speedup']:.1f}x** (median over turns)."
    )
    return [("Trace", head), ("TTFT per turn, ms (median over sessions)", ttft),
            ("Totals", total)]  # fmt: skip
