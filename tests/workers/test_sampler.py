"""Sampling features against references written here (or transformers' logits processors), and
in the engine: penalties, logit bias, min_tokens, min_p / top-k / top-p, top logprobs, prompt
logprobs, grammar masks (their errors too) and state rebuilt on resume."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from workers.dense_worker import DenseWorker
from workers.engine import Engine
from workers.make_checkpoint import make_checkpoint
from workers.requests import EngineConfig, RequestError, ResumeState
from workers.runner import ModelRunner
from workers.sampler import (
    SamplingError,
    SamplingParams,
    SamplingState,
    prefetch_masks,
    process_logits,
    sample,
)
from workers.structured import (
    GrammarCompiler,
    GrammarState,
    allowed_tokens,
    choice_grammar,
    json_schema_grammar,
    regex_grammar,
)

V = 64


def state(params: SamplingParams, prompt=(1, 2, 3), output=(), end=(63,)) -> SamplingState:
    s = SamplingState(params, list(prompt), V, end)
    s.replay(list(output))
    return s


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


# ------------------------------------------------------------------ processing vs references
def test_frequency_presence_and_logit_bias_match_a_reference_loop():
    x = logits(3)
    outputs = [(5, 5, 7, 9, 5), (), (1, 2)]
    params = [
        SamplingParams(frequency_penalty=0.5, presence_penalty=1.25),
        SamplingParams(logit_bias=((4, 50.0), (10, -100.0))),
        SamplingParams(frequency_penalty=-0.75, logit_bias=((2, 3.0),)),
    ]
    got = process_logits(x, [state(p, output=o) for p, o in zip(params, outputs, strict=True)])
    want = x.clone()
    for row, (p, out) in enumerate(zip(params, outputs, strict=True)):
        for tok in set(out):  # OpenAI: mu - count * freq - [count > 0] * presence
            want[row, tok] -= out.count(tok) * p.frequency_penalty + p.presence_penalty
        for tok, bias in p.logit_bias:
            want[row, tok] += bias
    torch.testing.assert_close(got, want)
    assert torch.equal(x, logits(3))  # the caller's logits are untouched


def test_repetition_penalty_matches_transformers():
    x = logits(2, seed=1)
    prompt, output = [3, 4, 4, 11], [11, 20]
    got = process_logits(x, [state(SamplingParams(repetition_penalty=r), prompt, output)
                             for r in (1.3, 0.7)])  # fmt: skip
    ids = torch.tensor([prompt + output])
    for row, r in enumerate((1.3, 0.7)):
        want = RepetitionPenaltyLogitsProcessor(r)(ids, x[row : row + 1].clone())
        torch.testing.assert_close(got[row : row + 1], want)


def test_min_tokens_bans_end_and_stop_ids_until_reached():
    p = SamplingParams(min_tokens=2, stop_token_ids=(7,))
    x = logits(2)
    got = process_logits(x, [state(p, output=(1,)), state(p, output=(1, 2))])
    assert torch.isneginf(got[0, [7, 63]]).all() and torch.isfinite(got[0, :7]).all()
    torch.testing.assert_close(got[1], x[1])  # reached: nothing banned
    ignore = SamplingParams(min_tokens=3, ignore_eos=True)
    got = process_logits(x[:1], [SamplingState(ignore, [1], V, end_ids=())])
    torch.testing.assert_close(got, x[:1])  # eos ignored and no stop ids: nothing to ban


@pytest.mark.parametrize(
    "params,warpers",
    [
        (SamplingParams(temperature=0.7, top_k=5), [TopKLogitsWarper(5)]),
        (SamplingParams(temperature=1.3, top_p=0.6), [TopPLogitsWarper(0.6)]),
        (SamplingParams(temperature=0.9, min_p=0.2), [MinPLogitsWarper(0.2)]),
        (SamplingParams(temperature=1.0, top_k=8, top_p=0.8),
         [TopKLogitsWarper(8), TopPLogitsWarper(0.8)]),
    ],
)  # fmt: skip
def test_sampling_distribution_matches_transformers_warpers(params, warpers):
    """The inverse-CDF draw over the kept tokens: the empirical distribution of 4000 draws
    matches the distribution transformers' warpers leave (and never leaves their support)."""
    x = logits(1, seed=3)
    ref = x / params.temperature
    for w in warpers:
        ref = w(torch.zeros(1, 1, dtype=torch.long), ref)
    want = torch.softmax(ref, dim=-1)[0]
    n = 4000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    draws = sample(x.expand(n, V).contiguous(), [state(params)] * n, gens).tokens
    freq = torch.bincount(draws, minlength=V).float() / n
    assert set(draws.tolist()) <= set(want.nonzero().flatten().tolist())
    assert (freq - want).abs().max() < 0.04


