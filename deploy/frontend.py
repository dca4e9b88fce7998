"""What the HTTP and gRPC front ends share: the served model's identity and tokenizer (one per
process), admission (the drain gate), cheap checks before tokenizing, and streaming a request
through the DenseReplica deployment handle.

A dense replica that dies mid-stream loses its caches, not the request: the front end knows
the prompt and the tokens (and text) already sent, so it resubmits them as a `ResumeState`
to a live replica (or, with one replica, to Serve's replacement), which re-prefills and
continues. Every request carries a seed (the front end draws one when the client sent none),
and sampling is a function of (seed, position), so the continuation is what the lost replica
would have produced. Client-facing errors carry a plain reason and the request id; internal
details (actor ids, addresses) go to the log only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from deploy.health import EventLog, Gate
from deploy.params import InvalidParam, ModelInfo, StreamError
from workers.dense_worker import load_tokenizer
from workers.requests import RequestError, RequestOutput, ResumeState
from workers.sampler import SamplingParams

log = logging.getLogger(__name__)
_REPLICA_LOST = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)
_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)
SEED_BITS = 63
_MASK64 = (1 << 64) - 1


class Frontend:
    def __init__(
        self,
        dense: serve.handle.DeploymentHandle,
        model_dir: str,
        model_name: str,
        *,
        replica_loss_timeout_s: float = 60.0,
        events: EventLog | None = None,
    ) -> None:
        self.dense = dense
        self.model_name = model_name
        self.tokenizer = load_tokenizer(model_dir)
        self.replica_loss_timeout_s = replica_loss_timeout_s
        self.gate = Gate()
        self.events = events or EventLog()
        self._info: ModelInfo | None = None
        self._info_lock = asyncio.Lock()
        self._max_token_bytes: int | None = None
        self._responses: set[Any] = set()
        self._cut = False
        self._lost: dict[str, float] = {}  # request id -> when its replica was lost

    async def info(self) -> ModelInfo:
        """The replicas' model_info(), fetched once."""
        async with self._info_lock:
            if self._info is None:
                self._info = ModelInfo(**await self.dense.model_info.remote())
        return self._info

    def check_model(self, name: str) -> None:
        if name and name != self.model_name:
            raise InvalidParam(
                "model",
                f"The model `{name}` does not exist (serving `{self.model_name}`)",
                kind="not_found",
            )

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    # ------------------------------------------------------------------ cheap checks
    def precheck_prompt(
        self,
        max_model_len: int,
        *,
        text: str | None = None,
        token_ids: Sequence[Any] | None = None,
        messages: Sequence[dict[str, Any]] | None = None,
        param: str = "prompt",
    ) -> None:
        """Reject a prompt that cannot fit the model before tokenizing it: a token covers at
        most `max_token_bytes` bytes of text, so more than 2x that many bytes per position of
        the model length cannot fit whatever the tokenizer does (the 2x covers normalisation)."""
        if token_ids is not None:
            if len(token_ids) > max_model_len:
                raise RequestError(
                    "too_long",
                    f"{param} ({len(token_ids)} tokens) exceeds the model length of "
                    f"{max_model_len} tokens",
                )
            return
        if messages is not None:
            size = sum(_text_bytes(m.get("content")) for m in messages)
        else:
            size = _text_bytes(text)
        limit = 2 * self.max_token_bytes * max_model_len
        if size > limit:
            raise RequestError(
                "too_long",
                f"{param}: {size} bytes of text cannot fit the model length of "
                f"{max_model_len} tokens",
            )

    @property
    def max_token_bytes(self) -> int:
        """The longest token of the vocabulary in UTF-8 bytes (an upper bound for byte-level
        BPE, whose token strings map one character to one byte)."""
        if self._max_token_bytes is None:
            vocab = self.tokenizer.vocab() if self.tokenizer is not None else {}
            self._max_token_bytes = max((len(t.encode()) for t in vocab), default=1) or 1
        return self._max_token_bytes

    def check_params(self, params: SamplingParams, info: ModelInfo) -> None:
        for name, ids in (("stop_token_ids", params.stop_token_ids),
                          ("logit_bias", [t for t, _ in params.logit_bias])):  # fmt: skip
            bad = [t for t in ids if not 0 <= t < info.vocab_size]
            if bad:
                raise InvalidParam(
                    name, f"{name}: {bad[0]} is outside the vocabulary [0, {info.vocab_size})"
                )

    # -------------------------------------------------------------------- streaming
    async def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """RequestOutput deltas of one request; raises RequestError (before or mid-stream).
        Closing or cancelling this iterator cancels the replica call, which aborts the request.
        A lost dense replica is replaced transparently (see the module docstring)."""
        self.gate.enter()
        try:
            if params.seed is None:  # so that a resumed request draws what this one would
                params = dataclasses.replace(params, seed=random.getrandbits(SEED_BITS))
            prompt = list(prompt_ids)
            sent = {i: _Sent() for i in range(params.n)}
            try:
                async for out in self._stream(prompt, params, request_id, sent):
                    yield out
            except _ChoicesLost:  # n > 1 lost mid-way: each choice goes on as its own request
                async for out in self._split(prompt, params, request_id, sent):
                    yield out
        finally:
            self.gate.leave()

    async def _split(
        self, prompt: list[int], params: SamplingParams, rid: str, sent: dict[int, _Sent]
    ) -> AsyncIterator[RequestOutput]:
        """The unfinished choices of an n > 1 request, each resumed as an n=1 request with
        seed + index (what the engine's choice would have drawn), merged into one stream."""
        queue: asyncio.Queue = asyncio.Queue()

        async def run(index: int) -> None:
            one = dataclasses.replace(params, n=1, seed=(params.seed + index) & _MASK64)
            try:
                async for out in self._stream(prompt, one, f"{rid}-c{index}", {0: sent[index]}):
                    await queue.put(dataclasses.replace(out, index=index))
                await queue.put(None)
            except BaseException as exc:  # handed to the consumer
                await queue.put(exc)

        tasks = [asyncio.create_task(run(i)) for i, s in sent.items() if not s.finished]
        try:
            for _ in range(len(tasks)):
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def _stream(
        self, prompt_ids: list[int], params: SamplingParams, rid: str, sent: dict[int, _Sent]
    ) -> AsyncIterator[RequestOutput]:
        """One replica call per attempt; `sent` tracks what the client has of each choice. An
        n=1 request resumes from its tokens; an n > 1 one restarts while nothing was sent and
        raises _ChoicesLost after that."""
        call = self.dense.options(stream=True).generate
        attempt, lost_at = 0, None
        while True:
            resume = sent[0].resume() if params.n == 1 else None
            response = call.remote(prompt_ids, params, rid, resume)
            self._responses.add(response)
            try:
                async for item in response:
                    if isinstance(item, StreamError):
                        raise self._public_error(rid, item.kind, item.message)
                    if item.error:  # "invalid": the request's own fault (e.g. its grammar)
                        kind = item.error_kind
                        if kind == "unavailable":  # e.g. the expert pool is degraded
                            log.error("request %s: unavailable: %s", rid, item.error)
                            raise RequestError(
                                kind,
                                f"the model is unavailable: {item.error} (request id {rid}); "
                                "retry later",
                            )
                        message = item.error if kind == "invalid" else f"engine: {item.error}"
                        raise self._public_error(rid, kind, message)
                    if lost_at is not None:
                        self._resumed(rid, lost_at, _count(sent))
                        lost_at = None
                    sent[item.index].add(item)
                    yield item
                    if all(s.finished for s in sent.values()):
                        return
                problem: Exception = RuntimeError("the replica's stream ended early")
            except RequestError:
                raise
            except RequestCancelledError as exc:
                if self._cut:
                    raise RequestError(
                        "unavailable",
                        f"the server shut down before the request finished (request id {rid})",
                    ) from exc
                raise
            except BackPressureError as exc:
                if lost_at is None and not _count(sent):
                    raise RequestError("queue_full", "the server is overloaded") from exc
                problem = exc  # resuming: wait for room like for a replica
            except _REPLICA_LOST as exc:
                problem = exc
            except Exception as exc:
                log.exception("request %s failed", rid)
                raise self._public_error(rid, "internal", repr(exc)) from exc
            finally:
                self._responses.discard(response)
                response.cancel()
            if self._cut:
                raise RequestError(
                    "unavailable",
                    f"the server shut down before the request finished (request id {rid})",
                )
            now = time.monotonic()
            if lost_at is None:
                lost_at = now
                self._lost_replica(rid, _count(sent), problem)
            if params.n > 1 and _count(sent):
                raise _ChoicesLost()
            elif now - lost_at > self.replica_loss_timeout_s:
                self._lost.pop(rid, None)
                log.error("request %s: no replica for %.0f s: %r", rid, now - lost_at, problem)
                raise RequestError(
                    "unavailable",
                    f"no model replica could continue the request within "
                    f"{self.replica_loss_timeout_s:.0f} s (request id {rid})",
                )
            await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
            attempt += 1

    def _lost_replica(self, rid: str, sent: int, exc: Exception) -> None:
        log.warning("request %s: dense replica lost after %d tokens (%r); resuming", rid, sent, exc)
        if not self._lost:
            self.events.add("a dense replica was lost: resuming its requests on a live replica")
        self._lost[rid] = time.monotonic()

    def _resumed(self, rid: str, lost_at: float, sent: int) -> None:
        log.warning(
            "request %s: resumed after %.1f s (%d tokens replayed)",
            rid,
            time.monotonic() - lost_at,
            sent,
        )
        self._lost.pop(rid, None)
        if not self._lost:
            self.events.add("every request of the lost dense replica continues")

    def _public_error(self, rid: str, kind: str, message: str) -> RequestError:
        """Errors about the request keep their message; server-side ones are logged in full
        and reach the client as a plain reason plus the request id."""
        if kind in ("internal", "unavailable"):
            log.error("request %s: %s: %s", rid, kind, message)
            plain = "internal error" if kind == "internal" else "the model is unavailable"
            return RequestError(kind, f"{plain} (request id {rid})")
        return RequestError(kind, message)

    def cut_all(self) -> int:
        """End every stream still running (after the drain grace); returns how many."""
        self._cut = True
        responses = list(self._responses)
        for response in responses:
            response.cancel()
        return len(responses)

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> RequestOutput:
        """The whole result (deltas merged)."""
        merged: RequestOutput | None = None
        async for out in self.stream(prompt_ids, params, request_id):
            merged = out if merged is None else merged.merge(out)
        assert merged is not None and merged.finished
        return merged

    async def replica_stats(self, calls: int) -> list[dict[str, Any]]:
        """stats() of the replicas `calls` concurrent calls reach (deduplicated by replica)."""
        results = await asyncio.gather(
            *(self.dense.stats.remote() for _ in range(max(1, calls))), return_exceptions=True
        )
        by_replica = {r["replica"]: r for r in results if isinstance(r, dict)}
        return list(by_replica.values())


class _ChoicesLost(Exception):
    """An n > 1 request lost its replica after some output (its choices resume one by one)."""


class _Sent:
    """What the client has of one choice: its tokens, their logprobs, text characters."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.chars = 0
        self.finished = False

    def add(self, out: RequestOutput) -> None:
        self.ids += out.token_ids
        self.logprobs += out.logprobs
        self.chars += len(out.text)
        self.finished = self.finished or out.finished

    def resume(self) -> ResumeState | None:
        if not self.ids:
            return None
        lps = tuple(self.logprobs) if len(self.logprobs) == len(self.ids) else ()
        return ResumeState(tuple(self.ids), lps, self.chars)


def _count(sent: dict[int, _Sent]) -> int:
    return sum(len(s.ids) for s in sent.values())


def _text_bytes(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content.encode("utf-8", "surrogatepass"))
    if isinstance(content, list):  # content parts
        return sum(_text_bytes(p.get("text") if isinstance(p, dict) else p) for p in content)
    return len(str(content))
