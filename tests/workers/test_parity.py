"""Our model vs transformers' Qwen3NextForCausalLM (the oracle), fp32, every parameter perturbed."""

from __future__ import annotations

import pytest
import torch

from tests.workers.hf_reference import TINY_HF, our_model, perturbed_hf_model
from workers.runner import ModelRunner

LENGTHS = [150, 97, 65, 7, 1]  # over one DeltaNet chunk (64), not multiples of it, and tiny
DECODE_STEPS = 32
TOL = 1e-4


@pytest.fixture(scope="module")
def models():
    hf = perturbed_hf_model(TINY_HF, seed=0)
    lm, experts = our_model(TINY_HF, hf)
    return hf, lm, experts


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, TINY_HF["vocab_size"], (n,), generator=gen).tolist() for n in LENGTHS]


def hf_greedy(hf, prompt: list[int]) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """(prefill logits [n, V], greedy tokens, per-step logits [steps, V]) from transformers."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        prefill = hf(ids).logits[0]
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE_STEPS,
            do_sample=False, output_logits=True, return_dict_in_generate=True,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    tokens = out.sequences[0, len(prompt) :].tolist()
    return prefill, tokens, torch.stack([s[0] for s in out.logits])


def our_greedy(runner: ModelRunner, prompts: list[list[int]]):
    slots = [runner.allocate() for _ in prompts]
    prefill = runner.step(list(zip(slots, prompts, strict=True)), all_logits=True)
    steps = [torch.stack([p[-1] for p in prefill])]  # [B, V]
    tokens = [[int(steps[0][b].argmax())] for b in range(len(prompts))]
    for _ in range(DECODE_STEPS - 1):
        logits = runner.step([(s, [t[-1]]) for s, t in zip(slots, tokens, strict=True)])
        steps.append(logits)
        for b, t in enumerate(tokens):
            t.append(int(logits[b].argmax()))
    for s in slots:
        runner.free(s)
    return prefill, tokens, torch.stack(steps, dim=1)  # [B, steps, V]


def test_batched_prefill_and_decode_match_transformers(models, prompts):
    hf, lm, experts = models
    runner = ModelRunner(lm, experts, max_seqs=8)
    prefill, tokens, steps = our_greedy(runner, prompts)
    for b, prompt in enumerate(prompts):
        ref_prefill, ref_tokens, ref_steps = hf_greedy(hf, prompt)
        assert ref_prefill.std() > 1.0, "logits too flat to test greedy parity"
        diff = (prefill[b] - ref_prefill).abs().max().item()
        assert diff <= TOL, f"prompt {b} (len {len(prompt)}): prefill max |diff| {diff}"
        assert tokens[b] == ref_tokens, f"prompt {b}: greedy tokens differ"
        diff = (steps[b] - ref_steps).abs().max().item()
        assert diff <= TOL, f"prompt {b}: decode max |diff| {diff}"


def test_slot_reuse_does_not_change_results(models, prompts):
    _, lm, experts = models
    runner = ModelRunner(lm, experts, max_seqs=3)
    first = our_greedy(runner, prompts[:3])
    # dirty the slots with other sequences, free them, then rerun in a different slot order
    junk = [runner.allocate() for _ in range(3)]
    runner.step([(s, prompts[3]) for s in junk])
    for s in reversed(junk):
        runner.free(s)
    second = our_greedy(runner, prompts[:3])
    assert first[1] == second[1]
    assert torch.equal(first[2], second[2])


def test_chunked_prefill_equals_one_shot(models, prompts):
    """Feeding a prompt in pieces through the cache gives the same logits as all at once."""
    _, lm, experts = models
    runner = ModelRunner(lm, experts, max_seqs=2)
    prompt = prompts[0]
    a = runner.allocate()
    whole = runner.step([(a, prompt)], all_logits=True)[0]
    b = runner.allocate()
    pieces = [prompt[:70], prompt[70:71], prompt[71:140], prompt[140:]]
    parts = [runner.step([(b, p)], all_logits=True)[0] for p in pieces]
    assert (torch.cat(parts) - whole).abs().max().item() <= 1e-4


def test_micro_batch_ping_pong_equals_single_batch(models, prompts):
    """Two interleaved micro-batches (the overlap path for remote experts) give the same
    tokens as one batch; logits differ only by GEMM batch-shape rounding."""
    _, lm, experts = models
    one = our_greedy(ModelRunner(lm, experts, max_seqs=8, micro_batches=1), prompts)
    two = our_greedy(ModelRunner(lm, experts, max_seqs=8, micro_batches=2), prompts)
    assert one[1] == two[1]
    assert (one[2] - two[2]).abs().max().item() <= TOL


def test_out_of_vocabulary_id_is_rejected_before_the_cache_moves(models):
    _, lm, experts = models
    runner = ModelRunner(lm, experts, max_seqs=1)
    slot = runner.allocate()
    with pytest.raises(ValueError, match="token id 300 outside"):
        runner.step([(slot, [1, 2, TINY_HF["vocab_size"]])])
    assert runner.cache.lengths[slot] == 0
