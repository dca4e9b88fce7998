"""The native dense step (workers/native_step.py on the C++ ops of workers/dense_kernel.py)
against the eager torch reference (workers/model.py): same logits within fp32 rounding and
the same greedy tokens, for a batch that mixes prefill spans and decode rows, over paged
blocks, with micro-batch ping-pong, and under the sink + window KV policy."""

from __future__ import annotations

import pytest
import torch

from workers import dense_kernel
from workers.cache_config import CacheConfig
from workers.dense_worker import DenseWorker
from workers.make_checkpoint import make_checkpoint
from workers.requests import EngineConfig
from workers.runner import ModelRunner

pytestmark = pytest.mark.skipif(
    not dense_kernel.supports(torch.float32), reason="the C++ dense ops did not build here"
)
PROMPTS = [[(7 * i + 13 * j) % 900 + 3 for j in range(5 + 23 * i)] for i in range(4)]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny", seed=4)
    return DenseWorker(str(path), engine_config=EngineConfig(max_num_seqs=1))


def runner(worker, native: bool, **kw) -> ModelRunner:
    return ModelRunner(worker.engine.runner.lm, worker.experts, 4, native=native,
                       max_model_len=512, **kw)  # fmt: skip


def greedy(r: ModelRunner, steps: int = 12, chunk: int = 16) -> tuple[torch.Tensor, list]:
    """Prefill the prompts in chunks (later prompts still prefilling while earlier ones
    decode), then decode greedily; every step's logits [steps, V] per sequence and tokens."""
    slots = [r.allocate() for _ in PROMPTS]
    fed = [0] * len(PROMPTS)
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    logits: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    while any(len(t) < steps for t in tokens):
        batch, who = [], []
        for i, (slot, prompt) in enumerate(zip(slots, PROMPTS, strict=True)):
            if fed[i] < len(prompt):
                batch.append((slot, prompt[fed[i] : fed[i] + chunk]))
                fed[i] += len(batch[-1][1])
                if fed[i] < len(prompt):
                    who.append(None)  # mid-prompt: logits not used
                    continue
            elif len(tokens[i]) < steps:
                batch.append((slot, [tokens[i][-1]]))
            else:
                continue
            who.append(i)
        out = r.step(batch)
        for row, i in enumerate(who):
            if i is not None:
                logits[i].append(out[row])
                tokens[i].append(int(out[row].argmax()))
        for slot in slots:
            r.cache.evict(slot)
    return torch.stack([torch.stack(x) for x in logits]), tokens


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"micro_batches": 2},
        {"cache_config": CacheConfig(kv_block_size=8)},
        {
            "cache_config": CacheConfig(
                kv_eviction="sink_window", kv_sink_tokens=8, kv_window_tokens=24
            )
        },  # fmt: skip
    ],
    ids=["plain", "ping-pong", "small-blocks", "sink-window"],
)
def test_native_step_equals_the_eager_reference(worker, kw):
    got, got_tokens = greedy(runner(worker, True, **kw))
    ref, ref_tokens = greedy(runner(worker, False, **kw))
    assert got_tokens == ref_tokens
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_native_is_on_by_default_where_it_builds_and_can_be_turned_off(worker):
    assert runner(worker, None).native
    assert not runner(worker, False).native
