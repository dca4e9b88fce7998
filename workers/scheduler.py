"""Scheduler: which requests run in the next step, with which tokens, in which KV blocks.

Per step, under a token budget: decodes first (one token each, so running streams never
stall behind a long prompt), then partial prefills, then admissions (FIFO) while a slot and
the KV blocks of the request's whole pending prefill are free. When a running request needs a
block and none is left, the youngest request not yet in this step is preempted: its slot and
blocks are freed and it goes back to the front of the queue with its tokens, to be resumed
later by prefilling prompt + output (the "resume a sequence from its tokens" path); no request
fails for lack of memory.

With prefix caching, an admitted request starts from the deepest DeltaNet snapshot inside its
cached prefix (workers/prefix_cache.py), and prefill chunks end on snapshot boundaries.

A request with n > 1 choices is admitted with n slots; its prompt is computed once in the
first, and the step that completes it forks the others (DeltaNet state copied, full KV
blocks shared, the partial last block copied), which then run as independent sequences.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from workers.cache import HybridCache
from workers.prefix_cache import PrefixCache, PrefixHit
from workers.requests import EngineConfig, Request


@dataclass
class Work:
    """This step's tokens for one request; `sample` when they reach the end of its tokens."""

    request: Request
    tokens: list[int]
    sample: bool
    decode: bool = False


class Scheduler:
    def __init__(self, cache: HybridCache, config: EngineConfig) -> None:
        self.cache = cache
        self.config = config
        self.prefix = PrefixCache(cache) if cache.settings.caches_prefixes else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the youngest
        self.preemptions = 0
        self._held = 0  # blocks this step keeps for the forks it will make

    def schedule(self) -> list[Work]:
        budget = self.config.max_num_batched_tokens
        self._held = 0
        work: list[Work] = []
        scheduled: set[int] = set()
        decoding = [r for r in self.running if r.num_pending == 1]
        prefilling = [r for r in self.running if r.num_pending > 1]
        for req in decoding + prefilling:
            if budget <= 0:
                break
            if req.slot is None:  # preempted earlier in this loop
                continue
            n = self._chunk(req, budget)
            if not self._make_room(req, n, scheduled):
                continue
            self._add(req, n, work, scheduled)
            budget -= n
        while self.waiting and budget > 0 and self._admit(self.waiting[0]):
            req = self.waiting.popleft()
            n = self._chunk(req, budget)
            self._add(req, n, work, scheduled)
            budget -= n
        return work

    def after_step(self, work: list[Work]) -> dict[int, list[Request]]:
        """The step's tokens are in the cache: advance each request, index its newly
        completed prompt blocks and the DeltaNet state at snapshot boundaries, and fork the
        other choices of requests whose prompt is now in. Returns {id(parent): forks}."""
        forked = {}
        for w in work:
            req = w.request
            req.num_computed += len(w.tokens)
            if self.prefix is not None:
                self.prefix.after_step(req)
            if not self.cache.window.exact:
                self.cache.evict(req.slot)
            if w.sample and req.forks:
                forked[id(req)] = self._fork(req)
        return forked

    def remove(self, req: Request) -> None:
        """Forget a finished or aborted request and free its slot and blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)

    def find_all(self, request_id: str) -> list[Request]:
        """Every choice of a request (running or waiting)."""
        return [r for r in (*self.running, *self.waiting) if r.request_id == request_id]

    # ----------------------------------------------------------------- helpers
    def _chunk(self, req: Request, budget: int) -> int:
        n = min(budget, self.config.max_prefill_chunk, req.num_pending)
        if self.prefix is not None and n > 1:
            n = self.prefix.cut(req, n)
        return n

    def _add(self, req: Request, n: int, work: list[Work], scheduled: set[int]) -> None:
        self.cache.reserve(req.slot, n)
        sample = n == req.num_pending
        self._held += len(req.forks) if sample else 0
        decode = n == 1 and bool(req.output_ids) and req.num_pending == 1
        work.append(Work(req, req.next_tokens(n), sample, decode))
        scheduled.add(id(req))

    def _blocks_for(self, req: Request, n: int) -> int:
        """Blocks n more tokens of `req` take, with one per fork when they end its prompt."""
        forks = len(req.forks) if n == req.num_pending else 0
        return self.cache.blocks_needed(req.slot, n) + forks

    def _free_blocks(self) -> int:
        return self.cache.num_free_blocks - self._held

    def _make_room(self, req: Request, n: int, scheduled: set[int]) -> bool:
        """Preempt the youngest unscheduled requests until `req` has blocks for n tokens;
        False when `req` itself had to go."""
        while self._blocks_for(req, n) > self._free_blocks():
            victim = next((r for r in reversed(self.running) if id(r) not in scheduled), None)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed = 0
        self.waiting.appendleft(req)
        self.preemptions += 1

    def _release(self, req: Request) -> None:
        """Free the request's slot and blocks (and the slots kept for its forks)."""
        for r in (req, *req.forks):
            if r.slot is not None:
                self.cache.free(r.slot)
                r.slot = None

    def _fork(self, parent: Request) -> list[Request]:
        forks, parent.forks = parent.forks, []
        at = self.running.index(parent) + 1
        for fork in forks:
            self.cache.fork(parent.slot, fork.slot)
            fork.take_fork(parent)
        self.running[at:at] = forks
        return forks

    def _admit(self, req: Request) -> bool:
        """Give the request at the head of the queue a slot (and its cached prefix) if a slot
        and blocks for its whole pending prefill are free."""
        cache, seqs = self.cache, 1 + len(req.forks)
        if len(self.running) + seqs > self.config.max_num_seqs or cache.num_free < seqs:
            return False
        hit = PrefixHit.none()
        if self.prefix is not None and req.prompt_logprobs is None:  # those need every logit
            hit = self.prefix.match(req)
        pending = len(req.all_ids) - hit.tokens + 1  # + the first output token
        chunk = self.config.max_prefill_chunk
        need = cache.window.max_blocks(pending, chunk) + len(req.forks)
        if need + hit.idle > self._free_blocks():
            return False
        req.slot = cache.allocate()
        for fork in req.forks:
            fork.slot = cache.allocate()
        if self.prefix is not None:
            self.prefix.apply(req, hit)
        self.running.append(req)
        return True
