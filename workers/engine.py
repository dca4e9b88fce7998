"""Continuous-batching engine: schedule -> run -> post-process, one step at a time.

Every step admits waiting requests while cache slots and KV blocks are free, retires finished
ones, and mixes chunked prefill with decode under a per-step token budget (workers/scheduler.py
decides; it preempts the youngest request when blocks run out). The engine is
single-threaded: `add_request` and `abort` may be called from other threads; they are applied
at the start of the next step.
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
from workers.scheduler import Scheduler, Work
from workers.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


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
        self.scheduler = Scheduler(runner.cache, config)
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
        self._check_fits(request)
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
    def waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def num_free_slots(self) -> int:
        return self.runner.cache.num_free

    def cache_stats(self) -> dict[str, int]:
        """KV block usage, preemptions and prefix-cache counters (lifetime totals)."""
        stats = self.runner.cache.usage() | {"preemptions": self.scheduler.preemptions}
        if self.scheduler.prefix is not None:
            stats |= self.scheduler.prefix.stats()
        return stats

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        outputs = self._apply_inbox()
        work = self.scheduler.schedule()
        if not work:
            return outputs
        start = time.perf_counter()
        try:
            logits = self.run(work)
        except Exception as exc:  # a failed step poisons the caches of exactly these requests
            log.exception("step failed; aborting %d requests", len(work))
            return outputs + [o for w in work for o in self._finish(w.request, "error", str(exc))]
        forked = self.scheduler.after_step(work)
        outputs += self.post_process(work, logits, forked)
        self._account(work, time.perf_counter() - start)
        return outputs

    def schedule(self) -> list[Work]:
        return self.scheduler.schedule()

    def run(self, work: list[Work]) -> torch.Tensor:
        """Forward the step; logits [B, V] of the sampling requests (in `work` order)."""
        logits = self.runner.step([(w.request.slot, w.tokens) for w in work])
        keep = torch.tensor([i for i, w in enumerate(work) if w.sample], dtype=torch.long)
        return logits[keep]

    def post_process(
        self, work: list[Work], logits: torch.Tensor, forked: dict[int, list[Request]]
    ) -> list[RequestOutput]:
        """Sample every sampling request's next token (the choices forked this step from
        their parent's logits row, each with its own RNG), then stop checks and outputs."""
        sampled, rows = [], []
        for row, req in enumerate(w.request for w in work if w.sample):
            for r in (req, *forked.get(id(req), ())):
                sampled.append(r)
                rows.append(row)
        if not sampled:
            return []
        logits = logits[rows] if len(rows) != logits.shape[0] else logits
        params = [r.params for r in sampled]
        tokens, logprobs = sample(logits, params, [r.generator() for r in sampled])
        outputs = []
        for req, token, logprob in zip(sampled, tokens.tolist(), logprobs.tolist(), strict=True):
            reason = req.append_token(token, logprob, self.eos_ids, self.config.max_model_len)
            if reason is not None:
                outputs += self._finish(req, reason)
            else:
                outputs.append(req.take_output())
        return outputs

    # ----------------------------------------------------------------- helpers
    def _check_fits(self, req: Request) -> None:
        """A request that could not fit in the whole KV pool alone would never finish."""
        cache = self.runner.cache
        tokens = len(req.prompt_ids) + req.params.max_tokens
        need = cache.window.max_blocks(tokens, self.config.max_prefill_chunk)
        if need > cache.pool.num_usable:
            raise RequestError(
                "too_long",
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_tokens}) "
                f"exceeds the KV cache of {cache.plan.kv_tokens} tokens",
            )

    def _apply_inbox(self) -> list[RequestOutput]:
        outputs = []
        while not self._inbox.empty():
            kind, item = self._inbox.get()
            if kind == "add":
                with self._lock:
                    self._pending -= 1
                self.waiting.append(item)
            else:
                for req in self.scheduler.find_all(item):
                    outputs += self._finish(req, "abort")
        return outputs

    def _finish(self, req: Request, reason: str, error: str | None = None) -> list[RequestOutput]:
        """Retire a request (and its not yet forked choices); their final outputs."""
        choices = [req, *req.forks]
        self.scheduler.remove(req)
        req.forks = []
        self.stats.finished += 1
        self.stats.errors += reason == "error"
        return [r.finish(reason, error) for r in choices]

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
        """Run prompts to completion; the accumulated output of each, in prompt order (the n
        choices of a prompt one after another, by index)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        keys = []
        for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
            self.add_request(f"offline-{i}", prompt, p)
            keys += [(f"offline-{i}", index) for index in range(p.n)]
        results: dict[tuple[str, int], RequestOutput] = {}
        while self.has_work():
            for out in self.step():
                key = (out.request_id, out.index)
                results[key] = results[key].merge(out) if key in results else out
        return [results[key] for key in keys]
