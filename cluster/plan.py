"""Memory planner: what a Qwen3-Next deployment needs, and how many devices / sequences fit.

`expertmesh plan --model DIR | --preset qwen3-coder-next --dtype bfloat16 --expert-dtype int4
--device-memory 80GB --context 262144` prints parameter counts (dense, routed experts, per
shard), bytes per dtype, the expert shards needed per device size, the KV cache and DeltaNet
state of one sequence, and how many sequences fit next to the dense weights. Counts come from
the same tensor schema the loader checks (workers.checkpoint), so they are exact.
`serve` runs `check_fits` on its cluster config before loading anything and refuses a
deployment that cannot fit in this machine's memory, naming the numbers.

Bytes per parameter: float32 4, bfloat16 2, float8 1 (+ one fp32 scale per output row, as
GPU fp8 serving stores it), int8 1 (+ one fp32 scale per output row), int4 0.5 (+ one fp32
scale per group of 64 inputs: workers/quant.py). The DeltaNet recurrent state is fp32 (as
workers/cache.py keeps it); KV and conv state use the KV dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workers.config import FULL, LINEAR, ModelConfig
from workers.quant import INT4_GROUP

PLAN_DTYPES = ("float32", "bfloat16", "float8", "int8", "int4")
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float8": 1.0, "int8": 1.0, "int4": 0.5}
KV_BYTES = {"float32": 4, "bfloat16": 2, "float8": 1}
GiB = 1 << 30
DEVICE_SIZES_GB = (24, 48, 80, 141, 192)  # common accelerator memory sizes

# Qwen3-Coder-Next (= Qwen3-Next-80B-A3B geometry; ../shared/REFERENCE.md)
QWEN3_CODER_NEXT = ModelConfig(
    vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
    layer_types=(LINEAR, LINEAR, LINEAR, FULL) * 12, num_attention_heads=16,
    num_key_value_heads=2, head_dim=256, partial_rotary_factor=0.25, rope_theta=10_000_000.0,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=512,
    num_experts_per_tok=10, norm_topk_prob=True, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, max_position_embeddings=262144,
    tie_word_embeddings=False, torch_dtype="bfloat16",
)  # fmt: skip
PRESETS = {"qwen3-coder-next": QWEN3_CODER_NEXT}


class PlanError(ValueError):
    """A deployment does not fit; the message names the numbers."""


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '512MB', '24G', '1e9' -> bytes (GB = 1e9, GiB = 2**30)."""
    s = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 1 << 40, "GIB": GiB, "MIB": 1 << 20, "KIB": 1 << 10, "TB": 10**12,
             "GB": 10**9, "MB": 10**6, "KB": 10**3, "T": 10**12, "G": 10**9, "M": 10**6,
             "K": 10**3, "B": 1}  # fmt: skip
    for unit, mult in units.items():
        if s.endswith(unit):
            s, scale = s[: -len(unit)], mult
            break
    else:
        scale = 1
    try:
        value = float(s) * scale
    except ValueError:
        raise ValueError(f"expected a size like 80GB or 24GiB, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"expected a positive size, got {text!r}")
    return int(value)


def weight_bytes(params: int, dtype: str, rows: int = 0, inputs: int = 0) -> int:
    """Bytes of `params` weights stored as dtype; `rows` output rows and `inputs` per row
    for the scales of float8/int8 (per row) and int4 (per row and group)."""
    if dtype not in WEIGHT_BYTES:
        raise ValueError(f"dtype: expected one of {list(PLAN_DTYPES)}, got {dtype!r}")
    scales = 0
    if dtype in ("float8", "int8"):
        scales = 4 * rows
    elif dtype == "int4":
        scales = 4 * rows * math.ceil(inputs / INT4_GROUP) if inputs else 0
    return int(params * WEIGHT_BYTES[dtype]) + scales


@dataclass(frozen=True)
class Plan:
    dense_params: int
    expert_params: int
    expert_params_per_layer: int
    active_params_per_token: int
    dense_bytes: int
    expert_bytes: int
    kv_bytes_per_token: int
    deltanet_bytes_per_sequence: int
    sequence_bytes: int  # KV at `context` tokens + DeltaNet state
    context: int
    device_bytes: int
    usable_bytes: int
    shards: int  # expert shards (devices) needed at this device size
    expert_bytes_per_shard: int
    sequences_per_dense_device: int
    dtype: str
    expert_dtype: str
    kv_dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(
    config: ModelConfig,
    dtype: str = "bfloat16",
    expert_dtype: str | None = None,
    kv_dtype: str | None = None,
    device_memory: int = 80 * 10**9,
    context: int | None = None,
    reserve: float = 0.1,
    shards: int | None = None,
    lossless: bool = False,
) -> Plan:
    """The plan for `config`: dense weights in `dtype`, experts in `expert_dtype` (default
    dtype), KV in `kv_dtype` (default dtype; int formats keep a bf16 cache); `reserve` of each
    device is kept for activations and the runtime. With `lossless` (what the loaders do), a
    bf16 checkpoint computed in fp32 keeps its projections and (by default) experts in bf16."""
    from workers.checkpoint import expected_dense_shapes

    narrow = lossless and dtype == "float32" and config.torch_dtype == "bfloat16"
    expert_dtype = expert_dtype or ("bfloat16" if narrow else dtype)
    kv_dtype = kv_dtype or ("float32" if dtype == "float32" else "bfloat16")
    if kv_dtype not in KV_BYTES:
        raise ValueError(f"kv dtype: expected one of {list(KV_BYTES)}, got {kv_dtype!r}")
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve: expected a fraction in [0, 1), got {reserve}")
    c = config
    context = context or c.max_position_embeddings
    dense_params = sum(math.prod(s) for s in expected_dense_shapes(c).values())
    h, i, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
    per_layer = e * 3 * h * i
    expert_params = per_layer * c.num_hidden_layers
    # experts' scale rows: gate_up has 2I rows of H inputs, down H rows of I inputs
    expert_bytes = (
        c.num_hidden_layers
        * e
        * (
            weight_bytes(2 * i * h, expert_dtype, 2 * i, h)
            + weight_bytes(h * i, expert_dtype, h, i)
        )
    )
    dense_bytes = weight_bytes(dense_params, dtype if dtype in KV_BYTES else "bfloat16")
    embed = c.vocab_size * h
    if narrow:  # workers/linear.py: all but the embedding, norms and conv stay bf16
        wide = embed + sum(
            math.prod(s) for k, s in expected_dense_shapes(c).items() if len(s) != 2
        )  # fmt: skip
        dense_bytes = weight_bytes(wide, "float32") + weight_bytes(dense_params - wide, "bfloat16")
    active = dense_params - embed + c.num_hidden_layers * c.num_experts_per_tok * 3 * h * i
    kv_token = len(c.full_layers) * 2 * c.num_key_value_heads * c.head_dim * KV_BYTES[kv_dtype]
    ssm = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4
    conv = c.conv_dim * (c.linear_conv_kernel_dim - 1) * KV_BYTES[kv_dtype]
    deltanet = len(c.linear_layers) * (ssm + conv)
    seq = kv_token * context + deltanet
    usable = int(device_memory * (1 - reserve))
    need = shards or max(1, math.ceil(expert_bytes / usable))
    fits = max(0, (usable - dense_bytes) // seq) if usable > dense_bytes else 0
    return Plan(dense_params, expert_params, per_layer, active, dense_bytes, expert_bytes,
                kv_token, deltanet, seq, context, device_memory, usable, need,
                math.ceil(expert_bytes / need), fits, dtype, expert_dtype, kv_dtype)  # fmt: skip


def human(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def render(p: Plan, name: str) -> str:
    rows = [
        ("model", name),
        ("parameters", f"{p.dense_params + p.expert_params:,} (dense {p.dense_params:,}, "
                       f"routed experts {p.expert_params:,}; {p.expert_params_per_layer:,} per "
                       f"layer; active per token {p.active_params_per_token:,})"),
        ("dense weights", f"{human(p.dense_bytes)} ({p.dtype})"),
        ("expert weights", f"{human(p.expert_bytes)} ({p.expert_dtype}, scales included)"),
        ("device", f"{human(p.device_bytes)}, usable {human(p.usable_bytes)} after the reserve"),
        ("expert shards", f"{p.shards} (one per device), {human(p.expert_bytes_per_shard)} each"),
        ("KV cache", f"{human(p.kv_bytes_per_token)} per token ({p.kv_dtype})"),
        ("DeltaNet state", f"{human(p.deltanet_bytes_per_sequence)} per sequence"),
        ("one sequence", f"{human(p.sequence_bytes)} at {p.context:,} tokens of context"),
        ("sequences per dense device", f"{p.sequences_per_dense_device:,} at that context"),
    ]  # fmt: skip
    for size in DEVICE_SIZES_GB:
        usable = size * 10**9 * p.usable_bytes / p.device_bytes
        rows.append((f"shards at {size} GB", str(max(1, math.ceil(p.expert_bytes / usable)))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------- serve's check
def available_memory() -> int:
    """This machine's available memory (MemAvailable), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(cluster: Any, model_dir: str | Path, available: int | None = None) -> dict:
    """Raise PlanError when a cluster config cannot fit in this machine's memory: dense
    replicas (weights + cache for max_num_seqs x max_model_len each), their local experts
    (experts.shards == 0) or the expert shards. Returns the numbers otherwise."""
    config = ModelConfig.from_hf(model_dir)
    dense = cluster.dense
    p = plan(config, cluster.dtype, cluster.experts.dtype, context=dense.max_model_len,
             reserve=0.0, lossless=True)  # fmt: skip
    replicas = dense.autoscaling.max_replicas
    available = available_memory() if available is None else available
    # the replica's hybrid cache: its configured budget (workers/cache_config.py), else room
    # for max_num_seqs sequences at max_model_len
    cache = dense.max_num_seqs * p.sequence_bytes
    if dense.kv_cache_gb is not None:
        cache = int(dense.kv_cache_gb * GiB)
    elif dense.kv_cache_fraction is not None:
        cache = int(dense.kv_cache_fraction * available)
    dense_need = replicas * (p.dense_bytes + cache)
    experts = p.expert_bytes * (replicas if cluster.experts.shards == 0 else 1)
    total = dense_need + experts
    numbers = {"dense_bytes": p.dense_bytes, "expert_bytes": p.expert_bytes, "cache_bytes": cache,
               "sequence_bytes": p.sequence_bytes, "total_bytes": total,
               "available_bytes": available}  # fmt: skip
    if total > available:
        where = "in every dense replica" if cluster.experts.shards == 0 else "over the shards"
        raise PlanError(
            f"this deployment needs {human(total)} but {human(available)} is available: "
            f"{replicas} dense replica(s) x ({human(p.dense_bytes)} {cluster.dtype} weights + "
            f"{human(cache)} cache: {dense.max_num_seqs} sequences x {human(p.sequence_bytes)} "
            f"at {dense.max_model_len} tokens, or dense.kv_cache_gb / kv_cache_fraction), "
            f"experts {human(p.expert_bytes)} "
            f"({p.expert_dtype}) {where}. Lower dense.max_num_seqs or dense.max_model_len, "
            f"store experts as int8/int4 (experts.dtype), or add memory / nodes"
        )
    return numbers


# ------------------------------------------------------------------------------------- CLI
def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="memory plan: devices, shards and sequences that fit")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF checkpoint directory (its config.json)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a known model's config")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16", "float8"],
        help="dense compute dtype (default bfloat16; float32 keeps a bf16 checkpoint's "
        "projections in bf16, as the dense replica does)",
    )
    p.add_argument(
        "--expert-dtype",
        default=None,
        choices=list(PLAN_DTYPES),
        help="routed experts (default: --dtype; bf16 for a bf16 checkpoint in float32)",
    )
    p.add_argument("--kv-dtype", default=None, choices=list(KV_BYTES))
    p.add_argument("--device-memory", default="80GB", help="per device, e.g. 80GB, 24GiB")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens per sequence (default: the model's max_position_embeddings)",
    )
    p.add_argument("--reserve", type=float, default=0.1, help="fraction kept for activations")
    p.add_argument("--shards", type=int, default=None, help="spread experts over N devices")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cli)  # fmt: skip
    return p


def _cli(args: argparse.Namespace) -> int:
    from cluster.cli import UsageError

    if args.model is not None:
        if not Path(args.model, "config.json").is_file():
            raise UsageError(f"--model: no config.json in {args.model}")
        config, name = ModelConfig.from_hf(args.model), args.model
    else:
        config, name = PRESETS[args.preset], args.preset
    if args.context is not None and args.context < 1:
        raise UsageError("--context: must be >= 1")
    if args.shards is not None and args.shards < 1:
        raise UsageError("--shards: must be >= 1")
    try:
        memory = parse_bytes(args.device_memory)
        p = plan(config, args.dtype, args.expert_dtype, args.kv_dtype, memory, args.context,
                 args.reserve, args.shards, lossless=True)  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(p.to_dict() | {"model": name}) if args.json else render(p, name))
    return 0
