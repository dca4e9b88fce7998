"""`expertmesh bench roofline`: how close a decode step gets to the memory-bandwidth bound.

For decode at batch B a step must read at least: every dense-path weight (attention / DeltaNet,
norms, routers, shared experts, LM head; the embedding only for its ~B rows) plus the UNIQUE
routed experts the batch touches (counted by running each layer's gate on captured hidden
states), plus each sequence's recurrent state and KV (reported separately). The bound is
bytes / bandwidth, with the bandwidth measured here (a large tensor sum) interleaved with the
decode steps, so both see the same background load. Measured: warm ModelRunner decode steps
(local experts, and with `shards` > 0 the same through N gRPC shards), medians over rounds.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cluster.bench import (
    DTYPE,
    ROUTER_COLUMNS,
    LoadedModel,
    add_metrics,
    capture_moe_inputs,
    expert_pool,
    load_model,
    machine_info,
    median,
    metric_delta,
    per_call,
    random_prompts,
    resolve_model,
    rotate,
    sample_rows,
)
from cluster.bench.report import machine_line, markdown_table, write_json, write_markdown
from workers.quant import ExpertPack
from workers.runner import ModelRunner

DEFAULT_BATCHES = (1, 8, 32, 64, 128)
PROMPT_LEN = 32
MB = 1e6


def read_bandwidth(buffer: torch.Tensor) -> float:
    """Bytes/s of one full read (sum) of `buffer`."""
    start = time.perf_counter()
    buffer.sum()
    return buffer.numel() * buffer.element_size() / (time.perf_counter() - start)


def weight_bytes(
    model: LoadedModel, pools: dict[int, torch.Tensor], batch: int, samples: int = 8, seed: int = 0
) -> dict[str, float]:
    """Bytes a decode step of `batch` sequences must read, by part, and unique experts/layer."""
    lm, cfg = model.lm, model.config
    emb, head = lm.model.embed_tokens.weight, lm.lm_head.weight
    dense = sum(
        p.numel() * p.element_size()
        for n, p in lm.named_parameters()
        if p is not emb and p is not head
    )
    row = emb.shape[1] * emb.element_size()
    head_bytes = head.numel() * head.element_size()
    emb_bytes = 0 if head is emb else min(batch, emb.shape[0]) * row
    w = model.experts.weights
    w13, w2 = next(iter(w.w13.values())), next(iter(w.w2.values()))
    per_expert = (
        (w13.nbytes + w2.nbytes) // len(w13)
        if isinstance(w13, ExpertPack)
        else ((w13[0].numel() + w2[0].numel()) * w13.element_size())
    )
    unique = []
    for s in range(samples):
        rows = sample_rows(pools[0], batch, seed + 1000 * s + batch)
        n = 0
        for layer, block in enumerate(lm.model.layers):
            ids, _ = block.mlp.gate(pools[layer][rows])
            n += torch.unique(ids).numel()
        unique.append(n / cfg.num_hidden_layers)
    mean_unique = sum(unique) / len(unique)
    experts = mean_unique * cfg.num_hidden_layers * per_expert
    total = dense + head_bytes + emb_bytes + experts
    return {
        "dense": dense,
        "lm_head": head_bytes,
        "embedding_rows": emb_bytes,
        "experts": experts,
        "unique_experts_per_layer": mean_unique,
        "total": total,
    }


def state_bytes(runner: ModelRunner, batch: int, context: int) -> float:
    """Recurrent state (read + write) and KV (read) of `batch` sequences at `context` tokens."""
    c, cache = runner.config, runner.cache
    item = torch.tensor([], dtype=DTYPE).element_size()
    per_seq = sum(
        2
        * (
            cache.conv[i][0].numel() * cache.conv[i].element_size()
            + cache.ssm[i][0].numel() * cache.ssm[i].element_size()
        )
        for i in cache.conv
    )
    per_seq += len(c.full_layers) * context * 2 * c.num_key_value_heads * c.head_dim * item
    return float(batch * per_seq)


class _Decoder:
    """B sequences prefilled with random prompts in one runner; `step()` is one greedy decode."""

    def __init__(self, model: LoadedModel, backend: Any, batch: int, seed: int) -> None:
        self.runner = ModelRunner(model.lm, backend, max_seqs=batch, dtype=DTYPE)
        prompts = random_prompts(batch, PROMPT_LEN, model.config.vocab_size, seed)
        self.slots = [self.runner.allocate() for _ in prompts]
        chunk = max(1, 512 // PROMPT_LEN)
        last = []
        for i in range(0, batch, chunk):
            pairs = list(zip(self.slots[i : i + chunk], prompts[i : i + chunk], strict=True))
            last.append(self.runner.step(pairs).argmax(-1))
        self.tokens = torch.cat(last).tolist()

    def step(self) -> float:
        start = time.perf_counter()
        logits = self.runner.step([(s, [t]) for s, t in zip(self.slots, self.tokens, strict=True)])
        seconds = time.perf_counter() - start
        self.tokens = logits.argmax(-1).tolist()
        return seconds


@torch.inference_mode()
def run(
    model_dir: str | Path | None = None,
    batches: Sequence[int] = DEFAULT_BATCHES,
    shards: int = 4,
    rounds: int = 20,
    bandwidth_mb: int = 1024,
    seed: int = 0,
    out_dir: str | Path = "bench-out",
    num_cpus: float = 0.25,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> dict[str, Any]:
    model_dir = resolve_model(model_dir)
    model = load_model(model_dir)
    load_start = os.getloadavg()[0]
    log("capturing MoE inputs to count the experts each batch touches ...")
    pools = capture_moe_inputs(model, max(max(batches), 256), seed)
    nbytes = {b: weight_bytes(model, pools, b, seed=seed) for b in batches}
    del pools
    buffer = torch.ones(int(bandwidth_mb * MB) // 4)
    decoders = {("local", b): _Decoder(model, model.experts, b, seed) for b in batches}
    bw: list[float] = []
    times: dict[tuple[str, int], list[float]] = {k: [] for k in decoders}
    router: dict[int, dict[str, float]] = {b: {} for b in batches}
    with expert_pool(model_dir, shards, num_cpus) if shards else contextlib.nullcontext() as remote:
        if remote is not None:
            for b in batches:
                decoders[("dist", b)] = _Decoder(model, remote, b, seed)
                times[("dist", b)] = []
        keys = list(decoders)
        for k in keys:  # warm-up
            decoders[k].step()
        for r in range(rounds):
            if r % 5 == 0:
                log(f"round {r + 1}/{rounds}")
            bw.append(read_bandwidth(buffer))
            for k in rotate(keys, r):
                before = remote.metrics() if k[0] == "dist" else None
                times[k].append(decoders[k].step())
                if before is not None:
                    add_metrics(router[k[1]], metric_delta(before, remote.metrics()))
            bw.append(read_bandwidth(buffer))
    bandwidth = median(bw)
    context = PROMPT_LEN + rounds // 2
    rows = []
    for b in batches:
        local_s = median(times[("local", b)])
        state = state_bytes(decoders[("local", b)].runner, b, context)
        w = nbytes[b]
        row = {
            "batch": b,
            "bytes": w,
            "state_bytes": state,
            "bound_ms": 1e3 * w["total"] / bandwidth,
            "bound_with_state_ms": 1e3 * (w["total"] + state) / bandwidth,
            "local_ms": 1e3 * local_s,
            "local_tokens_per_s": b / local_s,
            "fraction_of_roofline": w["total"] / bandwidth / local_s,
        }
        if ("dist", b) in times:
            dist_s = median(times[("dist", b)])
            row |= {
                "dist_ms": 1e3 * dist_s,
                "dist_tokens_per_s": b / dist_s,
                "dist_over_local": local_s / dist_s,
                "router": per_call(router[b]),
            }
        rows.append(row)
    out = {
        "benchmark": "roofline",
        "machine": machine_info(),
        "loadavg_1m_start": round(load_start, 2),
        "model": str(model_dir),
        "bandwidth_GBps": bandwidth / 1e9,
        "bandwidth_samples_GBps": [x / 1e9 for x in bw],
        "bandwidth_buffer_MB": bandwidth_mb,
        "rounds": rounds,
        "shards": shards,
        "context_tokens": context,
        "results": rows,
    }
    write_outputs(out, Path(out_dir))
    return out


def write_outputs(out: dict[str, Any], out_dir: Path) -> None:
    rows = out["results"]
    dist = "dist_ms" in rows[0]
    headers = [
        "batch",
        "unique experts/layer",
        "weights MB",
        "state MB",
        "bound ms",
        "bound+state ms",
        "measured ms",
        "roofline fraction",
        "tokens/s",
    ]
    if dist:
        headers += [f"dist ms ({out['shards']} shards)", "dist tokens/s", "dist/local"]
    body = []
    for r in rows:
        line = [
            r["batch"],
            r["bytes"]["unique_experts_per_layer"],
            r["bytes"]["total"] / MB,
            r["state_bytes"] / MB,
            r["bound_ms"],
            r["bound_with_state_ms"],
            r["local_ms"],
            r["fraction_of_roofline"],
            r["local_tokens_per_s"],
        ]
        if dist:
            line += [r["dist_ms"], r["dist_tokens_per_s"], r["dist_over_local"]]
        body.append(line)
    parts = [("Decode step vs bandwidth bound", markdown_table(headers, body))]
    split = markdown_table(
        ["batch", "dense MB", "LM head MB", "embedding rows MB", "experts MB"],
        [
            [
                r["batch"],
                r["bytes"]["dense"] / MB,
                r["bytes"]["lm_head"] / MB,
                r["bytes"]["embedding_rows"] / MB,
                r["bytes"]["experts"] / MB,
            ]
            for r in rows
        ],
    )
    parts.append(("Bytes a step must read", split))
    if dist:
        cols = ROUTER_COLUMNS
        parts.append(
            (
                "Router metrics (per layer submit, distributed decode)",
                markdown_table(
                    ["batch", *cols], [[r["batch"], *(r["router"][c] for c in cols)] for r in rows]
                ),
            )
        )
    intro = (
        f"{machine_line(out['machine'])} Model `{out['model']}`. Measured read bandwidth "
        f"{out['bandwidth_GBps']:.1f} GB/s (median sum over a {out['bandwidth_buffer_MB']} MB "
        f"tensor, interleaved with the steps). Decode medians of {out['rounds']} rounds at "
        f"~{out['context_tokens']} tokens of context; roofline fraction = bound / measured. "
        f"Load average at start {out['loadavg_1m_start']}, end "
        f"{out['machine']['loadavg_1m']}."
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "roofline.json", out)
    write_markdown(out_dir / "roofline.md", "Decode roofline", parts, intro)
