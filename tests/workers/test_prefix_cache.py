"""Exact prefix caching: outputs with a cache hit equal those without (greedy tokens
identical, logprobs within 1e-5), across chunked prefill, preemption, eviction and the
distributed expert path; DeltaNet snapshots equal an uncached run's state at the boundary."""

from __future__ import annotations

import pytest
import torch

from tests.workers.test_cache import budget_for
from workers.cache_config import CacheConfig
from workers.checkpoint import load_expert_weights
from workers.dense_worker import DenseWorker
from workers.engine import Engine
from workers.make_checkpoint import make_checkpoint
from workers.prefix_cache import chain_hashes
from workers.requests import EngineConfig, RequestOutput
from workers.runner import ModelRunner
from workers.sampler import SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)
LOGPROB_TOL = 1e-5
SYSTEM = [(11 * j) % 997 + 1 for j in range(150)]  # a shared "system prompt + tools" prefix


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny", seed=6))


@pytest.fixture(scope="module")
def worker(model_dir):
    return DenseWorker(model_dir, engine_config=EngineConfig(max_num_seqs=1))


def engine(worker, experts=None, prefix=True, blocks=None, every=32, **limits) -> Engine:
    config = EngineConfig(**({"max_model_len": 512, "max_num_seqs": 4} | limits))
    seqs = config.max_num_seqs
    gb = budget_for(worker.config, seqs, blocks) * 1.25 if blocks else None
    cache = CacheConfig(kv_cache_gb=gb, prefix_caching=prefix, prefix_snapshot_every=every,
                        prefix_snapshot_fraction=0.2)  # fmt: skip
    runner = ModelRunner(worker.engine.runner.lm, experts or worker.experts, seqs,
                         cache_config=cache, max_model_len=config.max_model_len)  # fmt: skip
    return Engine(runner, config, worker.tokenizer)


def suffix(i: int, n: int) -> list[int]:
    return [(37 * i + 5 * j) % 991 + 3 for j in range(n)]


def run(e: Engine, prompts: list[list[int]], params=PARAMS) -> list[RequestOutput]:
    """One request at a time (so later ones can hit what earlier ones cached)."""
    return [e.generate([p], params)[0] for p in prompts]


def assert_same(got: list[RequestOutput], ref: list[RequestOutput]) -> None:
    for g, r in zip(got, ref, strict=True):
        assert g.token_ids == r.token_ids
        diff = max(abs(a - b) for a, b in zip(g.logprobs, r.logprobs, strict=True))
        assert diff <= LOGPROB_TOL, diff


AGENT = [SYSTEM + suffix(1, 40), SYSTEM + suffix(1, 40) + suffix(2, 30), SYSTEM, SYSTEM + [5]]


def test_hits_reuse_the_prefix_and_change_nothing(worker):
    ref = run(engine(worker, prefix=False), AGENT)
    e = engine(worker)
    got = run(e, AGENT)
    assert_same(got, ref)
    assert [o.cached_tokens for o in got] == [0, 176, 128, 144]  # deepest snapshot in the prefix
    stats = e.scheduler.prefix.stats()
    assert stats["prefix_cache_hit_tokens"] == 448
    assert stats["prefix_cache_queried_tokens"] == sum(map(len, AGENT))


def test_chunked_prefill_ends_chunks_on_snapshot_boundaries(worker):
    ref = run(engine(worker, prefix=False, max_prefill_chunk=24), AGENT)
    e = engine(worker, max_prefill_chunk=24, every=48)
    ends: list[int] = []  # the first request's cached length after each step
    after_step = e.scheduler.after_step

    def record(work):
        forked = after_step(work)
        ends.extend(w.request.num_computed for w in work if w.request.prompt_ids == AGENT[0])
        return forked

    e.scheduler.after_step = record
    got = run(e, AGENT)
    assert_same(got, ref)
    assert [o.cached_tokens for o in got] == [0, 176, 144, 144]
    assert {48, 96, 144, 176} <= set(ends) and 168 in ends  # 144 + 24, then cut at 176


