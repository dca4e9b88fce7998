"""Scheduling over the paged cache: admission by free blocks, preemption of the youngest
request when blocks run out (resumed later from its tokens, never failed)."""

from __future__ import annotations

import pytest

from tests.workers.test_cache import budget_for
from workers.cache_config import CacheConfig
from workers.dense_worker import DenseWorker
from workers.engine import Engine
from workers.make_checkpoint import make_checkpoint
from workers.requests import EngineConfig, RequestError
from workers.runner import ModelRunner
from workers.sampler import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=24, temperature=0.9, seed=3, ignore_eos=True)
MAX_LEN = 128


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny", seed=4)
    return DenseWorker(str(path), engine_config=EngineConfig(max_num_seqs=1))


def engine(
    worker: DenseWorker, blocks: int | None = None, prefix: bool = False, **limits
) -> Engine:
    limits = {"max_model_len": MAX_LEN} | limits
    config = EngineConfig(**limits)
    seqs = config.max_num_seqs
    cache = CacheConfig(
        kv_cache_gb=budget_for(worker.config, seqs, blocks) if blocks else None,
        prefix_caching=prefix,
    )
    runner = ModelRunner(worker.engine.runner.lm, worker.experts, seqs, cache_config=cache,
                         max_model_len=config.max_model_len)  # fmt: skip
    return Engine(runner, config, worker.tokenizer)


def prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 1000 + 1 for j in range(30 + 9 * i)] for i in range(n)]


def run_all(e: Engine, ps, params) -> dict[str, list[int]]:
    for i, p in enumerate(ps):
        e.add_request(f"r{i}", p, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(ps))}
    finished = set()
    while e.has_work():
        for out in e.step():
            assert out.error is None
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finished.add(out.request_id)
    assert finished == set(tokens)
    return tokens


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_running_out_of_blocks_preempts_and_every_request_finishes_exactly(worker, params):
    ps = prompts(5)  # 30..66 prompt tokens + 24 output: 4-6 blocks each, 26 in all
    roomy = run_all(engine(worker, max_num_seqs=5), ps, params)
    tight = engine(worker, blocks=12, max_num_seqs=5, max_num_batched_tokens=256)
    assert run_all(tight, ps, params) == roomy
    assert tight.scheduler.preemptions > 0
    assert tight.runner.cache.num_free_blocks == 12 and tight.num_free_slots == 5


def test_admission_waits_for_blocks_even_with_free_slots(worker):
    e = engine(worker, blocks=8, max_num_seqs=4)
    long = [5] * 100  # 7 blocks with its first output token
    e.add_request("a", long, GREEDY)
    e.add_request("b", long, GREEDY)
    e.step()
    assert [r.request_id for r in e.running] == ["a"] and len(e.waiting) == 1
    assert e.num_free_slots == 3


def test_the_youngest_request_is_preempted_first(worker):
    e = engine(worker, blocks=7, max_num_seqs=3, max_num_batched_tokens=256, max_model_len=80)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    e.add_request("old", [3] * 31, params)  # 2 blocks, grows to 5
    e.add_request("young", [4] * 31, params)
    e.step()
    assert {r.request_id for r in e.running} == {"old", "young"}
    while not e.waiting:
        e.step()
    assert e.waiting[0].request_id == "young" and e.waiting[0].slot is None
    assert [r.request_id for r in e.running] == ["old"]


def test_a_request_larger_than_the_whole_cache_is_rejected(worker):
    """(The memory plan holds one max_model_len sequence; this guards a runner built for a
    shorter length than its engine allows.)"""
    cache = CacheConfig(kv_cache_gb=budget_for(worker.config, 1, 4), prefix_caching=False)
    runner = ModelRunner(worker.engine.runner.lm, worker.experts, 1, cache_config=cache,
                         max_model_len=64)  # fmt: skip
    e = Engine(runner, EngineConfig(max_num_seqs=1, max_model_len=MAX_LEN), worker.tokenizer)
    with pytest.raises(RequestError, match="exceeds the KV cache of 64 tokens") as exc:
        e.add_request("x", [1] * 50, SamplingParams(max_tokens=20))
    assert exc.value.kind == "too_long"
