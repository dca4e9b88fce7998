"""Continuous-batching engine: scheduling, sampling, stops, limits, aborts, failures."""

from __future__ import annotations

import pytest
import torch

from workers.dense_worker import DenseWorker
from workers.engine import Engine
from workers.make_checkpoint import make_checkpoint
from workers.requests import EngineConfig, RequestError
from workers.sampler import SamplingError, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny", seed=2))


@pytest.fixture(scope="module")
def worker(model_dir):
    return DenseWorker(model_dir, engine_config=EngineConfig(max_num_seqs=1))


def engine(worker: DenseWorker, **limits) -> Engine:
    """A fresh engine over the module's model (its own cache)."""
    from workers.runner import ModelRunner

    config = EngineConfig(**limits)
    runner = ModelRunner(worker.engine.runner.lm, worker.experts, config.max_num_seqs)
    return Engine(runner, config, worker.tokenizer)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 90) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, 1000, (k,), generator=g).tolist() for k in lengths]


def alone(worker: DenseWorker, prompt: list[int], params=GREEDY):
    return engine(worker, max_num_seqs=1).generate([prompt], params)[0]


def test_more_requests_than_slots_all_finish_and_match_running_alone(worker):
    ps = prompts(7)
    e = engine(worker, max_num_seqs=3, max_num_batched_tokens=64, max_prefill_chunk=32)
    outs = e.generate(ps, GREEDY)
    for p, out in zip(ps, outs, strict=True):
        assert out.finished and out.finish_reason == "length"
        assert out.token_ids == alone(worker, p).token_ids
        assert out.prompt_tokens == len(p) and out.completion_tokens == 8
    assert e.num_free_slots == 3 and not e.running and not e.waiting


def test_chunked_prefill_is_mixed_with_decode_under_the_token_budget(worker):
    e = engine(worker, max_num_seqs=4, max_num_batched_tokens=16, max_prefill_chunk=16)
    e.add_request("short", [5, 6, 7], GREEDY)
    e.step()  # short prefilled, first token sampled
    e.add_request("long", list(range(10, 80)), GREEDY)
    e._apply_inbox()
    work = e.schedule()
    kinds = {w.request.request_id: (len(w.tokens), w.sample) for w in work}
    assert kinds["short"] == (1, True)  # a decode
    assert kinds["long"] == (15, False)  # a prefill chunk filling the rest of the budget
    assert sum(n for n, _ in kinds.values()) <= 16


def test_seeded_sampling_is_reproducible(worker):
    p = prompts(1, seed=3)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7,
                            ignore_eos=True)  # fmt: skip
    a, b = alone(worker, p, params), alone(worker, p, params)
    assert a.token_ids == b.token_ids
    other = alone(
        worker, p, SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True)
    )
    assert other.token_ids != a.token_ids


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=8, top_k=1, ignore_eos=True),
                                    SamplingParams(max_tokens=8, top_p=1e-6, seed=1,
                                                   ignore_eos=True)])  # fmt: skip
def test_top_k_one_and_tiny_top_p_are_greedy(worker, params):
    p = prompts(1, seed=4)[0]
    assert alone(worker, p, params).token_ids == alone(worker, p).token_ids


def test_logprobs_are_log_softmax_of_the_model(worker):
    p = prompts(1, seed=5)[0]
    out = alone(worker, p, SamplingParams(max_tokens=4, temperature=0.0, logprobs=True,
                                          ignore_eos=True))  # fmt: skip
    assert len(out.logprobs) == 4 and all(lp <= 0 for lp in out.logprobs)
    runner = engine(worker).runner
    slot = runner.allocate()
    logits = runner.step([(slot, p)])
    assert abs(torch.log_softmax(logits[0], -1)[out.token_ids[0]].item() - out.logprobs[0]) < 1e-5


def test_stop_token_ids_eos_and_stop_strings(worker):
    p = prompts(1, seed=6)[0]
    ref = alone(worker, p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    stop_id = ref.token_ids[4]
    out = alone(worker, p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                          stop_token_ids=(stop_id,)))  # fmt: skip
    assert (
        out.finish_reason == "stop"
        and out.token_ids == ref.token_ids[: ref.token_ids.index(stop_id) + 1]
    )
    eos = worker.config.eos_token_ids[0]
    e = engine(worker)
    e.eos_ids = frozenset({ref.token_ids[2]})  # pretend the 3rd token is EOS
    out = e.generate([p], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) <= 3
    assert eos in e.runner.config.eos_token_ids
    text = ref.text
    cut = next(i for i in range(2, len(text) - 2) if text.find(text[i : i + 2]) == i)
    out = alone(worker, p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                          stop=(text[cut : cut + 2],)))  # fmt: skip
    assert out.finish_reason == "stop" and out.text == text[:cut]


def test_streamed_text_never_contains_a_stop_string(worker):
    p = prompts(1, seed=6)[0]
    ref = alone(worker, p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    stop = ref.text[5:8]
    e = engine(worker)
    e.add_request("r", p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                         stop=(stop,)))  # fmt: skip
    pieces = []
    while e.has_work():
        pieces += [o.text for o in e.step()]
    assert stop not in "".join(pieces) and "".join(pieces) == ref.text[: ref.text.find(stop)]


