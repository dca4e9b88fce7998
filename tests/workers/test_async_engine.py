"""AsyncEngine streaming: a consumer slower than the steps gets merged deltas."""

import asyncio

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