def test_snapshots_equal_an_uncached_runs_state_at_the_boundary(worker):
    e = engine(worker, every=64)
    prompt = SYSTEM + suffix(3, 90)
    run(e, [prompt])
    prefix = e.scheduler.prefix
    hashes = chain_hashes(prompt, 16, prefix.salt)
    boundaries = [b for b in range(16, len(prompt), 16) if hashes[b // 16 - 1] in prefix.rows]
    assert boundaries == [64, 128, 192, 224]  # every 64 tokens, and the last before the end
    runner = ModelRunner(worker.engine.runner.lm, worker.experts, 1)
    slot = runner.allocate()
    done = 0
    for b in boundaries:  # plain prefill up to each boundary, no chunk cut at the others
        runner.step([(slot, prompt[done:b])])
        done = b
        row = prefix.rows[hashes[b // 16 - 1]]
        for layer in prefix.ssm:
            torch.testing.assert_close(prefix.ssm[layer][row], runner.cache.ssm[layer][slot],
                                       atol=1e-5, rtol=1e-5)  # fmt: skip
            torch.testing.assert_close(prefix.conv[layer][row], runner.cache.conv[layer][slot])


def test_hits_survive_preemption(worker):
    prompts = [SYSTEM + suffix(i, 20 + 7 * i) for i in range(4)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=True)
    ref = engine(worker, prefix=False).generate(prompts, params)
    e = engine(worker, blocks=22, max_num_batched_tokens=128, max_model_len=256)
    assert_same(run(e, prompts[:1], params), ref[:1])  # caches SYSTEM
    got = e.generate(prompts, params)  # all at once: they share SYSTEM and fight for blocks
    assert_same(got, ref)
    assert e.scheduler.preemptions > 0
    assert all(o.cached_tokens >= 128 for o in got)


def test_lru_eviction_keeps_blocks_and_snapshots_within_their_budget(worker):
    e = engine(worker, blocks=40, max_num_seqs=2, max_model_len=256)
    prompts = [suffix(i, 100) for i in range(8)]  # distinct: each fills and leaves 7 blocks
    ref = run(engine(worker, prefix=False, max_num_seqs=2), prompts[:2])
    run(e, prompts)
    cache, prefix = e.runner.cache, e.scheduler.prefix
    assert cache.pool.evictions > 0 and len(prefix.rows) <= cache.plan.num_snapshots
    assert len(cache.pool.by_hash) <= cache.pool.num_usable
    assert prefix.rows.keys() <= cache.pool.by_hash.keys()  # a block's eviction drops its snapshot
    again = run(e, prompts[:2])  # evicted long ago: recomputed, still exact
    assert_same(again, ref)
    assert [o.cached_tokens for o in again] == [0, 0]


class _Shards:
    """The tiny model's experts on in-process gRPC shard servers (as tests/router does)."""

    def __init__(self, model_dir: str, config, num_shards: int) -> None:
        from router.placement import PlacementTable
        from workers.expert_shard import start_expert_server

        table = PlacementTable.contiguous(config.num_hidden_layers, config.num_experts, num_shards)
        self.servers, addresses = [], {}
        for spec in table.shards:
            weights = load_expert_weights(model_dir, config, assignment=spec.assignment())
            server, _ = start_expert_server(weights, shard_id=spec.shard_id)
            self.servers.append(server)
            addresses[spec.shard_id] = server.address
        self.table = table.with_addresses(addresses)

    def close(self) -> None:
        for server in self.servers:
            server.stop(None)


def test_hits_are_exact_on_the_distributed_expert_path(worker, model_dir):
    from router.client import RemoteExpertBackend

    shards = _Shards(model_dir, worker.config, 2)
    try:
        with RemoteExpertBackend(shards.table) as remote:
            ref = run(engine(worker, experts=remote, prefix=False), AGENT[:2])
            got = run(engine(worker, experts=remote), AGENT[:2])
    finally:
        shards.close()
    assert_same(got, ref)
    assert got[1].cached_tokens == 176


def test_each_conversations_deepest_snapshot_outlives_shallower_ones(worker):
    """Interleaved agent conversations with room for few snapshots: a deeper snapshot of a
    prompt makes its shallower ones the first to evict, so every conversation's next turn
    still resumes from the end of its previous prompt (plain LRU would evict those)."""
    e = engine(worker, blocks=200, max_num_seqs=1)
    prefix = e.scheduler.prefix
    del prefix._free_rows[:-4]  # room for 4 snapshots: 3 conversations and one in the making
    convs = [suffix(10 + i, 20) for i in range(3)]
    resume_at = [0, 0, 0]  # where each conversation's previous prompt's last snapshot is
    for turn in range(4):
        outs = run(e, convs)
        assert [o.cached_tokens for o in outs] == resume_at, turn
        resume_at = [(len(c) - 1) // 16 * 16 for c in convs]
        convs = [c + o.token_ids + suffix(20 + 3 * turn + i, 40)
                 for i, (c, o) in enumerate(zip(convs, outs, strict=True))]  # fmt: skip
    assert len(prefix.rows) <= 4
    assert_same(run(e, convs), run(engine(worker, prefix=False, max_num_seqs=1), convs))