def test_top_logprobs_are_of_the_raw_distribution():
    x = logits(2, seed=4)
    states = [
        state(
            SamplingParams(temperature=0, logprobs=True, top_logprobs=4, logit_bias=((0, 90.0),))
        ),
        state(SamplingParams(temperature=0, logprobs=True, top_logprobs=2, presence_penalty=2)),
    ]
    out = sample(x, states, [None, None])
    raw = torch.log_softmax(x, dim=-1)
    assert out.tokens[0] == 0  # the bias decided the token ...
    assert out.logprobs[0] == pytest.approx(float(raw[0, 0]))  # ... not its reported logprob
    vals, ids = torch.topk(raw[0], 4)
    assert [t for t, _ in out.top(0, 4)] == ids.tolist()
    assert [v for _, v in out.top(0, 4)] == pytest.approx(vals.tolist())
    assert [t for t, _ in out.top(1, 2)] == torch.topk(raw[1], 2).indices.tolist()


def test_params_are_validated():
    for bad in [
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3),
        dict(repetition_penalty=0),
        dict(min_p=1.5),
        dict(top_logprobs=21),
        dict(min_tokens=20, max_tokens=10),
        dict(logit_bias=((1, 101.0),)),
        dict(logit_bias=((-1, 1.0),)),
        dict(prompt_logprobs=-1),
    ]:
        with pytest.raises(SamplingError, match=next(iter(bad)).split("_")[0]):
            SamplingParams(**bad)


# --------------------------------------------------------------------------- grammar masks
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny", seed=3))


@pytest.fixture(scope="module")
def worker(model_dir):
    return DenseWorker(model_dir, engine_config=EngineConfig(max_num_seqs=4))


@pytest.fixture(scope="module")
def compiler(worker):
    cfg = worker.config
    return GrammarCompiler(worker.tokenizer, cfg.vocab_size, cfg.eos_token_ids)


def engine(worker: DenseWorker, seqs: int = 4) -> Engine:
    config = EngineConfig(max_num_seqs=seqs)
    runner = ModelRunner(worker.engine.runner.lm, worker.experts, config.max_num_seqs)
    return Engine(runner, config, worker.tokenizer)


def test_allowed_tokens_match_llguidance_logit_bias(compiler, worker):
    tok = worker.tokenizer
    states = [GrammarState(compiler.matcher(g)) for g in (
        json_schema_grammar({"type": "object"}),
        regex_grammar(r"[0-9]{2,4}"),
        choice_grammar(["yes", "no"]),
    )]  # fmt: skip
    states[0].advance(tok.encode("{")[0])
    mask = allowed_tokens(states, compiler.vocab_size)  # [3, V]
    for row, s in enumerate(states):
        bias = torch.frombuffer(bytearray(s.matcher.compute_logit_bias()), dtype=torch.uint8)
        want = torch.zeros(compiler.vocab_size, dtype=torch.bool)
        want[: bias.numel()] = bias[: compiler.vocab_size] > 0
        assert torch.equal(mask[row], want)
    digits = {tok.decode([t]) for t in mask[1].nonzero().flatten().tolist()}
    assert digits and all(d.isdigit() for d in digits)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "count", "tags", "ok"],
    "additionalProperties": False,
}


