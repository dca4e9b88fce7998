"""`expertmesh bench quant`: expert storage formats side by side, fidelity beside speed.

Speed: one MoE layer's routed experts (the layer's real inputs, captured while the model
prefills random prompts, routed by its own gate) at token batches 1..256, for every storage
format through the fused kernel, and fp32 through torch's grouped matmul (the kernel before
the fused one), interleaved, medians of per-call samples.
Fidelity against fp32 experts (the dense model stays fp32): teacher-forced, the reference
greedy continuation of every prompt is scored under each format (mean and max |logprob drift|
of the reference tokens, top-1 agreement per position); free-running, each format generates
greedily from the same prompts (share of sequences identical to fp32's, mean matching prefix).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cluster.bench import (
    capture_moe_inputs,
    load_model,
    machine_info,
    median,
    random_prompts,
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
from workers.experts import LocalExpertBackend, _torch_swiglu, grouped_swiglu, pack_experts
from workers.quant import EXPERT_DTYPES, ExpertPack
from workers.runner import ModelRunner

TORCH = "float32 (torch grouped_mm)"


@torch.inference_mode()
def greedy(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuations of all prompts as one batch (prefill, then `steps` - 1 decodes)."""
    slots = [runner.allocate() for _ in prompts]
    try:
        logits = runner.step(list(zip(slots, prompts, strict=True)))
        out = [[int(t)] for t in logits.argmax(-1)]
        for _ in range(steps - 1):
            logits = runner.step([(s, [o[-1]]) for s, o in zip(slots, out, strict=True)])
            for o, t in zip(out, logits.argmax(-1).tolist(), strict=True):
                o.append(int(t))
        return out
    finally:
        for s in slots:
            runner.free(s)


