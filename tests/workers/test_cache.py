"""Paged hybrid cache: block pool bookkeeping, block tables, forks, the memory plan."""

from __future__ import annotations

import pytest
import torch

from workers.blocks import NULL_BLOCK, BlockPool, CacheFullError
from workers.cache import HybridCache
from workers.cache_config import GB, CacheConfig, kv_token_bytes, plan_cache, state_bytes
from workers.config import ModelConfig
from workers.make_checkpoint import PRESETS, build_tokenizer, preset_config


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return preset_config("tiny", build_tokenizer())


def budget_for(model: ModelConfig, slots: int, blocks: int, block_size: int = 16) -> float:
    """kv_cache_gb that holds `slots` DeltaNet states and exactly `blocks` KV blocks."""
    used = slots * state_bytes(model, torch.float32)
    used += blocks * block_size * kv_token_bytes(model, torch.float32)
    return (used + 1) / GB


def test_pool_hands_out_blocks_once_and_never_the_null_block():
    pool = BlockPool(5)
    got = [pool.allocate() for _ in range(4)]
    assert sorted(got) == [1, 2, 3, 4] and NULL_BLOCK not in got
    with pytest.raises(CacheFullError, match="all 4 KV blocks are in use"):
        pool.allocate()
    pool.release(got[:2])
    assert pool.num_available == 2
    with pytest.raises(ValueError, match="released more often"):
        pool.release([got[0]])


def test_cached_blocks_are_reused_by_hash_and_evicted_tail_first():
    evicted = []
    pool = BlockPool(5, on_evict=evicted.append)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    for block, h in ((a, b"A"), (b, b"B"), (c, b"C")):
        assert pool.register(block, h)
    assert not pool.register(pool.allocate(), b"A")  # same content elsewhere: stays private
    pool.release([a, b, c])  # a sequence's blocks in order: its tail is evicted first
    assert pool.num_available == 3 and pool.lookup(b"B") == b
    pool.incref(b)  # a prefix hit takes a cached block back into use
    assert pool.num_available == 2
    pool.allocate()  # no free block left: evict the least recently released cached block
    pool.allocate()
    assert evicted == [b"C", b"A"] and pool.lookup(b"C") is None and pool.lookup(b"B") == b


def test_reserve_takes_blocks_all_or_nothing_and_free_returns_them(tiny):
    cache = HybridCache(
        tiny,
        2,
        cache_config=CacheConfig(kv_cache_gb=budget_for(tiny, 2, 6), prefix_caching=False),
        max_model_len=32,
    )
    assert cache.pool.num_usable == 6
    s = cache.allocate()
    cache.reserve(s, 40)  # 3 blocks of 16
    assert len(cache.tables[s]) == 3 and cache.block_table[s, :3].tolist() == cache.tables[s]
    assert cache.blocks_needed(s, 0) == 0
    cache.lengths[s] = 40
    assert cache.blocks_needed(s, 8) == 0 and cache.blocks_needed(s, 9) == 1
    t = cache.allocate()
    with pytest.raises(CacheFullError, match="needs 4 more KV blocks, 3 are free"):
        cache.reserve(t, 64)
    assert cache.tables[t] == [] and cache.num_free_blocks == 3
    cache.free(s)
    assert cache.num_free_blocks == 6 and cache.block_table[s].eq(NULL_BLOCK).all()


def test_blocks_are_zeroed_on_first_use_only(tiny):
    cache = HybridCache(
        tiny,
        1,
        cache_config=CacheConfig(kv_cache_gb=budget_for(tiny, 1, 3), prefix_caching=False),
        max_model_len=32,
    )
    layer = tiny.full_layers[0]
    s = cache.allocate()
    cache.reserve(s, 16)
    block = cache.tables[s][0]
    assert cache.k[layer][block].eq(0).all()
    cache.k[layer][block] = 7.0
    cache.free(s)
    s = cache.allocate()
    cache.reserve(s, 48)
    assert cache.k[layer][block].eq(7.0).all()  # recycled, not re-zeroed (will be overwritten)
    assert all(cache.k[layer][b].eq(0).all() for b in cache.tables[s] if b != block)


