"""How big the hybrid cache is: settings (from the cluster YAML) -> a memory plan, up front.

The cache holds, within one memory budget:
    slots      max_num_seqs DeltaNet states (conv + recurrent, fixed size per sequence)
    snapshots  DeltaNet states kept at prefix boundaries for the prefix cache
    KV blocks  block_size tokens of keys and values in every full-attention layer

Budget: `kv_cache_gb`, or `kv_cache_fraction` of the memory available at start, or (neither) what
max_num_seqs full-length sequences need, capped at half the available memory. Pool memory is
reserved virtually and touched as blocks are first used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from workers.config import ModelConfig
from workers.kv_window import KVWindow

GB = 1 << 30
KV_EVICTION = ("none", "sink_window")


@dataclass(frozen=True)
class CacheConfig:
    kv_block_size: int = 16  # tokens per KV block
    kv_cache_gb: float | None = None
    kv_cache_fraction: float | None = None
    prefix_caching: bool = True
    prefix_snapshot_every: int = 512  # tokens between a prompt's DeltaNet snapshots
    prefix_snapshot_fraction: float = 0.1  # share of the budget kept for snapshots
    kv_eviction: str = "none"  # "sink_window": attention keeps kv_sink_tokens + the last
    kv_sink_tokens: int = 64  # kv_window_tokens of each sequence (opt-in, inexact)
    kv_window_tokens: int = 2048

    def __post_init__(self) -> None:
        rules = [
            (self.kv_block_size > 0 and self.kv_block_size & (self.kv_block_size - 1) == 0,
             "kv_block_size", "a power of two"),
            (self.kv_cache_gb is None or self.kv_cache_gb > 0, "kv_cache_gb", "> 0"),
            (self.kv_cache_fraction is None or 0 < self.kv_cache_fraction <= 0.95,
             "kv_cache_fraction", "in (0, 0.95]"),
            (self.prefix_snapshot_every > 0
             and self.prefix_snapshot_every % self.kv_block_size == 0, "prefix_snapshot_every",
             f"a positive multiple of kv_block_size ({self.kv_block_size})"),
            (0 < self.prefix_snapshot_fraction < 1, "prefix_snapshot_fraction", "in (0, 1)"),
            (self.kv_eviction in KV_EVICTION, "kv_eviction", f"one of {list(KV_EVICTION)}"),
            (self.kv_sink_tokens >= 0, "kv_sink_tokens", ">= 0"),
            (self.kv_window_tokens >= self.kv_block_size, "kv_window_tokens",
             f">= kv_block_size ({self.kv_block_size})"),
        ]  # fmt: skip
        for ok, name, rule in rules:
            if not ok:
                raise ValueError(f"{name}: must be {rule}, got {getattr(self, name)!r}")
        if self.kv_cache_gb is not None and self.kv_cache_fraction is not None:
            raise ValueError("kv_cache_gb: set kv_cache_gb or kv_cache_fraction, not both")

    @property
    def window(self) -> KVWindow:
        if self.kv_eviction == "none":
            return KVWindow(self.kv_block_size)
        return KVWindow(self.kv_block_size, self.kv_sink_tokens, self.kv_window_tokens)

    @property
    def caches_prefixes(self) -> bool:
        """Sequences under an eviction policy never share exact-cache blocks."""
        return self.prefix_caching and self.window.exact


@dataclass(frozen=True)
class CachePlan:
    num_slots: int
    num_blocks: int  # including the null block
    block_size: int
    num_snapshots: int
    state_bytes: int  # one sequence's DeltaNet state
    kv_token_bytes: int  # one token's keys + values over all full-attention layers
    budget_bytes: int

    @property
    def kv_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def describe(self) -> str:
        return (
            f"hybrid cache {size(self.budget_bytes)}: KV for {self.kv_tokens:,} tokens "
            f"({self.num_blocks - 1:,} blocks of {self.block_size}, "
            f"{size(self.kv_token_bytes)}/token), {self.num_slots} sequences x "
            f"{size(self.state_bytes)} DeltaNet state, {self.num_snapshots} prefix snapshots"
        )


def state_bytes(model: ModelConfig, dtype: torch.dtype) -> int:
    """Conv state (compute dtype) + recurrent state (fp32) of one sequence, all linear layers."""
    conv = model.conv_dim * (model.linear_conv_kernel_dim - 1) * _itemsize(dtype)
    ssm = model.linear_num_value_heads * model.linear_key_head_dim * model.linear_value_head_dim * 4
    return len(model.linear_layers) * (conv + ssm)


def kv_token_bytes(model: ModelConfig, dtype: torch.dtype) -> int:
    per_layer = 2 * model.num_key_value_heads * model.head_dim * _itemsize(dtype)
    return len(model.full_layers) * per_layer


def plan_cache(
    model: ModelConfig,
    dtype: torch.dtype,
    max_seqs: int,
    max_model_len: int,
    config: CacheConfig,
    max_prefill_chunk: int = 512,
) -> CachePlan:
    """Split the budget; ValueError naming the setting when it cannot hold one sequence of
    max_model_len tokens."""
    max_len = min(max_model_len, model.max_position_embeddings)
    state, token = state_bytes(model, dtype), kv_token_bytes(model, dtype)
    block = token * config.kv_block_size
    seq_blocks = config.window.max_blocks(max_len, max_prefill_chunk)
    share = config.prefix_snapshot_fraction if config.caches_prefixes else 0.0
    available = available_memory()
    if config.kv_cache_gb is not None:
        budget = int(config.kv_cache_gb * GB)
    elif config.kv_cache_fraction is not None:
        budget = int(config.kv_cache_fraction * available)
    else:  # what max_seqs full-length sequences need, at most half the memory available
        needed = max_seqs * state + max_seqs * seq_blocks * block
        budget = min(int(needed / (1 - share)), available // 2)
    slots = max_seqs * state
    snapshots = int(share * budget) // state if share else 0
    blocks = (budget - slots - snapshots * state) // block
    if blocks < seq_blocks:
        what = (
            f"kv_cache_gb={config.kv_cache_gb}"
            if config.kv_cache_gb is not None
            else f"kv_cache_fraction={config.kv_cache_fraction}"
            if config.kv_cache_fraction is not None
            else f"half of the {available / GB:.1f} GiB available"
        )
        raise ValueError(
            f"kv_cache: a budget of {size(budget)} ({what}) holds KV for "
            f"{max(blocks, 0) * config.kv_block_size} tokens after {max_seqs} DeltaNet states of "
            f"{size(state)}; one sequence of {max_len} tokens needs {size(seq_blocks * block)} "
            f"of KV (raise the budget, or lower max_model_len or max_num_seqs)"
        )
    return CachePlan(max_seqs, blocks + 1, config.kv_block_size, snapshots, state, token, budget)


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (MemAvailable), or total memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def size(nbytes: float) -> str:
    for unit, scale in (("GiB", GB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()