def test_random_model_is_forced_into_the_schema_for_every_choice(worker):
    """n=3 sampled choices, each with its own matcher: all parse and validate."""
    e = engine(worker)
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=5, n=3,
                            grammar=json_schema_grammar(SCHEMA))  # fmt: skip
    outs = e.generate([[5, 6, 7]], params)
    assert len(outs) == 3 and len({o.text for o in outs}) > 1
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    free = e.generate([[5, 6, 7]], SamplingParams(max_tokens=30, temperature=1.0, seed=5))[0]
    with pytest.raises(ValueError):
        json.loads(free.text)  # the model alone does not write JSON


def test_grammar_and_greedy_and_regex_and_choice(worker):
    e = engine(worker)
    outs = e.generate([[9, 8, 7]] * 3, [
        SamplingParams(max_tokens=20, temperature=0, grammar=regex_grammar(r"[a-c]{3}-[0-9]{2}")),
        SamplingParams(max_tokens=20, temperature=0.8, seed=1,
                       grammar=choice_grammar(["red", "green", "blue"])),
        SamplingParams(max_tokens=20, temperature=0),  # unconstrained neighbour in the batch
    ])  # fmt: skip
    import re

    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", outs[0].text) and outs[0].finish_reason == "stop"
    assert outs[1].text in ("red", "green", "blue")
    alone = engine(worker).generate([[9, 8, 7]], SamplingParams(max_tokens=20, temperature=0))
    assert outs[2].token_ids == alone[0].token_ids  # masks never touch other rows


def test_a_grammar_with_no_way_forward_fails_that_request_only(worker):
    e = engine(worker)
    stuck = SamplingParams(max_tokens=10, temperature=0, min_tokens=5,
                           grammar=choice_grammar(["ok"]))  # fmt: skip
    outs = e.generate([[3, 4], [3, 4]], [stuck, SamplingParams(max_tokens=6, temperature=0)])
    assert outs[0].finish_reason == "error" and outs[0].error_kind == "invalid"
    assert "grammar allows no next token" in outs[0].error and "min_tokens" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 6


def test_bad_grammar_is_a_clear_request_error(worker):
    e = engine(worker)
    with pytest.raises(RequestError, match="grammar") as info:
        e.prepare(SamplingParams(grammar=regex_grammar("[a-")))
    assert info.value.kind == "invalid"
    with pytest.raises(RequestError, match="token id 5000"):
        e.add_request("x", [1, 2], SamplingParams(logit_bias=((5000, 1.0),)))


# ------------------------------------------------------------------------- engine behaviour
def test_min_tokens_and_logit_bias_in_the_engine(worker):
    eos = worker.config.eos_token_ids[0]
    e = engine(worker)
    eager = SamplingParams(max_tokens=12, temperature=0, logit_bias=((eos, 100.0),))
    out = e.generate([[4, 5, 6]], eager)[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    out = e.generate([[4, 5, 6]], SamplingParams(max_tokens=12, temperature=0, min_tokens=4,
                                                 logit_bias=((eos, 100.0),)))[0]  # fmt: skip
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:4]


def test_penalties_change_greedy_output_like_the_reference(worker):
    """Greedy with a logit bias that makes token 100 win and a frequency penalty that takes it
    back: each token is the argmax of the model's logits (a plain forward per step) + bias -
    penalties on the counts so far."""
    prompt = [11, 12, 13, 14]
    bias = ((100, 8.0),)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logit_bias=bias,
                            frequency_penalty=2.0, presence_penalty=0.5)  # fmt: skip
    out = engine(worker).generate([prompt], params)[0]
    lm, experts = worker.engine.runner.lm, worker.experts
    ids = list(prompt)
    for tok in out.token_ids:
        runner = ModelRunner(lm, experts, 1)
        slot = runner.allocate()
        x = runner.step([(slot, ids)])[0].clone()
        x[100] += 8.0
        gen = ids[len(prompt) :]
        for t in set(gen):
            x[t] -= 2.0 * gen.count(t) + 0.5
        assert tok == int(torch.argmax(x))
        ids.append(tok)
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logit_bias=bias)
    biased = engine(worker).generate([prompt], plain)[0].token_ids
    assert biased.count(100) > out.token_ids.count(100) >= 1