def test_fork_shares_full_blocks_and_copies_the_partial_one(tiny):
    cache = HybridCache(
        tiny,
        2,
        cache_config=CacheConfig(kv_cache_gb=budget_for(tiny, 2, 8), prefix_caching=False),
        max_model_len=32,
    )
    layer, lin = tiny.full_layers[0], tiny.linear_layers[0]
    a = cache.allocate()
    cache.reserve(a, 20)
    cache.lengths[a] = 20
    for i, block in enumerate(cache.tables[a]):
        cache.k[layer][block] = float(i + 1)
    cache.ssm[lin][a] = 3.0
    b = cache.allocate()
    cache.fork(a, b)
    assert cache.tables[b][0] == cache.tables[a][0] and cache.pool.refcount[cache.tables[a][0]] == 2
    assert cache.tables[b][1] != cache.tables[a][1]
    assert cache.k[layer][cache.tables[b][1]].eq(2.0).all() and cache.lengths[b] == 20
    assert cache.ssm[lin][b].eq(3.0).all()
    cache.free(a)
    assert cache.pool.refcount[cache.tables[b][0]] == 1


def test_plan_splits_the_budget_and_reports_it(tiny):
    cfg = CacheConfig(kv_cache_gb=budget_for(tiny, 4, 100), prefix_caching=False)
    plan = plan_cache(tiny, torch.float32, 4, 1024, cfg)
    assert plan.num_blocks == 101 and plan.kv_tokens == 1600 and plan.num_snapshots == 0
    text = plan.describe()
    assert "KV for 1,600 tokens" in text and "4 sequences x" in text
    cfg = CacheConfig(kv_cache_gb=budget_for(tiny, 4, 100), prefix_snapshot_fraction=0.2)
    with_snapshots = plan_cache(tiny, torch.float32, 4, 1024, cfg)
    assert with_snapshots.num_snapshots > 0 and with_snapshots.num_blocks < 101
    default = plan_cache(tiny, torch.float32, 3, 1000, CacheConfig())
    assert default.kv_tokens >= 3 * 1000


def test_a_budget_too_small_for_one_sequence_names_the_setting(tiny):
    cfg = CacheConfig(kv_cache_gb=budget_for(tiny, 4, 10), prefix_caching=False)
    with pytest.raises(ValueError, match=r"kv_cache_gb=.*holds KV for 160 tokens.*4096 tokens"):
        plan_cache(tiny, torch.float32, 4, 4096, cfg)
    with pytest.raises(ValueError, match="kv_block_size: must be a power of two"):
        CacheConfig(kv_block_size=12)
    with pytest.raises(ValueError, match="prefix_snapshot_every: must be a positive multiple"):
        CacheConfig(prefix_snapshot_every=100)
    with pytest.raises(ValueError, match="kv_cache_gb or kv_cache_fraction, not both"):
        CacheConfig(kv_cache_gb=1.0, kv_cache_fraction=0.5)


def test_the_real_model_state_sizes_match_the_issue():
    """~80 MB of DeltaNet state per sequence in fp32 for Qwen3-Next (36 linear layers)."""
    real = ModelConfig(
        **{k: v for k, v in PRESETS["tiny"].items() if k not in ("layer_types",)}
        | dict(hidden_size=2048, num_hidden_layers=48, layer_types=(("linear_attention",) * 3
               + ("full_attention",)) * 12, linear_num_value_heads=32,
               linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
               num_attention_heads=16, num_key_value_heads=2, head_dim=256, vocab_size=151936,
               num_experts=512, num_experts_per_tok=10, max_position_embeddings=262144)
    )  # fmt: skip
    assert 75e6 < state_bytes(real, torch.float32) < 80e6
    assert kv_token_bytes(real, torch.bfloat16) == 12 * 2 * 2 * 256 * 2
