"""AsyncEngine: runs an Engine's step loop on a background thread and streams each request's
outputs to an asyncio consumer. Cancelling the consumer (client disconnect) aborts the request,
which frees its cache slot at the start of the next step.

`stream_interval` (vLLM's and SGLang's `--stream-interval`): after the first delta, a request's
tokens go out in deltas of at least that many (the last one, and any error, at once). Every
delta costs the serving path the same CPU whatever it carries (a Ray streaming item through
the replica, the ingress and the proxy, then an SSE event), so larger deltas leave the cores
to the model: on 2 cores, 1 -> 4 tokens took the served TPOT at 4 streams from ~16 to ~12 ms.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Sequence

from workers.engine import Engine
from workers.requests import RequestOutput, ResumeState
from workers.sampler import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine, stream_interval: int = 1) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval: expected >= 1 token, got {stream_interval}")
        self.engine = engine
        self.stream_interval = stream_interval
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        resume: ResumeState | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs as steps produce them; the last one has finished=True.
        Raises RequestError at once for an invalid request or a full queue. With `resume`,
        continue after the output the client already has (see Engine.add_request)."""
        rid = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._lock:
            if rid in self._queues:
                raise ValueError(f"request id {rid!r} is already running")
            self._queues[rid] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            if params.grammar is not None:  # compile off the engine thread and the event loop
                await asyncio.to_thread(self.engine.prepare, params)
            self.engine.add_request(rid, prompt_ids, params, resume)
            self._wake.set()
            unfinished = params.n  # choices still running
            first = True
            while unfinished:
                outs = [await queue.get()]
                while not queue.empty():  # a slow consumer gets one merged delta per choice,
                    outs.append(queue.get_nowait())  # not one per step
                while not first and self._holds(outs):  # wait for a fuller delta
                    outs.append(await queue.get())
                first = first and not any(o.token_ids for o in outs)  # the first token: at once
                for out in _merge_by_choice(outs):
                    unfinished -= out.finished
                    yield out
            finished = True
        finally:
            with self._lock:
                self._queues.pop(rid, None)
            if not finished:  # consumer went away (disconnect, cancel): free the slot
                self.engine.abort(rid)
                self._wake.set()

    def _holds(self, outs: list[RequestOutput]) -> bool:
        """Whether these pending deltas wait for more tokens (the stream interval)."""
        tokens = sum(len(o.token_ids) for o in outs)
        return tokens < self.stream_interval and not any(o.finished for o in outs)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def stats(self) -> dict:
        e = self.engine
        s = e.stats
        return {
            "running": len(e.running),
            "waiting": len(e.waiting),
            "free_slots": e.num_free_slots,
            "steps": s.steps,
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "finished": s.finished,
            "errors": s.errors,
            "step_seconds": s.step_seconds,
        } | e.cache_stats()

    # ------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # the engine already failed the affected requests
                log.exception("engine step raised")
                continue
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            targets = [(self._queues.get(o.request_id), o) for o in outputs]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for target, out in targets:
            if target is not None:
                loop, queue = target
                by_loop.setdefault(loop, []).append((queue, out))
        for loop, items in by_loop.items():  # one wake-up of each loop per step
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


def _merge_by_choice(outs: list[RequestOutput]) -> list[RequestOutput]:
    """Consecutive deltas -> one per choice index (in first-seen order)."""
    merged: dict[int, RequestOutput] = {}
    for out in outs:
        merged[out.index] = merged[out.index].merge(out) if out.index in merged else out
    return list(merged.values())