@torch.inference_mode()
def score(runner: ModelRunner, prompts, continuations) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced: (logprob of each continuation token [n, steps], argmax [n, steps])."""
    lps, tops = [], []
    for p, c in zip(prompts, continuations, strict=True):
        slot = runner.allocate()
        try:
            (logits,) = runner.step([(slot, p + c[:-1])], all_logits=True)
        finally:
            runner.free(slot)
        lp = torch.log_softmax(logits[len(p) - 1 :].double(), -1)  # [steps, V]
        lps.append(lp.gather(1, torch.tensor(c).view(-1, 1)).squeeze(1))
        tops.append(lp.argmax(-1))
    return torch.stack(lps), torch.stack(tops)


def run(
    model_dir: str | Path | None = None,
    dtypes: Sequence[str] = EXPERT_DTYPES,
    batches: Sequence[int] = (1, 4, 16, 64, 256),
    prompts: int = 8,
    prompt_len: int = 32,
    steps: int = 32,
    repeats: int = 5,
    layer: int | None = None,
    seed: int = 0,
    out_dir: str | Path = "bench-out",
    min_time_s: float = 0.05,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> dict[str, Any]:
    model_dir = resolve_model(model_dir)
    model = load_model(model_dir, storage="float32")  # the reference: every value in fp32
    cfg = model.config
    base = model.experts.weights
    packs = {k: pack_experts(base, k) for k in dtypes if k != "float32"}
    packs["float32"] = base
    layer = cfg.num_hidden_layers // 2 if layer is None else layer
    load_start = os.getloadavg()[0]

    log("fidelity: fp32 reference ...")
    ps = random_prompts(prompts, prompt_len, cfg.vocab_size, seed)
    runners = {k: ModelRunner(model.lm, LocalExpertBackend(w), prompts) for k, w in packs.items()}
    ref = greedy(runners["float32"], ps, steps)
    ref_lp, _ = score(runners["float32"], ps, ref)
    fidelity: dict[str, dict[str, float]] = {}
    for k in dtypes:
        log(f"fidelity: {k}")
        lp, top = score(runners[k], ps, ref)
        drift = (lp - ref_lp).abs()
        free = greedy(runners[k], ps, steps)
        prefix = [_common_prefix(a, b) for a, b in zip(free, ref, strict=True)]
        fidelity[k] = {
            "logprob_drift_mean": float(drift.mean()),
            "logprob_drift_max": float(drift.max()),
            "top1_agreement": float((top == torch.tensor(ref)).double().mean()),
            "greedy_identical": sum(p == steps for p in prefix) / len(prefix),
            "greedy_prefix_mean": sum(prefix) / len(prefix),
        }

    log(f"speed: capturing layer {layer}'s MoE inputs ...")
    pool = capture_moe_inputs(model, max(batches), seed)[layer]
    moe = model.lm.model.layers[layer].mlp
    inputs = {}
    for b in batches:
        x = pool[sample_rows(pool, b, seed + b)].contiguous()
        inputs[b] = (x, *moe.gate(x))
    w13, w2 = base.w13[layer], base.w2[layer]
    if isinstance(w13, ExpertPack):  # the torch contender takes tensors
        w13, w2 = w13.dequantize(), w2.dequantize()
    fns: dict[str, Callable[[int], Any]] = {
        TORCH: lambda b: _torch_swiglu(*inputs[b], w13, w2),
    }
    for k in dtypes:
        p13, p2 = packs[k].w13[layer], packs[k].w2[layer]
        fns[k] = lambda b, p13=p13, p2=p2: grouped_swiglu(*inputs[b], p13, p2)
    names = list(fns)
    times = {n: {b: [] for b in batches} for n in names}
    for b in batches:
        for n in names:
            fns[n](b)
    for r in range(repeats):
        log(f"speed: round {r + 1}/{repeats}")
        for i, b in enumerate(batches):
            for n in rotate(names, r + i):
                times[n][b] += time_call(lambda n=n, b=b: fns[n](b), min_time_s)
    speed = {n: {b: median(times[n][b]) for b in batches} for n in names}
    nbytes = {k: _layer_bytes(packs[k], layer) for k in dtypes}
    out = {
        "benchmark": "quant",
        "machine": machine_info(),
        "loadavg_1m_start": round(load_start, 2),
        "model": str(model_dir),
        "layer": layer,
        "fidelity_setup": {"prompts": prompts, "prompt_len": prompt_len, "steps": steps},
        "fidelity": fidelity,
        "layer_expert_bytes": nbytes,
        "seconds": speed,
        "repeats": repeats,
    }
    write_outputs(out, Path(out_dir), batches)
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _layer_bytes(w, layer: int) -> int:
    a, b = w.w13[layer], w.w2[layer]
    size = lambda t: t.nbytes if not isinstance(t, torch.Tensor) else t.numel() * t.element_size()  # noqa: E731
    return size(a) + size(b)


def write_outputs(out: dict[str, Any], out_dir: Path, batches: Sequence[int]) -> None:
    sec = out["seconds"]
    names = list(sec)
    rows = [[b, *(1e3 * sec[n][b] for n in names),
             *(sec[TORCH][b] / sec[n][b] for n in names[1:])] for b in batches]  # fmt: skip
    headers = ["tokens", *(f"{n} ms" for n in names), *(f"{n} speed-up" for n in names[1:])]
    fid = out["fidelity"]
    frows = [[k, out["layer_expert_bytes"][k] / 2**20, f["logprob_drift_mean"],
              f["logprob_drift_max"], f"{100 * f['top1_agreement']:.1f}%",
              f"{100 * f['greedy_identical']:.0f}%", f["greedy_prefix_mean"]]
             for k, f in fid.items()]  # fmt: skip
    fheaders = ["experts", "layer MiB", "mean abs logprob drift", "max abs logprob drift",
                "teacher-forced top-1 agreement", "greedy sequences identical",
                "mean identical prefix (tokens)"]  # fmt: skip
    s = out["fidelity_setup"]
    notes = (
        f"- fidelity vs fp32 experts (dense path fp32): {s['prompts']} random prompts of "
        f"{s['prompt_len']} tokens, {s['steps']} greedy tokens each; random-weight models have "
        "flat next-token distributions (small top-1 margins), so greedy divergence here is a "
        "pessimistic proxy for a trained model's\n"
        f"- speed: layer {out['layer']}'s routed experts, medians of {out['repeats']} "
        "interleaved rounds; speed-up = torch grouped_mm fp32 time / this time"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "quant.json", out)
    series = {n: [b / sec[n][b] for b in batches] for n in names}
    png = plot_lines(out_dir / "quant.png", list(batches), series, title="routed experts of one "
                     "layer by storage format", xlabel="tokens", ylabel="tokens/s")  # fmt: skip
    sections = [("Fidelity", markdown_table(fheaders, frows)),
                ("Speed (ms per call)", markdown_table(headers, rows)),
                ("Notes", notes)]  # fmt: skip
    if png:
        sections.append(("Plot", f"![quant]({png.name})"))
    intro = f"{machine_line(out['machine'])} Model `{out['model']}`."
    write_markdown(out_dir / "quant.md", "Expert storage formats", sections, intro)
