"""The native dense step (workers/native_step.py on the C++ ops of workers/dense_kernel.py)
against the eager torch reference (workers/model.py): same logits within fp32 rounding and
the same greedy tokens, for a batch that mixes prefill spans and decode rows, over paged
blocks, with micro-batch ping-pong, and under the sink + window KV policy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers import dense_kernel
from workers.cache_config import CacheConfig
from workers.checkpoint import load_dense_weights
from workers.config import ModelConfig
from workers.dense_worker import DenseWorker, load_lm, local_experts
from workers.make_checkpoint import make_checkpoint
from workers.model import Qwen3NextLM
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


def test_a_bf16_checkpoint_keeps_its_projections_in_bf16_with_the_same_numbers(tmp_path):
    """fp32 compute over bf16-stored projection weights (half the bytes a decode step reads)
    gives exactly the logits of fp32-stored ones, on the native step and the eager path."""
    path = make_checkpoint(tmp_path, preset="tiny", seed=5, dtype="bfloat16")
    narrow = load_lm(path, torch.float32, progress=False)
    wide = load_lm(path, torch.float32, progress=False, lossless=False)
    matmul = narrow.matmul_weights()
    assert "lm_head.weight" in matmul and "model.layers.0.mlp.gate.weight" in matmul
    assert {narrow.get_parameter(n).dtype for n in matmul} == {torch.bfloat16}
    assert narrow.compute_dtypes() == {torch.float32} == {p.dtype for p in wide.parameters()}
    experts = local_experts(path, torch.float32, progress=False)
    for native in (True, False):
        got = greedy(ModelRunner(narrow, experts, 4, native=native, max_model_len=512))
        ref = greedy(ModelRunner(wide, experts, 4, native=native, max_model_len=512))
        assert got[1] == ref[1]
        assert torch.equal(got[0], ref[0])


def test_tied_embeddings_and_fp32_checkpoints_stay_in_the_compute_dtype(tmp_path):
    bf16 = make_checkpoint(tmp_path / "bf16", preset="tiny", seed=5, dtype="bfloat16")
    config = dataclasses.replace(ModelConfig.from_hf(bf16), tie_word_embeddings=True)
    weights = load_dense_weights(bf16, config, dtype=None, progress=False)
    tied = Qwen3NextLM.from_weights(config, weights, torch.float32, lossless=True)
    assert tied.lm_head.weight.dtype == torch.float32  # it is the embedding
    assert tied.model.layers[0].mlp.shared_expert.up_proj.weight.dtype == torch.bfloat16
    fp32 = make_checkpoint(tmp_path / "fp32", preset="tiny", seed=5, dtype="float32")
    assert {p.dtype for p in load_lm(fp32, torch.float32, progress=False).parameters()} == {
        torch.float32
    }
