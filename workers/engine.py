"""Continuous-batching engine: schedule -> run -> post-process, one step at a time.

Every step admits waiting requests while cache slots are free, retires finished ones, and mixes
chunked prefill with decode under a per-step token budget (decode first, so running streams
never stall behind a long prompt). The engine is single-threaded: `add_request` and `abort`
may be called from other threads; they are applied at the start of the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workers.requests import EngineConfig, Request, RequestError, RequestOutput, ResumeState
from workers.runner import ModelRunner
from workers.sampler import SamplingParams, sample
from workers.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


@dataclass
class Work:
    """This step's tokens for one request; `sample` when they end its prompt or are a decode."""

    request: Request
    tokens: list[int]
    sample: bool
    decode: bool = False


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    errors: int = 0
    step_seconds: float = 0.0
    last_batch: dict = field(default_factory=dict)


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        config: EngineConfig,
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        self.runner = runner
        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(runner.config.eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------ requests in
    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        resume: ResumeState | None = None,
    ) -> None:
        """Validate and queue a request; raises RequestError (kind names the HTTP/gRPC status).
        With `resume`, the request continues after the output a client already has."""
        model = self.runner.config
        request = Request.create(request_id, prompt_ids, params, self.config, model)
        if params.stop and self.tokenizer is None:
            raise RequestError("invalid", "stop strings need a tokenizer; use stop_token_ids")
        request.attach_detokenizer(self.tokenizer)
        if resume is not None:
            request.resume(resume, self.eos_ids, model.vocab_size)
        with self._lock:  # requests that free slots will admit at once do not queue
            capacity = self.config.max_queue + self.runner.cache.num_free
            if self._pending + len(self.waiting) >= capacity:
                raise RequestError("queue_full", f"queue is full ({self.config.max_queue} waiting)")
            self._pending += 1
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or not self._inbox.empty())

    @property
    def num_free_slots(self) -> int:
        return self.runner.cache.num_free

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        outputs = self._apply_inbox()
        work = self.schedule()
        if not work:
            return outputs
        start = time.perf_counter()
        try:
            logits = self.run(work)
        except Exception as exc:  # a failed step poisons the caches of exactly these requests
            log.exception("step failed; aborting %d requests", len(work))
            return outputs + [self._finish(w.request, "error", error=str(exc)) for w in work]
        outputs += self.post_process(work, logits)
        self._account(work, time.perf_counter() - start)
        return outputs

    def schedule(self) -> list[Work]:
        budget = self.config.max_num_batched_tokens
        work: list[Work] = []
        for req in self.running:  # decodes first: one token each
            if req.num_pending == 1 and budget > 0:
                work.append(Work(req, req.next_tokens(1), True, decode=bool(req.output_ids)))
                budget -= 1
        for req in self.running:  # then continue partial prefills
            if req.num_pending > 1 and budget > 0:
                budget -= self._add_prefill(req, budget, work)
        while self.waiting and budget > 0 and self._can_admit():
            req = self.waiting.popleft()
            req.slot = self.runner.allocate()
            self.running.append(req)
            budget -= self._add_prefill(req, budget, work)
        return work

    def run(self, work: list[Work]) -> torch.Tensor:
        """Forward the step; logits [B, V] of the sampling requests (in `work` order)."""
        logits = self.runner.step([(w.request.slot, w.tokens) for w in work])
        for w in work:
            w.request.num_computed += len(w.tokens)
        keep = torch.tensor([i for i, w in enumerate(work) if w.sample], dtype=torch.long)
        return logits[keep]

    def post_process(self, work: list[Work], logits: torch.Tensor) -> list[RequestOutput]:
        sampled = [w.request for w in work if w.sample]
        if not sampled:
            return []
        params = [r.params for r in sampled]
        tokens, logprobs = sample(logits, params, [r.generator() for r in sampled])
        outputs = []
        for req, token, logprob in zip(sampled, tokens.tolist(), logprobs.tolist(), strict=True):
            reason = req.append_token(token, logprob, self.eos_ids, self.config.max_model_len)
            if reason is not None:
                outputs.append(self._finish(req, reason))
            else:
                outputs.append(req.take_output())
        return outputs

    # ----------------------------------------------------------------- helpers
    def _add_prefill(self, req: Request, budget: int, work: list[Work]) -> int:
        chunk = req.next_tokens(min(budget, self.config.max_prefill_chunk))
        work.append(Work(req, chunk, len(chunk) == req.num_pending))
        return len(chunk)

    def _can_admit(self) -> bool:
        return len(self.running) < self.config.max_num_seqs and self.runner.cache.num_free > 0

    def _apply_inbox(self) -> list[RequestOutput]:
        outputs = []
        while not self._inbox.empty():
            kind, item = self._inbox.get()
            if kind == "add":
                with self._lock:
                    self._pending -= 1
                self.waiting.append(item)
            else:
                req = self._find(item)
                if req is not None:
                    outputs.append(self._finish(req, "abort"))
        return outputs

    def _find(self, request_id: str) -> Request | None:
        for req in (*self.running, *self.waiting):
            if req.request_id == request_id:
                return req
        return None

    def _finish(self, req: Request, reason: str, error: str | None = None) -> RequestOutput:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.slot is not None:
            self.runner.free(req.slot)
            req.slot = None
        self.stats.finished += 1
        self.stats.errors += reason == "error"
        return req.finish(reason, error)

    def _account(self, work: list[Work], seconds: float) -> None:
        s = self.stats
        s.steps += 1
        s.step_seconds += seconds
        decode = sum(1 for w in work if w.decode)
        s.prompt_tokens += sum(len(w.tokens) for w in work) - decode
        s.generated_tokens += sum(1 for w in work if w.sample)
        s.last_batch = {"sequences": len(work), "tokens": sum(len(w.tokens) for w in work)}

    # ------------------------------------------------------------- offline use
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]:
        """Run prompts to completion; the accumulated output of each, in prompt order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [f"offline-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        results: dict[str, RequestOutput] = {}
        while self.has_work():
            for out in self.step():
                results[out.request_id] = (
                    results[out.request_id].merge(out) if out.request_id in results else out
                )
        return [results[rid] for rid in ids]
