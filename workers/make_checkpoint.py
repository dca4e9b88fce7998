"""Write random-weight Qwen3-Next checkpoints in the real Hugging Face format, with a tokenizer.

`make_checkpoint(out_dir, preset="tiny")` writes `config.json`, `generation_config.json`, the
weights (`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus
`model.safetensors.index.json`) and a byte-level BPE tokenizer trained offline on the embedded
corpus of `workers/tokenizer_data.py`. Every tensor is drawn in fp32 from a generator seeded by
(seed, tensor name), so the same seed gives the same bytes whatever the layout or sharding.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from tqdm import tqdm

from workers.config import COMPUTE_DTYPES, FULL, LINEAR, ModelConfig
from workers.tokenizer_data import CORPUS

GENERATOR_VERSION = 3  # 3: tool-call tokens and a chat template that renders tools
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Added (not special: decoding keeps them) like Qwen3's tokenizer has them.
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
TOKENIZER_VOCAB = 1024  # trained tokens + tool tokens + special tokens
DEFAULT_TOOL_SYSTEM = "You are a coding assistant. You can call functions to get things done."
# The demo's chat template: ChatML, with tools the way Qwen3-Coder's published template does
# them (our own text): the functions listed in XML in the system message, an assistant's calls
# as <tool_call><function=NAME><parameter=ARG>value</parameter></function></tool_call> (the
# format the model answers in; deploy/tools.py parses it), and consecutive tool results as one
# user turn of <tool_response> blocks. Variables: messages, tools, add_generation_prompt.
CHAT_TEMPLATE = (
    r"""
{%- macro xml_value(value) %}
    {%- if value is string %}{{- value }}{%- else %}{{- value | tojson }}{%- endif %}
{%- endmacro %}
{%- if messages and messages[0].role == 'system' %}
    {%- set system_text = messages[0].content %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system_text = '' %}
    {%- set turns = messages %}
{%- endif %}
{%- if tools %}
    {{- '<|im_start|>system\n' + (system_text or '"""
    + DEFAULT_TOOL_SYSTEM
    + r"""') }}
    {{- '\n\n# Tools\n\nYou can call these functions:\n\n<tools>' }}
    {%- for tool in tools %}
        {%- set fn = tool.function if tool.function is defined else tool %}
        {{- '\n<function>\n<name>' + fn.name + '</name>' }}
        {%- if fn.description %}
            {{- '\n<description>' + fn.description | trim + '</description>' }}
        {%- endif %}
        {{- '\n<parameters>' }}
        {%- if fn.parameters is mapping and fn.parameters.properties is mapping %}
            {%- for name, spec in fn.parameters.properties | items %}
                {{- '\n<parameter>\n<name>' + name + '</name>' }}
                {%- if spec is mapping %}
                    {%- for key, value in spec | items %}
                        {{- '\n<' + key + '>' + xml_value(value) | trim + '</' + key + '>' }}
                    {%- endfor %}
                {%- endif %}
                {{- '\n</parameter>' }}
            {%- endfor %}
        {%- endif %}
        {%- if fn.parameters is mapping and fn.parameters.required %}
            {{- '\n<required>' + fn.parameters.required | tojson + '</required>' }}
        {%- endif %}
        {{- '\n</parameters>\n</function>' }}
    {%- endfor %}
    {{- '\n</tools>\n\nTo call functions, end your reply with one or more calls in exactly this '
        'format, and write nothing after them:\n\n<tool_call>\n<function=the_function_name>\n'
        '<parameter=a_parameter_name>\nthe value (may span several lines)\n</parameter>\n'
        '</function>\n</tool_call>\n\nGive every required parameter. Any explanation goes '
        'before the first call.<|im_end|>\n' }}
{%- elif system_text %}
    {{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' }}
{%- endif %}
{%- for message in turns %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\n' + message.content | trim }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- set fn = call.function if call.function is defined else call %}
            {{- '\n<tool_call>\n<function=' + fn.name + '>\n' }}
            {%- if fn.arguments is mapping %}
                {%- for name, value in fn.arguments | items %}
                    {{- '<parameter=' + name + '>\n' + xml_value(value) + '\n</parameter>\n' }}
                {%- endfor %}
            {%- endif %}
            {{- '</function>\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""".strip()
)
# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation, whitespace.
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DTYPES = {k: COMPUTE_DTYPES[k] for k in ("float32", "bfloat16")}  # storage dtypes

_TINY = dict(
    hidden_size=64, num_hidden_layers=4, layer_types=(LINEAR, LINEAR, LINEAR, FULL),
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.25,
    rope_theta=10000.0, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
    num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, tie_word_embeddings=False,
    max_position_embeddings=4096, rms_norm_eps=1e-6, torch_dtype="float32",
)  # fmt: skip
_SMALL = dict(
    _TINY, hidden_size=256, num_hidden_layers=8, layer_types=(LINEAR, LINEAR, LINEAR, FULL) * 2,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=4,
    linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
    num_experts=512, num_experts_per_tok=10, moe_intermediate_size=64,
    shared_expert_intermediate_size=256, max_position_embeddings=32768, torch_dtype="bfloat16",
)  # fmt: skip
# small with the linear (DeltaNet) head dims vLLM's CPU kernel takes (64 or 128): a preset
# every peer runs (cluster/bench/peers.py)
_PEERS = dict(_SMALL, linear_key_head_dim=64, linear_value_head_dim=64)
# one real 4-layer block (3 DeltaNet + 1 attention) at the real model's proportions: hidden
# 1024 (real 2048), 512 experts top-10, expert intermediate 256, real head dims (DeltaNet 128,
# attention 256); ~3.2 GB of bf16 experts on disk, 6.4 GB as fp32
_BLOCK = dict(
    _SMALL, hidden_size=1024, num_hidden_layers=4, layer_types=(LINEAR, LINEAR, LINEAR, FULL),
    num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=8,
    linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
    moe_intermediate_size=256, shared_expert_intermediate_size=256,
)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {"tiny": _TINY, "small": _SMALL, "peers": _PEERS,
                                      "block": _BLOCK}  # fmt: skip

# Weight scales (inputs of every projection are RMS-normalised, so std 1/sqrt(fan_in) keeps
# activations O(1)). Logits get std ~LOGIT_STD, router logits ~ROUTER_STD; dt_bias centred at
# DT_BIAS_MEAN puts the median DeltaNet decay exp(g) near 0.9 (0 would forget every step).
NORM_STD, LOGIT_STD, ROUTER_STD, DT_BIAS_MEAN, DT_BIAS_STD = 0.1, 2.0, 2.0, -4.0, 0.5


# ------------------------------------------------------------------------------ tokenizer
def build_tokenizer() -> Tokenizer:
    """The demo byte-level BPE tokenizer: deterministic, trained on the embedded corpus."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - len(SPECIAL_TOKENS) - len(TOOL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def write_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", config)


# --------------------------------------------------------------------------------- config
def preset_config(preset: str, tok: Tokenizer, dtype: str | None = None) -> ModelConfig:
    """The ModelConfig of a preset, with vocab/eos/pad taken from the tokenizer."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    fields = dict(PRESETS[preset])
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        fields["torch_dtype"] = dtype
    vocab = -(-tok.get_vocab_size() // 64) * 64
    eos, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    return ModelConfig(vocab_size=vocab, eos_token_ids=(eos,), pad_token_id=pad, **fields)


def hf_config(config: ModelConfig) -> dict[str, Any]:
    raw = config.to_hf()
    raw.pop("torch_dtype", None)
    raw["dtype"] = config.torch_dtype
    return raw


# -------------------------------------------------------------------------------- weights
def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _sample(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One fp32 tensor, drawn from its own seeded generator, scaled by its role."""
    gen = _generator(seed, key)
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    name = key.rsplit(".", 2)[-2] if key.endswith(".weight") else key.rsplit(".", 1)[-1]
    if name in ("input_layernorm", "post_attention_layernorm", "norm", "q_norm", "k_norm"):
        return (1.0 if key.endswith("linear_attn.norm.weight") else 0.0) + NORM_STD * x
    if name == "embed_tokens":
        return x
    if name == "A_log":
        return torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log_()
    if name == "dt_bias":
        return DT_BIAS_MEAN + DT_BIAS_STD * x
    scale = {"lm_head": LOGIT_STD, "gate": ROUTER_STD}.get(name, 1.0)
    return x * (scale / math.sqrt(shape[-1]))  # [.., out, in]: fan-in is the last dim


def random_weights(
    config: ModelConfig,
    seed: int = 0,
    expert_layout: str = "per-expert",
    skew: tuple[int, float] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, in the config's storage dtype, in HF key order.

    `skew` = (hot, factor): in every layer, `hot` experts (their own per layer; see
    `hot_experts`) get their router gate rows scaled by `factor` (> 1: chosen more often).
    `progress(nbytes)` is called as each part (dense weights, each layer's experts) is drawn."""
    from workers.checkpoint import expected_dense_shapes

    if expert_layout not in ("per-expert", "fused"):
        raise ValueError(f"expert_layout: expected 'per-expert' or 'fused', got {expert_layout!r}")
    dtype = _DTYPES[config.torch_dtype]
    shapes = expected_dense_shapes(config)
    samples = {k: _sample(k, s, seed) for k, s in shapes.items()}
    if skew is not None:
        _apply_skew(samples, config, seed, *skew)
    out = {k: t.to(dtype) for k, t in samples.items()}
    _report(progress, out.values())
    for layer in range(config.num_hidden_layers):
        experts = _expert_tensors(config, layer, seed, expert_layout, dtype)
        _report(progress, experts.values())
        out.update(experts)
    return out


def hot_experts(config: ModelConfig, layer: int, seed: int, hot: int) -> list[int]:
    """The `hot` experts `--skew` makes hot in `layer` (a seeded draw per layer, ascending)."""
    gen = _generator(seed, f"skew:{layer}")
    return sorted(torch.randperm(config.num_experts, generator=gen)[:hot].tolist())


def _apply_skew(
    samples: dict[str, torch.Tensor], config: ModelConfig, seed: int, hot: int, factor: float
) -> None:
    """Scale the hot experts' router gate rows (router logits x factor: a wider spread, so
    top-k picks them more often). No new parameters: the checkpoint stays a valid Qwen3-Next."""
    if not 1 <= hot <= config.num_experts:
        raise ValueError(f"skew: hot experts must be in [1, {config.num_experts}], got {hot}")
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"skew: factor must be a finite number > 0, got {factor}")
    for layer in range(config.num_hidden_layers):
        rows = hot_experts(config, layer, seed, hot)
        samples[f"model.layers.{layer}.mlp.gate.weight"][rows] *= factor


def checkpoint_bytes(config: ModelConfig) -> int:
    """Bytes of the weights `random_weights` draws for `config` (for progress and messages)."""
    from workers.checkpoint import expected_dense_shapes

    size = _DTYPES[config.torch_dtype].itemsize
    dense = sum(math.prod(s) for s in expected_dense_shapes(config).values())
    c = config
    experts = c.num_hidden_layers * c.num_experts * 3 * c.moe_intermediate_size * c.hidden_size
    return (dense + experts) * size


def _report(progress: Callable[[int], None] | None, tensors: Iterable[torch.Tensor]) -> None:
    if progress is not None:
        progress(sum(t.numel() * t.element_size() for t in tensors))


def _expert_tensors(
    c: ModelConfig, layer: int, seed: int, layout: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    p = f"model.layers.{layer}.mlp.experts"
    e, h, inter = c.num_experts, c.hidden_size, c.moe_intermediate_size
    w13 = _sample(f"{p}.gate_up_proj", (e, 2 * inter, h), seed).to(dtype)
    w2 = _sample(f"{p}.down_proj", (e, h, inter), seed).to(dtype)
    if layout == "fused":
        return {f"{p}.gate_up_proj": w13, f"{p}.down_proj": w2}
    out = {}
    for i in range(e):
        out[f"{p}.{i}.gate_proj.weight"] = w13[i, :inter].clone()
        out[f"{p}.{i}.up_proj.weight"] = w13[i, inter:].clone()
        out[f"{p}.{i}.down_proj.weight"] = w2[i].clone()
    return out


def write_weights(
    tensors: dict[str, torch.Tensor], out_dir: Path, shard_size_mb: float | None = None
) -> list[str]:
    """Save as one `model.safetensors`, or as shards plus an index; returns the file names."""
    meta = {"format": "pt"}
    if shard_size_mb is None:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    shards = _pack(tensors, int(shard_size_mb * 2**20))
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        save_file({k: tensors[k] for k in keys}, str(out_dir / name), metadata=meta)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out_dir / "model.safetensors.index.json", index)
    return names


def _pack(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


# --------------------------------------------------------------------------------- public
def make_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    expert_layout: str = "per-expert",
    dtype: str | None = None,
    tokenizer: bool = True,
    shard_size_mb: float | None = None,
    moe_intermediate_size: int | None = None,
    skew: tuple[int, float] | None = None,
    progress: bool = False,
) -> Path:
    """Write a random-weight HF Qwen3-Next checkpoint (+ tokenizer) to `out_dir`; return it.

    `dtype` ("float32" | "bfloat16") overrides the preset's storage dtype; `skew` = (hot,
    factor) makes `hot` experts per layer hot (see `random_weights`).
    `progress` shows a bar (bytes drawn, rate, ETA) on stderr.
    """
    out = Path(out_dir)
    tok = build_tokenizer()
    config = preset_config(preset, tok, dtype)
    if moe_intermediate_size is not None:
        if moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size: must be >= 1, got {moe_intermediate_size}")
        config = dataclasses.replace(config, moe_intermediate_size=moe_intermediate_size)
    total = checkpoint_bytes(config)
    with tqdm(
        total=total, desc="  drawing weights", unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, disable=not progress, leave=False,
    ) as bar:  # fmt: skip
        tensors = random_weights(config, seed, expert_layout, skew, progress=bar.update)
    if progress:
        print(f"  writing {total / 2**20:.0f} MiB of safetensors", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", hf_config(config))
    gen = {"eos_token_id": config.eos_token_ids[0], "pad_token_id": config.pad_token_id}
    _write_json(out / "generation_config.json", {**gen, "do_sample": False})
    write_weights(tensors, out, shard_size_mb)
    if tokenizer:
        write_tokenizer(tok, out)
    return out


def default_demo_dir(preset: str = "small", seed: int = 0) -> Path:
    """`$EXPERTMESH_CACHE` (default `~/.cache/expertmesh`) / `demo-{preset}-seed{seed}-v{N}`."""
    root = Path(os.environ.get("EXPERTMESH_CACHE") or "~/.cache/expertmesh").expanduser()
    return root / f"demo-{preset}-seed{seed}-v{GENERATOR_VERSION}"


def ensure_demo_checkpoint(preset: str = "small", seed: int = 0, progress: bool = False) -> Path:
    """The demo checkpoint, generated on first use (into a temp dir, then renamed atomically).
    `progress` shows the generation's progress on stderr."""
    final = default_demo_dir(preset, seed)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        make_checkpoint(tmp, preset=preset, seed=seed, progress=progress)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `make-checkpoint OUT [--preset ...]` on an argparse subparsers object."""
    p = subparsers.add_parser("make-checkpoint", help="write a random-weight demo checkpoint")
    p.add_argument("out", metavar="OUT", type=Path, help="output directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert-layout", choices=["per-expert", "fused"], default="per-expert")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    p.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer files")
    p.add_argument("--shard-size-mb", type=float, default=None, help="shard the weights")
    p.add_argument("--moe-intermediate-size", type=int, default=None,
                   help="override the preset's expert intermediate size (e.g. block at 128 "
                   "where memory is short)")  # fmt: skip
    p.add_argument("--skew", type=_skew, default=None, metavar="HOT:FACTOR",
                   help="make HOT experts per layer hot: their router gate rows x FACTOR "
                   "(e.g. 8:3; the experts differ per layer; no new parameters)")  # fmt: skip
    p.set_defaults(func=_cli_main)
    return p


def _skew(value: str) -> tuple[int, float]:
    try:
        hot, factor = value.split(":")
        out = (int(hot), float(factor))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOT:FACTOR (e.g. 8:3), got {value!r}") from None
    if out[0] < 1 or not (out[1] > 0 and math.isfinite(out[1])):
        raise argparse.ArgumentTypeError(f"expected HOT >= 1 and FACTOR > 0, got {value!r}")
    return out


def _cli_main(args: argparse.Namespace) -> int:
    path = make_checkpoint(
        args.out,
        preset=args.preset,
        seed=args.seed,
        expert_layout=args.expert_layout,
        dtype=args.dtype,
        tokenizer=not args.no_tokenizer,
        shard_size_mb=args.shard_size_mb,
        moe_intermediate_size=args.moe_intermediate_size,
        skew=args.skew,
    )
    print(path)
    return 0


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