def test_prompt_logprobs_agree_with_decode_logprobs_and_top(worker):
    """Logprobs of output tokens (decode steps) equal the prompt logprobs of the same tokens
    fed back as a prompt (one chunked prefill), and top alternatives are sorted raw logprobs."""
    e = engine(worker)
    gen = e.generate([[20, 21, 22]], SamplingParams(max_tokens=6, temperature=0.8, seed=3,
                     logprobs=True, top_logprobs=3, ignore_eos=True))[0]  # fmt: skip
    assert len(gen.top_logprobs) == 6
    for tok, lp, top in zip(gen.token_ids, gen.logprobs, gen.top_logprobs, strict=True):
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert tok not in dict(top) or dict(top)[tok] == pytest.approx(lp)
    full = [20, 21, 22, *gen.token_ids]
    e2 = Engine(ModelRunner(worker.engine.runner.lm, worker.experts, 2),
                EngineConfig(max_num_seqs=2, max_prefill_chunk=4, max_num_batched_tokens=4),
                worker.tokenizer)  # fmt: skip
    echo = e2.generate([full], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    pl = echo.prompt_logprobs
    assert pl[0] is None and len(pl) == len(full)
    for i, lp in enumerate(gen.logprobs):
        assert pl[3 + i][0] == pytest.approx(lp, abs=1e-4)
        assert len(pl[3 + i][1]) == 2
    assert all(math.isfinite(entry[0]) for entry in pl[1:])


def test_resume_rebuilds_penalty_and_grammar_state(worker):
    """A request resumed after k tokens draws what the uninterrupted one drew: its penalty
    counts and grammar matcher are rebuilt by replaying the output."""
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=11, frequency_penalty=1.0,
                            grammar=json_schema_grammar(SCHEMA))  # fmt: skip
    full = engine(worker).generate([[7, 7, 7]], params)[0]
    assert full.finish_reason == "stop"
    jsonschema.validate(json.loads(full.text), SCHEMA)
    k = len(full.token_ids) // 2
    e = engine(worker)
    e.add_request("r", [7, 7, 7], params, ResumeState(tuple(full.token_ids[:k])))
    rest = []
    while e.has_work():
        rest += [t for o in e.step() for t in o.token_ids]
    assert full.token_ids[:k] + rest == full.token_ids
    with pytest.raises(RequestError, match="resume.output_ids: the grammar does not allow"):
        engine(worker).add_request(
            "bad", [7], params, ResumeState(tuple(worker.tokenizer.encode("]")))
        )


def test_prefetched_masks_equal_masks_filled_at_sampling(compiler, worker):
    """The engine fills masks on a thread during the forward; rows it did not prefetch (a
    choice forked this step) are filled at sampling time. Both give the same logits."""
    vocab = compiler.vocab_size
    states = [
        SamplingState(SamplingParams(grammar=g), [1], vocab, [1023], compiler)
        for g in (json_schema_grammar(SCHEMA), regex_grammar("[a-z]+"), None, choice_grammar(["x"]))
    ]
    states[0].replay(worker.tokenizer.encode('{"name": "ab'))
    x = torch.randn(len(states), vocab)
    plain = process_logits(x, states)
    for subset in (states, states[:2]):  # all prefetched; some left for sampling time
        masks = prefetch_masks(subset, vocab)
        assert torch.equal(process_logits(x, states, masks), plain)
    assert prefetch_masks([states[2], None], vocab) is None
    assert torch.isneginf(plain[3]).sum() == vocab - 1  # "x" is one token here