def test_limits_give_clear_errors(worker):
    e = engine(worker, max_model_len=64, max_queue=2, max_num_seqs=1)
    with pytest.raises(RequestError, match="exceeds the model length") as exc:
        e.add_request("long", list(range(60)), SamplingParams(max_tokens=10))
    assert exc.value.kind == "too_long"
    with pytest.raises(RequestError, match="prompt is empty"):
        e.add_request("empty", [], GREEDY)
    with pytest.raises(RequestError, match="outside"):
        e.add_request("vocab", [10**6], GREEDY)
    for rid in "abc":  # one free slot admits one at once; two more may wait
        e.add_request(rid, [1], GREEDY)
    with pytest.raises(RequestError, match="queue is full") as exc:
        e.add_request("d", [1], GREEDY)
    assert exc.value.kind == "queue_full" and exc.value.http_status == 429
    for bad in [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(top_k=-2)]:
        with pytest.raises(SamplingError):
            SamplingParams(**bad)


def test_abort_frees_the_slot(worker):
    e = engine(worker, max_num_seqs=2)
    e.add_request("x", prompts(1)[0], SamplingParams(max_tokens=100, ignore_eos=True))
    e.step()
    assert e.num_free_slots == 1
    e.abort("x")
    outs = e.step()
    assert outs[0].finish_reason == "abort" and outs[0].finished
    assert e.num_free_slots == 2 and not e.has_work()


class FlakyExperts:
    def __init__(self, inner) -> None:
        self.inner, self.fail = inner, False
        self.error: Exception = RuntimeError("expert shard 1 unreachable")

    def submit(self, *args):
        if self.fail:
            raise self.error
        return self.inner.submit(*args)


def test_failed_step_fails_only_its_requests_and_the_engine_keeps_serving(worker):
    e = engine(worker, max_num_seqs=2)
    flaky = FlakyExperts(worker.experts)
    e.runner.experts = flaky
    e.add_request("doomed", [1, 2, 3], GREEDY)
    flaky.fail = True
    outs = e.step()
    assert outs[0].finish_reason == "error" and "unreachable" in outs[0].error
    assert outs[0].error_kind == "internal"
    assert e.num_free_slots == 2
    flaky.fail = False
    out = e.generate([[1, 2, 3]], GREEDY)[0]
    assert out.token_ids == alone(worker, [1, 2, 3]).token_ids


def test_a_degraded_expert_pool_fails_the_step_as_unavailable(worker):
    """ExpertsUnavailableError (no live shard after experts.recovery_timeout_s), raised or
    wrapped: the requests end with kind "unavailable" (HTTP 503 / gRPC UNAVAILABLE), not
    "internal"."""
    from router.faults import ExpertsUnavailableError

    e = engine(worker, max_num_seqs=2)
    flaky = FlakyExperts(worker.experts)
    e.runner.experts = flaky
    flaky.fail = True
    degraded = ExpertsUnavailableError(3, [17, 40], 2.0)
    try:
        raise RuntimeError("expert step failed") from degraded
    except RuntimeError as wrapped:
        errors = (degraded, wrapped)
    for i, error in enumerate(errors):
        flaky.error = error
        e.add_request(f"r{i}", [1, 2, 3], GREEDY)
        outs = e.step()
        assert outs[0].finish_reason == "error" and outs[0].error_kind == "unavailable"
        assert e.num_free_slots == 2
    assert "no live shard holds (layer 3, expert 17)" in str(degraded)


def test_wide_steps_take_every_thread_narrow_ones_leave_one_and_tokens_stay(worker):
    """StepThreads: a prefill chunk (>= wide_tokens) runs with `wide` torch threads, the
    one-token decode steps after it with `narrow`; the tokens equal a run without it."""
    from workers.resources import StepThreads

    seen: list[int] = []
    e = engine(worker, max_num_seqs=1)
    e.threads = StepThreads(narrow=1, wide=2, wide_tokens=16)
    run = e.runner.step
    e.runner.step = lambda *a, **k: (seen.append(torch.get_num_threads()), run(*a, **k))[1]
    before = torch.get_num_threads()
    try:
        prompt = prompts(1, seed=3, lo=40, hi=41)[0]
        out = e.generate([prompt], GREEDY)[0]
    finally:
        torch.set_num_threads(before)
    assert seen[0] == 2 and set(seen[1:]) == {1}  # the 40-token prefill, then decode steps
    assert out.token_ids == alone(worker, prompt).token_ids


def test_step_threads_defaults_come_from_the_cpus(monkeypatch):
    from workers import resources

    monkeypatch.setattr(resources, "assigned_cpus", lambda: 4)
    t = resources.step_threads()
    assert (t.narrow, t.wide, t.wide_tokens) == (3, 4, 16)
    assert t.for_tokens(15) == 3 and t.for_tokens(16) == 4
    monkeypatch.setattr(resources, "assigned_cpus", lambda: 1)
    assert resources.step_threads().narrow == 1  # never 0
    assert resources.step_threads(2, 6, 8) == resources.StepThreads(2, 6, 8)
