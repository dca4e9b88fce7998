"""Read Qwen3-Next Hugging Face safetensors checkpoints: dense weights and selected experts.

A checkpoint directory holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` whose `weight_map` names the shard of every key. Shards are
opened lazily with `safetensors.safe_open`, so only the bytes of the tensors asked for are read.

Routed experts come in two layouts, detected per layer:
    per-expert  `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`  (published
                checkpoints and what transformers' `save_pretrained` writes)
    fused       `model.layers.{l}.mlp.experts.gate_up_proj` [E, 2I, H] and `.down_proj` [E, H, I]
                (the transformers 5 in-memory layout); only the selected experts' rows are read.
`mtp.*` (multi-token-prediction) tensors are ignored.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from workers.config import LINEAR, ModelConfig
from workers.experts import ExpertWeights, lossless_pack, pack_layer

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROGRESS_MIN_TENSORS = 64
_EXPERT_KEY = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.")


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing or malformed; the message names the key or file."""


# --------------------------------------------------------------------------------- schema
def expected_dense_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every non-routed-expert tensor of the model and its shape (lm_head omitted when tied)."""
    c, h = config, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for layer, kind in enumerate(c.layer_types):
        p = f"model.layers.{layer}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        mixer = _linear_attn_shapes(c) if kind == LINEAR else _full_attn_shapes(c)
        shapes.update({f"{p}.{name}": shape for name, shape in mixer.items()})
        shapes.update({f"{p}.mlp.{name}": shape for name, shape in _moe_dense_shapes(c).items()})
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


def _linear_attn_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    nv, h = c.linear_num_value_heads, c.hidden_size
    return {
        "linear_attn.in_proj_qkvz.weight": (2 * c.linear_key_dim + 2 * c.linear_value_dim, h),
        "linear_attn.in_proj_ba.weight": (2 * nv, h),
        "linear_attn.conv1d.weight": (c.conv_dim, 1, c.linear_conv_kernel_dim),
        "linear_attn.dt_bias": (nv,),
        "linear_attn.A_log": (nv,),
        "linear_attn.norm.weight": (c.linear_value_head_dim,),
        "linear_attn.out_proj.weight": (h, c.linear_value_dim),
    }


def _full_attn_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d = c.hidden_size, c.head_dim
    return {
        "self_attn.q_proj.weight": (2 * c.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (c.num_key_value_heads * d, h),
        "self_attn.v_proj.weight": (c.num_key_value_heads * d, h),
        "self_attn.o_proj.weight": (h, c.num_attention_heads * d),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
    }


def _moe_dense_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, inter = c.hidden_size, c.shared_expert_intermediate_size
    return {
        "gate.weight": (c.num_experts, h),
        "shared_expert.gate_proj.weight": (inter, h),
        "shared_expert.up_proj.weight": (inter, h),
        "shared_expert.down_proj.weight": (h, inter),
        "shared_expert_gate.weight": (1, h),
    }


# --------------------------------------------------------------------------------- reader
class CheckpointReader:
    """Lazy, key-addressed access to the safetensors files of a checkpoint directory."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.model_dir}")
        if not (self.model_dir / "config.json").is_file():
            raise CheckpointError(f"config.json: not found in {self.model_dir}")
        self._handles: dict[str, Any] = {}
        self._file_keys: dict[str, set[str]] = {}
        self._weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{INDEX_FILE}: malformed ({exc!r}) in {index}") from exc
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{INDEX_FILE}: weight_map must be an object in {index}")
            return {str(k): str(v) for k, v in weight_map.items()}
        if (self.model_dir / SINGLE_FILE).is_file():
            return dict.fromkeys(self._open(SINGLE_FILE).keys(), SINGLE_FILE)
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.model_dir}")

    def _open(self, filename: str) -> Any:
        if filename not in self._handles:
            path = self.model_dir / filename
            if not path.is_file():
                raise CheckpointError(f"shard file {filename} not found in {self.model_dir}")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"cannot open shard file {path}: {exc}") from exc
            self._handles[filename] = handle
            self._file_keys[filename] = set(handle.keys())
        return self._handles[filename]

    def _handle_for(self, key: str) -> Any:
        filename = self._weight_map.get(key)
        if filename is None:
            raise CheckpointError(f"{key}: not in checkpoint {self.model_dir}")
        handle = self._open(filename)
        if key not in self._file_keys[filename]:
            raise CheckpointError(f"{key}: listed in {INDEX_FILE} but missing from {filename}")
        return handle

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self._weight_map

    def filename(self, key: str) -> str:
        self._handle_for(key)
        return self._weight_map[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle_for(key).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._handle_for(key).get_tensor(key)

    def get_slice(self, key: str) -> Any:
        """safetensors' lazy slice: index it (`s[a:b]`) to read only those rows."""
        return self._handle_for(key).get_slice(key)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
        self._file_keys.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def _opened(source: str | Path | CheckpointReader) -> Iterator[CheckpointReader]:
    """Use a caller's reader as is; open (and finally close) one for a path."""
    if isinstance(source, CheckpointReader):
        yield source
    else:
        with CheckpointReader(source) as reader:
            yield reader


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    disable = not enabled or total < PROGRESS_MIN_TENSORS
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=disable)


