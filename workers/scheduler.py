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

    def schedule(self) -> list[Work]:
        budget = self.config.max_num_batched_tokens
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

    def after_step(self, work: list[Work]) -> None:
        """The step's tokens are in the cache: advance each request, and index its newly
        completed prompt blocks and the DeltaNet state at snapshot boundaries."""
        for w in work:
            w.request.num_computed += len(w.tokens)
            if self.prefix is not None:
                self.prefix.after_step(w.request)

    def remove(self, req: Request) -> None:
        """Forget a finished or aborted request and free its slot and blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.slot is not None:
            self.cache.free(req.slot)
            req.slot = None

    def find(self, request_id: str) -> Request | None:
        for req in (*self.running, *self.waiting):
            if req.request_id == request_id:
                return req
        return None

    # ----------------------------------------------------------------- helpers
    def _chunk(self, req: Request, budget: int) -> int:
        n = min(budget, self.config.max_prefill_chunk, req.num_pending)
        if self.prefix is not None and n > 1:
            n = self.prefix.cut(req, n)
        return n

    def _add(self, req: Request, n: int, work: list[Work], scheduled: set[int]) -> None:
        self.cache.reserve(req.slot, n)
        decode = n == 1 and bool(req.output_ids) and req.num_pending == 1
        work.append(Work(req, req.next_tokens(n), n == req.num_pending, decode))
        scheduled.add(id(req))

    def _make_room(self, req: Request, n: int, scheduled: set[int]) -> bool:
        """Preempt the youngest unscheduled requests until `req` has blocks for n tokens;
        False when `req` itself had to go."""
        while self.cache.blocks_needed(req.slot, n) > self.cache.num_free_blocks:
            victim = next((r for r in reversed(self.running) if id(r) not in scheduled), None)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.cache.free(req.slot)
        req.slot, req.num_computed = None, 0
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.preemptions += 1

    def _admit(self, req: Request) -> bool:
        """Give the request at the head of the queue a slot (and its cached prefix) if a slot
        and blocks for its whole pending prefill are free."""
        cache = self.cache
        if len(self.running) >= self.config.max_num_seqs or cache.num_free == 0:
            return False
        hit = self.prefix.match(req) if self.prefix is not None else PrefixHit.none()
        pending = len(req.all_ids) - hit.tokens + 1  # + the first output token
        need = -(-pending // cache.block_size)
        if need + hit.idle > cache.num_free_blocks:
            return False
        req.slot = cache.allocate()
        if self.prefix is not None:
            self.prefix.apply(req, hit)
        self.running.append(req)
        return True
