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

from router.faults import ExpertsUnavailableError
from workers.requests import EngineConfig, Request, RequestError, RequestOutput, ResumeState
from workers.resources import StepThreads
from workers.runner import ModelRunner
from workers.sampler import (
    SamplingError,
    SamplingParams,
    prefetch_masks,
    prompt_logprobs,
    sample,
)
from workers.scheduler import Scheduler, Work
from workers.structured import GrammarCompiler, GrammarError, MaskPrefetch
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
        threads: StepThreads | None = None,
    ) -> None:
        self.runner = runner
        self.config = config
        self.tokenizer = tokenizer
        self.threads = threads  # None: leave torch's thread count alone
        vocab = runner.config.vocab_size
        self.grammars = (
            GrammarCompiler(tokenizer, vocab, runner.config.eos_token_ids)
            if (tokenizer is not None)
            else None
        )
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
        bad = [t for t in params.token_ids() if t >= model.vocab_size]
        if bad:
            raise RequestError("invalid", f"token id {bad[0]} is outside [0, {model.vocab_size})")
        request.attach_detokenizer(self.tokenizer)
        try:
            request.attach_sampling(model.vocab_size, self.eos_ids, self.grammars)
        except (GrammarError, SamplingError) as exc:
            raise RequestError("invalid", f"grammar: {exc}") from None
        if resume is not None:
            request.resume(resume, self.eos_ids, model.vocab_size)
        self._check_fits(request)
        with self._lock:  # requests that free slots will admit at once do not queue
            capacity = self.config.max_queue + self.runner.cache.num_free
            if self._pending + len(self.waiting) >= capacity:
                raise RequestError("queue_full", f"queue is full ({self.config.max_queue} waiting)")
            self._pending += 1
        self._inbox.put(("add", request))

    def prepare(self, params: SamplingParams) -> None:
        """Compile the request's grammar into the cache; call off the engine thread before
        add_request (the async engine does). RequestError for a grammar that cannot compile."""
        if params.grammar is None:
            return
        if self.grammars is None:
            raise RequestError("invalid", "structured output needs the model's tokenizer")
        try:
            self.grammars.prepare(params.grammar)
        except GrammarError as exc:
            raise RequestError("invalid", f"grammar: {exc}") from None

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
        masks = prefetch_masks(  # grammar masks fill on a thread while the model runs
            [w.request.sampling for w in work if w.sample], self.runner.config.vocab_size
        )
        try:
            logits = self.run(work)
        except Exception as exc:  # a failed step poisons the caches of exactly these requests
            log.exception("step failed; aborting %d requests", len(work))
            kind = "unavailable" if _pool_degraded(exc) else "internal"
            return outputs + [
                o for w in work for o in self._finish(w.request, "error", str(exc), kind)
            ]
        forked = self.scheduler.after_step(work)
        outputs += self.post_process(work, logits, forked, masks)
        self._account(work, time.perf_counter() - start)
        return outputs

    def schedule(self) -> list[Work]:
        return self.scheduler.schedule()

    def run(self, work: list[Work]) -> torch.Tensor:
        """Forward the step; logits [B, V] of the sampling requests (in `work` order). Requests
        that asked for prompt logprobs get them for the prompt positions of this step."""
        batch = [(w.request.slot, w.tokens) for w in work]
        if self.threads is not None:
            self.threads.apply(sum(len(tokens) for _, tokens in batch))
        full = [i for i, w in enumerate(work) if self._wants_prompt_logprobs(w.request)]
        if full:
            logits, spans = self.runner.step(batch, full=full)
            for i in full:
                self._prompt_logprobs(work[i].request, spans[i])
        else:
            logits = self.runner.step(batch)
        keep = torch.tensor([i for i, w in enumerate(work) if w.sample], dtype=torch.long)
        return logits[keep]

    @staticmethod
    def _wants_prompt_logprobs(req: Request) -> bool:
        return req.prompt_logprobs is not None and req.num_computed < len(req.prompt_ids) - 1

    @staticmethod
    def _prompt_logprobs(req: Request, logits: torch.Tensor) -> None:
        """logits [n, V] of positions num_computed.. predict the prompt tokens after them."""
        start = req.num_computed
        targets = req.all_ids[start + 1 : start + 1 + logits.shape[0]]
        k = req.params.prompt_logprobs or 0
        req.record_prompt_logprobs(start, prompt_logprobs(logits[: len(targets)], targets, k))

    def post_process(
        self,
        work: list[Work],
        logits: torch.Tensor,
        forked: dict[int, list[Request]],
        masks: MaskPrefetch | None = None,
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
        gens = [r.generator() for r in sampled]
        result = sample(logits, [r.sampling for r in sampled], gens, masks)
        outputs = []
        tokens, logprobs = result.tokens.tolist(), result.logprobs.tolist()
        for i, req in enumerate(sampled):
            if i in result.errors:  # e.g. a grammar that allows no next token: this one fails
                outputs += self._finish(req, "error", result.errors[i], kind="invalid")
                continue
            top = result.top(i, req.params.top_logprobs if req.params.logprobs else 0)
            limit = self.config.max_model_len
            reason = req.append_token(tokens[i], logprobs[i], self.eos_ids, limit, top)
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

    def _finish(
        self, req: Request, reason: str, error: str | None = None, kind: str = "internal"
    ) -> list[RequestOutput]:
        """Retire a request (and its not yet forked choices); their final outputs."""
        choices = [req, *req.forks]
        self.scheduler.remove(req)
        req.forks = []
        self.stats.finished += 1
        self.stats.errors += reason == "error"
        return [r.finish(reason, error, kind) for r in choices]

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


def _pool_degraded(exc: BaseException | None) -> bool:
    """The step failed because the expert pool had no live shard for some routed experts
    within experts.recovery_timeout_s (ExpertsUnavailableError, possibly wrapped): the server
    is unavailable (HTTP 503 / gRPC UNAVAILABLE), not broken."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ExpertsUnavailableError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