def _check_shape(reader: CheckpointReader, key: str, expected: tuple[int, ...]) -> None:
    if key not in reader:
        raise CheckpointError(f"{key}: missing from checkpoint (expected shape {expected})")
    actual = reader.shape(key)
    if actual != expected:
        raise CheckpointError(f"{key}: expected shape {expected}, got {actual}")


# ---------------------------------------------------------------------------- dense weights
def load_dense_weights(
    model_dir: str | Path | CheckpointReader,
    config: ModelConfig,
    dtype: torch.dtype | None = torch.float32,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """All non-routed-expert tensors (the keys of `expected_dense_shapes`), cast to `dtype`
    (None: as stored)."""
    schema = expected_dense_shapes(config)
    out: dict[str, torch.Tensor] = {}
    with _opened(model_dir) as reader, _progress(len(schema), "dense weights", progress) as bar:
        _log_extra_keys(reader, schema)
        for key, shape in schema.items():
            _check_shape(reader, key, shape)
            tensor = reader.get(key)
            out[key] = tensor if dtype is None else tensor.to(dtype)
            bar.update()
    return out


def _log_extra_keys(reader: CheckpointReader, schema: dict[str, tuple[int, ...]]) -> None:
    extra = [k for k in reader.keys() if k not in schema and not _EXPERT_KEY.match(k)]
    mtp = [k for k in extra if k.startswith("mtp.")]
    if mtp:
        log.info("skipping %d mtp.* tensors (multi-token prediction is not used)", len(mtp))
    other = [k for k in extra if not k.startswith("mtp.")]
    if other:
        log.warning("ignoring %d unexpected tensors, e.g. %s", len(other), other[0])


# --------------------------------------------------------------------------- expert weights
def load_expert_weights(
    model_dir: str | Path | CheckpointReader,
    config: ModelConfig,
    experts: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    storage: str | None = None,
    *,
    assignment: Mapping[int, Sequence[int]] | None = None,
) -> ExpertWeights:
    """Routed experts, reading only their bytes. Either `assignment` ({layer: expert ids}: a
    different set per layer, e.g. a shard's holdings) or `experts` (default all) in every one
    of `layers` (default all). Row i of layer l's w13/w2 belongs to the i-th id asked for l.
    `storage` (float32 / bfloat16 / int8 / int4, workers/quant.py) packs each layer as it is
    read; "lossless" packs a layer as bf16 only where that changes no value (workers.experts.
    lossless_pack)."""
    if assignment is not None and (experts is not None or layers is not None):
        raise CheckpointError("pass either assignment or experts/layers, not both")
    if assignment is None:
        ids = _validate_ids("expert", experts, config.num_experts)
        layer_ids = _validate_ids("layer", layers, config.num_hidden_layers)
        wanted = dict.fromkeys(layer_ids, ids)
    else:
        _validate_ids("layer", list(assignment), config.num_hidden_layers)
        wanted = {
            int(layer): _validate_ids("expert", ids, config.num_experts)
            for layer, ids in sorted(assignment.items())
        }
    w13: dict[int, torch.Tensor] = {}
    w2: dict[int, torch.Tensor] = {}
    with _opened(model_dir) as reader:
        fused = {layer: _is_fused(reader, layer) for layer in wanted}
        total = sum(2 if fused[layer] else 3 * len(ids) for layer, ids in wanted.items())
        with _progress(total, "expert weights", progress) as bar:
            for layer, ids in wanted.items():
                load = _load_fused if fused[layer] else _load_per_expert
                a, b = load(reader, config, layer, ids, dtype, bar)
                if storage == "lossless":
                    a, b = lossless_pack(a, b)
                elif storage is not None:
                    a, b = pack_layer(a, b, storage)
                w13[layer], w2[layer] = a, b
    return ExpertWeights(wanted, w13, w2)


def _validate_ids(what: str, ids: Sequence[int] | None, count: int) -> tuple[int, ...]:
    if ids is None:
        return tuple(range(count))
    out = tuple(int(i) for i in ids)
    for i in out:
        if not 0 <= i < count:
            raise CheckpointError(f"{what} id {i} out of range [0, {count})")
    if len(set(out)) != len(out):
        raise CheckpointError(f"{what} ids contain duplicates: {list(out)}")
    return out


def _is_fused(reader: CheckpointReader, layer: int) -> bool:
    return f"model.layers.{layer}.mlp.experts.gate_up_proj" in reader


_Loaded = tuple[torch.Tensor, torch.Tensor]


def _load_per_expert(
    reader: CheckpointReader,
    c: ModelConfig,
    layer: int,
    ids: tuple[int, ...],
    dtype: torch.dtype,
    bar: tqdm,
) -> _Loaded:
    h, inter = c.hidden_size, c.moe_intermediate_size
    w13 = torch.empty(len(ids), 2 * inter, h, dtype=dtype)
    w2 = torch.empty(len(ids), h, inter, dtype=dtype)
    for row, e in enumerate(ids):
        p = f"model.layers.{layer}.mlp.experts.{e}"
        for proj, dst in (("gate", w13[row, :inter]), ("up", w13[row, inter:]), ("down", w2[row])):
            key = f"{p}.{proj}_proj.weight"
            _check_shape(reader, key, tuple(dst.shape))
            dst.copy_(reader.get(key))
            bar.update()
    return w13, w2


def _load_fused(
    reader: CheckpointReader,
    c: ModelConfig,
    layer: int,
    ids: tuple[int, ...],
    dtype: torch.dtype,
    bar: tqdm,
) -> _Loaded:
    h, inter, n = c.hidden_size, c.moe_intermediate_size, c.num_experts
    p = f"model.layers.{layer}.mlp.experts"
    out = []
    for name, shape in (("gate_up_proj", (n, 2 * inter, h)), ("down_proj", (n, h, inter))):
        key = f"{p}.{name}"
        _check_shape(reader, key, shape)
        sl = reader.get_slice(key)
        parts = [sl[a:b] for a, b in _runs(ids)]
        rows = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else sl[:0]
        out.append(rows.to(dtype))
        bar.update()
    return out[0], out[1]


def _runs(ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Maximal runs of consecutive ids, in order, as half-open [a, b) ranges."""
    i = 0
    while i < len(ids):
        j = i + 1
        while j < len(ids) and ids[j] == ids[j - 1] + 1:
            j += 1
        yield ids[i], ids[j - 1] + 1
        i = j
