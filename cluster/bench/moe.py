"""`expertmesh bench moe`: one MoE layer at token batches 1..512, every contender in one run.

Contenders (same weights, same inputs: the layer's real MoE inputs captured while the model
prefills random prompts, routed by the layer's own gate):
  local routed / local block   LocalExpertBackend.submit, and the whole SparseMoE forward
  dist routed / dist block     the same through RemoteExpertBackend -> N gRPC shards (Ray)
  hf eager / hf grouped_mm     transformers' Qwen3NextSparseMoeBlock with the layer's weights,
                               with its eager per-expert loop and with its grouped_mm kernel
                               (the default `from_pretrained` picks on torch >= 2.9)
Phase 1 times ours against transformers with no Ray running; phase 2 times local against
distributed with the pool up (both under the same background load). Rounds interleave the
contenders (rotated order); each figure is the median of all per-call samples of all rounds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cluster.bench import (
    ROUTER_COLUMNS,
    add_metrics,
    capture_moe_inputs,
    expert_pool,
    load_model,
    machine_info,
    median,
    metric_delta,
    per_call,
    resolve_model,
    rotate,
    sample_rows,
    time_call,
)
from cluster.bench.report import (
    machine_line,
    markdown_table,
    plot_lines,
    write_json,
    write_markdown,
)
from workers.moe import SparseMoE
from workers.quant import ExpertPack

DEFAULT_BATCHES = tuple(2**i for i in range(10))  # 1 .. 512
ATOL = 1e-4


def build_hf_block(
    model_dir: Path, moe: SparseMoE, w13: torch.Tensor, w2: torch.Tensor, implementation: str
) -> torch.nn.Module:
    """transformers' Qwen3NextSparseMoeBlock holding `moe`'s weights (tensors shared)."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    config = Qwen3NextConfig.from_pretrained(model_dir, experts_implementation=implementation)
    config._experts_implementation = implementation
    with torch.device("meta"):
        block = Qwen3NextSparseMoeBlock(config)
    s = moe.shared_expert
    state = {
        "gate.weight": moe.gate.weight,
        "experts.gate_up_proj": w13,  # [E, 2I, H], gate rows first like ours
        "experts.down_proj": w2,  # [E, H, I]
        "shared_expert.gate_proj.weight": s.gate_proj.weight,
        "shared_expert.up_proj.weight": s.up_proj.weight,
        "shared_expert.down_proj.weight": s.down_proj.weight,
        "shared_expert_gate.weight": moe.shared_expert_gate.weight,
    }
    block.load_state_dict(state, strict=True, assign=True)
    return block.eval().requires_grad_(False)


