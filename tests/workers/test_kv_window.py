"""Opt-in KV eviction (attention sinks + recent window): the attention it computes, that it
releases only blocks no later query sees, its per-sequence bound, and that the default stays
exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.cache import HybridCache
from workers.cache_config import CacheConfig
from workers.dense_worker import DenseWorker
from workers.engine import Engine
from workers.kv_window import KVWindow
from workers.layout import StepLayout
from workers.make_checkpoint import make_checkpoint
from workers.requests import EngineConfig
from workers.runner import ModelRunner
from workers.sampler import SamplingParams

SINKS, WINDOW = 16, 48
POLICY = CacheConfig(kv_eviction="sink_window", kv_sink_tokens=SINKS, kv_window_tokens=WINDOW)
PROMPT = [(11 * j) % 900 + 2 for j in range(200)]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny", seed=9)
    return DenseWorker(str(path), engine_config=EngineConfig(max_num_seqs=1))


def runner(worker, cache: CacheConfig, seqs: int = 1) -> ModelRunner:
    return ModelRunner(worker.engine.runner.lm, worker.experts, seqs, cache_config=cache,
                       max_model_len=512)  # fmt: skip


def test_live_blocks_and_masks_follow_the_policy():
    w = KVWindow(16, sinks=16, window=48)
    idx, used = w.live_blocks(torch.tensor([99, 10]), torch.tensor([100, 11]))
    assert idx[0][used[0]].tolist() == [0, 3, 4, 5, 6]  # sink block + keys 52..99
    assert idx[1][used[1]].tolist() == [0]
    assert w.first_dead(100) == 3 and w.first_dead(40) == 1 and w.max_blocks(10_000, 32) == 7
    keys = torch.arange(100)[None, :]
    sees = w.key_mask(keys, torch.ones_like(keys, dtype=torch.bool), torch.tensor([[99]]))[0, 0]
    assert sees.nonzero().flatten().tolist() == list(range(16)) + list(range(52, 100))
    exact = KVWindow(16)
    idx, used = exact.live_blocks(torch.tensor([99]), torch.tensor([100]))
    assert idx[used].tolist() == list(range(7)) and exact.first_dead(10_000) == 0


def test_windowed_attention_equals_dense_attention_with_the_window_mask(worker):
    """One attention layer, prompt fed in chunks with eviction between them, against SDPA
    over every key with the sink + window mask."""
    lm = worker.engine.runner.lm
    layer = lm.config.full_layers[0]
    attn = lm.model.layers[layer].self_attn
    x = torch.randn(len(PROMPT), lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cache = HybridCache(lm.config, 1, cache_config=POLICY, max_model_len=512)
    slot = cache.allocate()
    outs = []
    with torch.inference_mode():
        for lo in range(0, len(PROMPT), 24):
            n = min(24, len(PROMPT) - lo)
            cache.reserve(slot, n)
            outs.append(attn(x[lo : lo + n], StepLayout.build([(slot, n)], cache), cache))
            cache.lengths[slot] += n
            cache.evict(slot)
        got = torch.cat(outs)
        assert sum(b != 0 for b in cache.tables[slot]) <= KVWindow(16, SINKS, WINDOW).max_blocks(
            10_000, 24
        )
        t, d = len(PROMPT), attn.head_dim
        q, gate = attn.q_proj(x).view(t, attn.heads, 2 * d).split(d, dim=-1)
        k = attn.k_norm(attn.k_proj(x).view(t, attn.kv_heads, d))
        v = attn.v_proj(x).view(t, attn.kv_heads, d)
        cos, sin = attn.rope.cos_sin(torch.arange(t), x.dtype)
        q, k = attn.rope.apply(attn.q_norm(q), cos, sin), attn.rope.apply(k, cos, sin)
        pos = torch.arange(t)
        mask = (pos[None, :] <= pos[:, None]) & (
            (pos[None, :] < SINKS) | (pos[None, :] > pos[:, None] - WINDOW)
        )
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
            scale=d**-0.5, enable_gqa=True,
        ).transpose(0, 1)  # fmt: skip
        ref = attn.o_proj((o * torch.sigmoid(gate)).reshape(t, -1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def greedy_logits(r: ModelRunner, chunk: int, steps: int = 40) -> torch.Tensor:
    slot = r.allocate()
    for lo in range(0, len(PROMPT), chunk):
        logits = r.step([(slot, PROMPT[lo : lo + chunk])])
        r.cache.evict(slot)
    out = [logits[0]]
    for _ in range(steps):
        out.append(r.step([(slot, [int(out[-1].argmax())])])[0])
        r.cache.evict(slot)
    return torch.stack(out)


def test_eviction_never_drops_a_key_a_later_query_needs(worker):
    """The windowed model does not depend on how the prompt is chunked (evictions between
    small chunks, none inside one big chunk), and is the exact model when the window covers
    the whole sequence."""
    small = greedy_logits(runner(worker, POLICY), chunk=16)
    whole = greedy_logits(runner(worker, POLICY), chunk=512)
    torch.testing.assert_close(small, whole, atol=1e-4, rtol=1e-4)
    wide = CacheConfig(kv_eviction="sink_window", kv_sink_tokens=0, kv_window_tokens=512)
    exact = greedy_logits(runner(worker, CacheConfig()), chunk=64)
    torch.testing.assert_close(greedy_logits(runner(worker, wide), chunk=64), exact)
    assert (small - exact).abs().max() > 1e-3  # the policy does change the model


def test_engine_under_the_policy_holds_a_bounded_number_of_blocks(worker):
    config = EngineConfig(max_num_seqs=2, max_model_len=512, max_prefill_chunk=32)
    e = Engine(runner(worker, POLICY, seqs=2), config, worker.tokenizer)
    assert e.scheduler.prefix is None  # windowed sequences never share exact-cache blocks
    params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    e.add_request("a", PROMPT, params)
    e.add_request("b", PROMPT[:120], params)
    bound = KVWindow(16, SINKS, WINDOW).max_blocks(10_000, 32)
    most = 0
    while e.has_work():
        e.step()
        pool = e.runner.cache.pool
        most = max(most, pool.num_usable - pool.num_available)
    assert most <= 2 * bound < 2 * (200 + 150) // 16
    assert e.runner.cache.num_free_blocks == e.runner.cache.pool.num_usable
