"""n > 1: the prompt is computed once, the other choices fork its hybrid state, and choice i
draws exactly what an independent request with seed + i draws."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tests.workers.test_cache import budget_for
from workers.async_engine import AsyncEngine
from workers.cache_config import CacheConfig
from workers.dense_worker import DenseWorker
from workers.engine import Engine
from workers.make_checkpoint import make_checkpoint
from workers.requests import EngineConfig, RequestError, ResumeState
from workers.runner import ModelRunner
from workers.sampler import SamplingError, SamplingParams

PROMPT = [(7 * j) % 900 + 3 for j in range(45)]  # 2 full blocks + a partial one
PARAMS = SamplingParams(n=4, max_tokens=16, temperature=1.0, seed=21, ignore_eos=True,
                        logprobs=True)  # fmt: skip


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny", seed=8)
    return DenseWorker(str(path), engine_config=EngineConfig(max_num_seqs=1))


def engine(worker, blocks: int | None = None, **limits) -> Engine:
    config = EngineConfig(**({"max_model_len": 128, "max_num_seqs": 8} | limits))
    gb = budget_for(worker.config, config.max_num_seqs, blocks) if blocks else None
    cache = CacheConfig(kv_cache_gb=gb, prefix_caching=False)
    runner = ModelRunner(worker.engine.runner.lm, worker.experts, config.max_num_seqs,
                         cache_config=cache, max_model_len=config.max_model_len)  # fmt: skip
    return Engine(runner, config, worker.tokenizer)


def independent(worker, params: SamplingParams) -> list:
    """Each choice as its own n=1 request with seed + index."""
    singles = [dataclasses.replace(params, n=1, seed=params.seed + i) for i in range(params.n)]
    return engine(worker).generate([PROMPT] * params.n, singles)


def test_n_choices_equal_independent_requests_with_seed_plus_index(worker):
    e = engine(worker)
    got = e.generate([PROMPT], PARAMS)
    ref = independent(worker, PARAMS)
    assert [o.index for o in got] == [0, 1, 2, 3]
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    # the references prefill together (one 180-token step), the forked request once (45
    # tokens): torch's CPU kernels block by shape, so logprobs may differ by float32 noise
    # (1.5e-5 seen on an Intel AVX-512/AMX machine); a wrong fork differs by far more
    for g, r in zip(got, ref, strict=True):
        assert max(abs(a - b) for a, b in zip(g.logprobs, r.logprobs, strict=True)) < 1e-4
    assert len({tuple(o.token_ids) for o in got}) == 4  # the choices do differ
    assert e.stats.prompt_tokens == len(PROMPT)  # prefilled once, not n times


def test_forks_share_full_prompt_blocks_and_copy_the_partial_one(worker):
    e = engine(worker)
    e.add_request("x", PROMPT, dataclasses.replace(PARAMS, max_tokens=2))
    e.step()  # prefill + fork + first tokens
    choices = e.scheduler.find_all("x")
    tables = [e.runner.cache.tables[r.slot] for r in choices]
    assert len(choices) == 4 and all(t[:2] == tables[0][:2] for t in tables)
    assert len({t[2] for t in tables}) == 4  # each writes its own copy of block 2
    assert all(e.runner.cache.pool.refcount[b] == 4 for b in tables[0][:2])


def test_preempted_choices_resume_exactly(worker):
    params = dataclasses.replace(PARAMS, n=3, max_tokens=40)
    prompts = [PROMPT, PROMPT[:30] + [5] * 20]
    roomy = engine(worker).generate(prompts, params)
    tight = engine(worker, blocks=14, max_num_batched_tokens=128)
    got = tight.generate(prompts, params)
    assert tight.scheduler.preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in roomy]
    assert tight.runner.cache.num_free_blocks == 14


def test_abort_before_the_fork_finishes_every_choice(worker):
    e = engine(worker, max_num_seqs=4)
    e.add_request("a", PROMPT, PARAMS)
    e.abort("a")
    outs = e.step()
    assert sorted(o.index for o in outs) == [0, 1, 2, 3]
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    assert e.num_free_slots == 4 and not e.has_work()


def test_bad_n_is_rejected(worker):
    with pytest.raises(SamplingError, match="n must be >= 1"):
        SamplingParams(n=0)
    with pytest.raises(RequestError, match=r"n \(9\) exceeds the 8 concurrent sequences"):
        engine(worker).add_request("x", PROMPT, dataclasses.replace(PARAMS, n=9))
    with pytest.raises(RequestError, match="resume each choice"):
        engine(worker).add_request("x", PROMPT, PARAMS, ResumeState((1, 2)))


def test_async_engine_streams_every_choice_to_the_end(worker):
    async def run():
        a = AsyncEngine(engine(worker))
        try:
            return [o async for o in a.generate(PROMPT, PARAMS, "x")]
        finally:
            a.shutdown()

    outs = asyncio.run(run())
    finished = sorted(o.index for o in outs if o.finished)
    assert finished == [0, 1, 2, 3]
    tokens = {i: [t for o in outs if o.index == i for t in o.token_ids] for i in range(4)}
    ref = independent(worker, PARAMS)
    assert [tokens[i] for i in range(4)] == [o.token_ids for o in ref]
