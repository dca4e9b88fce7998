"""Resume a sequence from its tokens: a request interrupted after k tokens and resumed in a
fresh engine gives what the uninterrupted run gave, without re-sending or skipping text."""

from __future__ import annotations

import asyncio

import pytest
import torch

from workers.async_engine import AsyncEngine
from workers.dense_worker import DenseWorker
from workers.engine import Engine
from workers.make_checkpoint import make_checkpoint
from workers.requests import EngineConfig, RequestError, RequestOutput, ResumeState, position_seed
from workers.runner import ModelRunner
from workers.sampler import SamplingParams

STEPS = 24
PROMPT = [17, 301, 5, 88, 940, 12, 7, 613, 44, 2, 19, 250]
SAMPLED = SamplingParams(max_tokens=STEPS, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
GREEDY = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny", seed=5)
    return DenseWorker(str(path), engine_config=EngineConfig(max_num_seqs=1))


def fresh_engine(worker: DenseWorker, max_num_seqs: int = 2) -> Engine:
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64)
    runner = ModelRunner(worker.engine.runner.lm, worker.experts, max_num_seqs)
    return Engine(runner, config, worker.tokenizer)


def stream(engine: Engine, params: SamplingParams, resume: ResumeState | None = None):
    """Every output the client receives, in order."""
    engine.add_request("r", PROMPT, params, resume)
    outs: list[RequestOutput] = []
    while engine.has_work():
        outs += engine.step()
    return outs


def received(outs: list[RequestOutput]) -> tuple[list[int], list[float], str]:
    ids = [t for o in outs for t in o.token_ids]
    return ids, [lp for o in outs for lp in o.logprobs], "".join(o.text for o in outs)


def interrupted_after(outs: list[RequestOutput], k: int) -> tuple[list[RequestOutput], ResumeState]:
    """What the client had once k tokens had arrived (outputs carry one token each here)."""
    before = []
    for o in outs:
        if sum(len(b.token_ids) for b in before) >= k:
            break
        before.append(o)
    ids, logprobs, text = received(before)
    return before, ResumeState(tuple(ids), tuple(logprobs), len(text))


def greedy_margins(worker: DenseWorker, output_ids: list[int]) -> torch.Tensor:
    """Top-1 minus top-2 logit at every output position of the uninterrupted run."""
    runner = ModelRunner(worker.engine.runner.lm, worker.experts, 1)
    logits = runner.step([(runner.allocate(), PROMPT + output_ids[:-1])], all_logits=True)[0]
    top2 = logits[len(PROMPT) - 1 :].topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def check_resumes(worker, params, ks, margins=None) -> list[ResumeState]:
    whole = stream(fresh_engine(worker), params)
    ids, _, text = received(whole)
    assert whole[-1].finished and len(ids) <= STEPS
    states = []
    for k in ks:
        if k >= len(ids):
            continue
        before, state = interrupted_after(whole, k)
        after = stream(fresh_engine(worker), params, state)  # a different engine and cache
        got_ids, _, got_text = received(before + after)
        first_diff = next(
            (i for i, (a, b) in enumerate(zip(got_ids, ids, strict=False)) if a != b), None
        )
        if first_diff is not None:  # only a near-tie may flip (re-prefill vs recurrent decode)
            assert margins is not None and margins[first_diff] < NEAR_TIE, (k, first_diff)
            continue
        assert got_ids == ids, f"resumed after {k} tokens"
        assert got_text == text, f"resumed after {k} tokens: text gapped or duplicated"
        assert after[-1].finish_reason == whole[-1].finish_reason
        assert after[-1].completion_tokens == len(ids) and after[-1].prompt_tokens == len(PROMPT)
        states.append(state)
    return states


def test_seeded_sampled_request_resumes_exactly_with_multibyte_text_held_back(worker):
    states = check_resumes(worker, SAMPLED, range(1, STEPS))
    tok = worker.tokenizer
    held = [s for s in states if tok.decode(list(s.output_ids)).endswith("\ufffd")]
    assert held, "no interruption fell inside a multi-byte character: pick another seed"


def test_greedy_request_resumes_with_identical_tokens_outside_near_ties(worker):
    ids = received(stream(fresh_engine(worker), GREEDY))[0]
    check_resumes(worker, GREEDY, range(1, STEPS, 3), greedy_margins(worker, ids))


def test_stop_string_hold_back_survives_a_resume(worker):
    text = received(stream(fresh_engine(worker), SAMPLED))[2]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and "\ufffd" not in stop
    params = SamplingParams(
        max_tokens=STEPS, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True, stop=(stop,)
    )
    whole = stream(fresh_engine(worker), params)
    assert whole[-1].finish_reason == "stop" and stop not in received(whole)[2]
    states = check_resumes(worker, params, range(1, STEPS))
    tok = worker.tokenizer
    assert any(s.sent_text_chars < len(tok.decode(list(s.output_ids))) for s in states)


def test_sampling_randomness_is_a_function_of_seed_and_position(worker):
    """Two requests with one seed in one batch draw the same stream; the seed and the
    position both change the draw."""
    e = fresh_engine(worker)
    e.add_request("a", PROMPT, SAMPLED)
    e.add_request("b", PROMPT, SAMPLED)
    outs: dict[str, list[int]] = {"a": [], "b": []}
    while e.has_work():
        for o in e.step():
            outs[o.request_id] += o.token_ids
    assert outs["a"] == outs["b"]
    seeds = {position_seed(s, p) for s in (0, 1, -1) for p in range(3)}
    assert len(seeds) == 9 and all(0 <= s < 2**64 for s in seeds)


def test_unseeded_requests_get_their_own_seed(worker):
    e = fresh_engine(worker)
    unseeded = SamplingParams(max_tokens=STEPS, temperature=1.0, ignore_eos=True)
    e.add_request("a", PROMPT, unseeded)
    e.add_request("b", PROMPT, unseeded)
    outs: dict[str, list[int]] = {"a": [], "b": []}
    while e.has_work():
        for o in e.step():
            outs[o.request_id] += o.token_ids
    assert outs["a"] != outs["b"]


@pytest.mark.parametrize(
    "state, message",
    [
        (ResumeState((1, 10**6)), "resume.output_ids: token id 1000000 is outside"),
        (ResumeState(tuple(range(STEPS))), "already reach max_tokens"),
        (ResumeState((1, 2), (0.0,)), "resume.output_logprobs: 1 values for 2"),
        (ResumeState((65, 66), sent_text_chars=99), "resume.sent_text_chars: 99 is outside"),
    ],
)
def test_bad_resume_states_are_rejected_with_the_field_named(worker, state, message):
    with pytest.raises(RequestError, match=message) as exc:
        fresh_engine(worker).add_request("r", PROMPT, GREEDY, state)
    assert exc.value.kind == "invalid"


def test_resume_after_an_end_token_is_rejected(worker):
    eos = worker.config.eos_token_ids[0]
    params = SamplingParams(max_tokens=STEPS, temperature=0.0)
    with pytest.raises(RequestError, match=f"already ended by token {eos}"):
        fresh_engine(worker).add_request("r", PROMPT, params, ResumeState((3, eos)))


def test_async_engine_passes_resume_through(worker):
    whole = stream(fresh_engine(worker), SAMPLED)
    before, state = interrupted_after(whole, 5)

    async def run() -> list[RequestOutput]:
        engine = AsyncEngine(fresh_engine(worker))
        try:
            return [o async for o in engine.generate(PROMPT, SAMPLED, "x", resume=state)]
        finally:
            engine.shutdown()

    after = asyncio.run(run())
    assert received(before + after)[:3:2] == received(whole)[:3:2]
