"""ModelConfig: the Qwen3-Next architecture facts, read from a Hugging Face `config.json`.

Frozen after construction. Every key we rely on is validated here, so the math modules can
trust the numbers: an unknown layer type, a head count that does not divide, or a missing
key raises `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LINEAR = "linear_attention"
FULL = "full_attention"


# compute dtypes by name (cluster YAML, CLI, actor arguments)
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def compute_dtype(name: str) -> torch.dtype:
    """ "float32" -> torch.float32; ValueError naming the choices for anything else."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype: expected one of {list(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


class ConfigError(ValueError):
    """A model config value is missing, unknown or inconsistent; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    partial_rotary_factor: float
    rope_theta: float
    # gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # sparse MoE
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    # misc
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        self._validate()

    # ----------------------------------------------------------------- derived
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == LINEAR)

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Build from a HF `config.json` path, a checkpoint directory, or the parsed dict."""
        raw = _read_raw(source)
        model_type = raw.get("model_type")
        if model_type != "qwen3_next":
            raise ConfigError(f"model_type: expected 'qwen3_next', got {model_type!r}")
        get = _Getter(raw)
        n_layers = get.int("num_hidden_layers")
        layer_types = raw.get("layer_types")
        if layer_types is None:
            interval = get.int("full_attention_interval", 4)
            layer_types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layers)]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters: expected a mapping, got {type(rope).__name__}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"rope_parameters.rope_type: only 'default' is supported, got {rope_type!r}"
            )
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25))
        if raw.get("mlp_only_layers"):
            raise ConfigError("mlp_only_layers: dense-MLP layers are not supported (must be empty)")
        if get.int("decoder_sparse_step", 1) != 1:
            raise ConfigError("decoder_sparse_step: every layer must be a MoE layer (expected 1)")
        eos = raw.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        if not all(isinstance(e, int) for e in eos_ids):
            raise ConfigError(f"eos_token_id: expected int or list of ints, got {eos!r}")
        return cls(
            vocab_size=get.int("vocab_size"),
            hidden_size=get.int("hidden_size"),
            num_hidden_layers=n_layers,
            layer_types=tuple(layer_types),
            num_attention_heads=get.int("num_attention_heads"),
            num_key_value_heads=get.int("num_key_value_heads"),
            head_dim=get.int("head_dim", get.int("hidden_size") // get.int("num_attention_heads")),
            partial_rotary_factor=_number("partial_rotary_factor", partial),
            rope_theta=_number("rope_theta", rope_theta),
            linear_num_key_heads=get.int("linear_num_key_heads"),
            linear_num_value_heads=get.int("linear_num_value_heads"),
            linear_key_head_dim=get.int("linear_key_head_dim"),
            linear_value_head_dim=get.int("linear_value_head_dim"),
            linear_conv_kernel_dim=get.int("linear_conv_kernel_dim", 4),
            num_experts=get.int("num_experts"),
            num_experts_per_tok=get.int("num_experts_per_tok"),
            norm_topk_prob=get.bool("norm_topk_prob", True),
            moe_intermediate_size=get.int("moe_intermediate_size"),
            shared_expert_intermediate_size=get.int("shared_expert_intermediate_size"),
            rms_norm_eps=_number("rms_norm_eps", raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=get.bool("tie_word_embeddings", False),
            max_position_embeddings=get.int("max_position_embeddings", 262144),
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            hidden_act=raw.get("hidden_act", "silu"),
            attention_bias=get.bool("attention_bias", False),
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict for this config (round-trips through `from_hf`)."""
        d = dataclasses.asdict(self)
        d.pop("eos_token_ids")
        rope = {
            "rope_type": "default",
            "rope_theta": d.pop("rope_theta"),
            "partial_rotary_factor": d.pop("partial_rotary_factor"),
        }
        eos = list(self.eos_token_ids)
        return {
            "architectures": ["Qwen3NextForCausalLM"],
            "model_type": "qwen3_next",
            **d,
            "dtype": d.pop("torch_dtype"),
            "layer_types": list(self.layer_types),
            "rope_parameters": rope,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "intermediate_size": self.shared_expert_intermediate_size,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": True,
        }

    # -------------------------------------------------------------- validation
    def _validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
            "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "shared_expert_intermediate_size", "max_position_embeddings",
        ]  # fmt: skip
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types: has {len(self.layer_types)} entries but "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, t in enumerate(self.layer_types):
            if t not in (LINEAR, FULL):
                raise ConfigError(f"layer_types[{i}]: unknown layer type {t!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "num_key_value_heads: must divide num_attention_heads "
                f"({self.num_attention_heads} % {self.num_key_value_heads} != 0)"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                "linear_num_key_heads: must divide linear_num_value_heads "
                f"({self.linear_num_value_heads} % {self.linear_num_key_heads} != 0)"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok: {self.num_experts_per_tok} exceeds "
                f"num_experts {self.num_experts}"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(
                f"partial_rotary_factor: must be in (0, 1], got {self.partial_rotary_factor}"
            )
        if self.rotary_dim % 2:
            raise ConfigError(
                f"partial_rotary_factor: head_dim*factor={self.rotary_dim} must be even"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if self.attention_bias:
            raise ConfigError("attention_bias: true is not supported by Qwen3-Next checkpoints")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps: must be positive, got {self.rms_norm_eps}")


def _read_raw(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"config.json: not found at {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config.json: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError("config.json: top level must be an object")
    return raw


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


class _Getter:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw

    def int(self, key: str, default: int | None = None) -> int:
        if key not in self.raw or self.raw[key] is None:
            if default is None:
                raise ConfigError(f"{key}: required key is missing")
            return default
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