@torch.inference_mode()
def run(
    model_dir: str | Path | None = None,
    batches: Sequence[int] = DEFAULT_BATCHES,
    shards: int = 4,
    repeats: int = 5,
    layer: int | None = None,
    seed: int = 0,
    out_dir: str | Path = "bench-out",
    min_time_s: float = 0.05,
    num_cpus: float = 0.25,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> dict[str, Any]:
    model_dir = resolve_model(model_dir)
    model = load_model(model_dir)
    cfg = model.config
    layer = cfg.num_hidden_layers // 2 if layer is None else layer
    moe: SparseMoE = model.lm.model.layers[layer].mlp
    local = model.experts
    weights = local.weights
    log(f"capturing MoE inputs of layer {layer} ({max(batches)} tokens) ...")
    pool = capture_moe_inputs(model, max(batches), seed)[layer]
    inputs = {}
    for b in batches:
        x = pool[sample_rows(pool, b, seed + b)].contiguous()
        ids, w = moe.gate(x)
        inputs[b] = (x, x.unsqueeze(0), ids, w)
    hf = {
        impl: build_hf_block(
            model_dir, moe, _dense(weights.w13[layer]), _dense(weights.w2[layer]), impl
        )  # fmt: skip
        for impl in ("eager", "grouped_mm")
    }
    verification = _verify(inputs, moe, local, hf)
    log(f"transformers block == ours: max |diff| {verification}")

    load_start = os.getloadavg()[0]
    local_routed = lambda b: local.submit(layer, inputs[b][0], *inputs[b][2:]).result()  # noqa: E731
    local_block = lambda b: moe(inputs[b][0], local)  # noqa: E731
    contenders: dict[str, Callable[[int], Any]] = {
        "local routed": local_routed,
        "local block": local_block,
        "hf eager": lambda b: hf["eager"](inputs[b][1]),
        "hf grouped_mm": lambda b: hf["grouped_mm"](inputs[b][1]),
    }
    log("phase 1: ours vs transformers (no Ray running)")
    times, router = _measure(contenders, batches, repeats, min_time_s, None, log)
    if shards:
        log(f"phase 2: local vs {shards} gRPC shards (Ray running)")
        with expert_pool(model_dir, shards, num_cpus) as remote:
            big = inputs[max(batches)][0]
            diff = moe(big, remote) - moe(big, local)
            verification["dist block vs local block"] = float(diff.abs().max())
            dist = {
                "local routed [pool up]": local_routed,
                "local block [pool up]": local_block,
                "dist routed": lambda b: remote.submit(
                    layer, inputs[b][0], *inputs[b][2:]
                ).result(),
                "dist block": lambda b: moe(inputs[b][0], remote),
            }
            t2, r2 = _measure(dist, batches, repeats, min_time_s, remote, log)
        times.update(t2)
        router.update(r2)
    result = _summarise(times, router, batches)
    out = {
        "benchmark": "moe",
        "machine": machine_info(),
        "loadavg_1m_start": round(load_start, 2),
        "model": str(model_dir),
        "layer": layer,
        "shape": {
            "hidden": cfg.hidden_size,
            "experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_tok,
            "moe_intermediate": cfg.moe_intermediate_size,
            "shared_intermediate": cfg.shared_expert_intermediate_size,
        },
        "shards": shards,
        "repeats": repeats,
        "verification_max_abs_diff": verification,
        "results": result,
    }
    write_outputs(out, Path(out_dir))
    return out


def _dense(w: torch.Tensor | ExpertPack) -> torch.Tensor:
    return w.dequantize() if isinstance(w, ExpertPack) else w


def _verify(inputs, moe, local, hf) -> dict[str, float]:
    diffs = {}
    for impl, block in hf.items():
        worst = 0.0
        for b in (min(inputs), max(inputs)):
            ours = moe(inputs[b][0], local)
            theirs = block(inputs[b][1])[0]
            worst = max(worst, float((ours - theirs).abs().max()))
        if worst > ATOL:
            raise RuntimeError(f"transformers block ({impl}) differs from ours by {worst:.3g}")
        diffs[f"hf {impl} vs local block"] = worst
    return diffs


def _measure(contenders, batches, repeats, min_time_s, remote, log):
    names = list(contenders)
    times = {n: {b: [] for b in batches} for n in names}
    router: dict[str, dict[int, dict[str, float]]] = {n: {b: {} for b in batches} for n in names}
    for b in batches:  # warm-up: every contender at every size once
        for n in names:
            contenders[n](b)
    for r in range(repeats):
        log(f"round {r + 1}/{repeats}")
        for i, b in enumerate(batches):
            for n in rotate(names, r + i):
                before = remote.metrics() if remote is not None and n.startswith("dist") else None
                times[n][b] += time_call(lambda n=n, b=b: contenders[n](b), min_time_s)
                if before is not None:
                    add_metrics(router[n][b], metric_delta(before, remote.metrics()))
    return times, router


def _summarise(times, router, batches) -> list[dict[str, Any]]:
    rows = []
    for b in batches:
        sec = {n: median(times[n][b]) for n in times}
        tps = {n: b / s for n, s in sec.items()}
        ratios = {
            "ours/hf eager (block)": tps["local block"] / tps["hf eager"],
            "ours/hf grouped_mm (block)": tps["local block"] / tps["hf grouped_mm"],
        }
        if "dist block" in tps:
            ratios["dist/local (block)"] = tps["dist block"] / tps["local block [pool up]"]
            ratios["dist/local (routed)"] = tps["dist routed"] / tps["local routed [pool up]"]
        row = {"batch": b, "seconds": sec, "tokens_per_s": tps, "ratios": ratios}
        if "dist block" in tps:
            row["router"] = {n: per_call(router[n][b]) for n in ("dist routed", "dist block")}
        rows.append(row)
    return rows


def write_outputs(out: dict[str, Any], out_dir: Path) -> None:
    rows = out["results"]
    names = list(rows[0]["tokens_per_s"])
    ratio_names = list(rows[0]["ratios"])
    tps = markdown_table(
        ["tokens", *names], [[r["batch"], *r["tokens_per_s"].values()] for r in rows]
    )
    ratios = markdown_table(
        ["tokens", *ratio_names], [[r["batch"], *r["ratios"].values()] for r in rows]
    )
    sections = [("Tokens/s (median over rounds)", tps), ("Ratios", ratios)]
    if "router" in rows[0]:
        cols = ROUTER_COLUMNS
        body = markdown_table(
            ["tokens", "path", *cols],
            [[r["batch"], n, *(m[c] for c in cols)] for r in rows for n, m in r["router"].items()],
        )
        sections.append((f"Router metrics ({out['shards']} shards, per layer submit)", body))
    checks = "\n".join(f"- {k}: {v:.3g}" for k, v in out["verification_max_abs_diff"].items())
    sections.append(("Output check (max abs diff)", checks))
    s = out["shape"]
    intro = (
        f"{machine_line(out['machine'])} Layer {out['layer']} of `{out['model']}` "
        f"(hidden {s['hidden']}, {s['experts']} experts top-{s['top_k']}, expert intermediate "
        f"{s['moe_intermediate']}, shared {s['shared_intermediate']}); "
        f"medians of every per-call sample of {out['repeats']} interleaved rounds. Load "
        f"average at start {out['loadavg_1m_start']}, end {out['machine']['loadavg_1m']}."
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "moe.json", out)
    write_markdown(out_dir / "moe.md", "MoE layer benchmark", sections, intro)
    plot_lines(
        out_dir / "moe.png",
        [r["batch"] for r in rows],
        {n: [r["tokens_per_s"][n] for r in rows] for n in names},
        title="One MoE layer: tokens/s vs batch",
        xlabel="tokens in the batch",
        ylabel="tokens/s",
    )
