"""AsyncEngine streaming: a consumer slower than the steps gets merged deltas."""

import asyncio

import pytest

from workers.async_engine import AsyncEngine
from workers.dense_worker import DenseWorker
from workers.make_checkpoint import make_checkpoint
from workers.requests import EngineConfig
from workers.sampler import SamplingParams


def test_slow_consumer_gets_one_merged_delta(tmp_path):
    model = make_checkpoint(tmp_path / "m", preset="tiny", seed=2)
    worker = DenseWorker(str(model), engine_config=EngineConfig(max_num_seqs=2))
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=True)
    (alone,) = worker.generate([[5, 6, 7]], params)

    async def run():
        engine = AsyncEngine(worker.engine)
        outs = []
        try:
            async for out in engine.generate([5, 6, 7], params, "r"):
                outs.append(out)
                while engine.engine.has_work():  # the rest is produced before we pull again
                    await asyncio.sleep(0.01)
        finally:
            engine.shutdown()
        return outs

    outs = asyncio.run(run())
    assert len(outs) == 2 and outs[-1].finished and not outs[0].finished
    assert outs[0].token_ids + outs[1].token_ids == alone.token_ids
    assert outs[0].logprobs + outs[1].logprobs == alone.logprobs
    assert outs[0].text + outs[1].text == alone.text
    assert outs[1].completion_tokens == 9


def test_stream_interval_sends_the_first_token_alone_then_fuller_deltas(tmp_path):
    model = make_checkpoint(tmp_path / "m", preset="tiny", seed=2)
    worker = DenseWorker(str(model), engine_config=EngineConfig(max_num_seqs=2))
    params = SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True, logprobs=True)
    (alone,) = worker.generate([[5, 6, 7]], params)

    async def run(interval: int):
        engine = AsyncEngine(worker.engine, stream_interval=interval)
        try:
            return [out async for out in engine.generate([5, 6, 7], params, f"r{interval}")]
        finally:
            engine.shutdown()

    for interval in (1, 4, 20):
        outs = asyncio.run(run(interval))
        sizes = [len(o.token_ids) for o in outs]  # a consumer behind the steps gets more
        assert sizes[0] == 1 and all(n >= interval for n in sizes[1:-1])
        assert interval != 20 or sizes == [1, 10]  # the last delta goes when it finishes
        assert interval != 4 or len(sizes) <= 4
        assert [o.finished for o in outs] == [False] * (len(sizes) - 1) + [True]
        assert sum((o.token_ids for o in outs), []) == alone.token_ids
        assert sum((o.logprobs for o in outs), []) == alone.logprobs
        assert "".join(o.text for o in outs) == alone.text
    with pytest.raises(ValueError, match="stream_interval"):
        AsyncEngine(worker.engine, stream_interval=0)
