"""Request-level types of the engine: limits, per-request state, streamed outputs, errors.

A request's tokens are `all_ids` = prompt + output; the cache holds the first `num_computed`.
Every step feeds a piece of the rest and samples when the piece reaches the end, so a fresh
request, a decode, and a request resumed from its tokens (`ResumeState`: after a preemption
or on another replica) are one path. Sampling randomness is a function of (seed, output
position), so a resumed request draws exactly what the original would have drawn.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workers.config import ModelConfig
from workers.sampler import SamplingParams, SamplingState
from workers.structured import GrammarCompiler
from workers.tokenizer import IncrementalDetokenizer, TextTokenizer

_MASK64 = (1 << 64) - 1

# RequestError.kind -> HTTP status; the gRPC front end maps the same kinds to status codes.
HTTP_STATUS = {"invalid": 400, "too_long": 400, "not_found": 404, "queue_full": 429,
               "unavailable": 503, "internal": 500}  # fmt: skip


class RequestError(ValueError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.kind, 500)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32  # concurrent sequences (cache slots)
    max_num_batched_tokens: int = 512  # token budget of one step
    max_prefill_chunk: int = 512  # longest prefill piece of one sequence in one step
    max_model_len: int = 4096  # prompt + output tokens
    max_queue: int = 256  # waiting requests before RESOURCE_EXHAUSTED / 429

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{f.name}: expected a positive integer, got {value!r}")


@dataclass(frozen=True)
class ResumeState:
    """What a client already has of a request: its output tokens (and their logprobs) and how
    many characters of text were sent. Resuming prefills prompt + output_ids and continues."""

    output_ids: tuple[int, ...]
    output_logprobs: tuple[float, ...] = ()
    sent_text_chars: int = 0


@dataclass
class RequestOutput:
    """What one step produced for a request (deltas), or, merged, the whole result."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    index: int = 0  # choice index (n > 1)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error_kind: str = "internal"  # RequestError kind of `error` ("invalid": the request's fault)
    # per token in token_ids, its top_logprobs alternatives [(token, raw logprob)] (if asked)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # once, with the first output (if asked): per prompt token, None for the first, else
    # (raw logprob, [(token, raw logprob)] alternatives)
    prompt_logprobs: list[PromptLogprob | None] | None = None

    def merge(self, later: RequestOutput) -> RequestOutput:
        return dataclasses.replace(
            later,
            token_ids=self.token_ids + later.token_ids,
            logprobs=self.logprobs + later.logprobs,
            text=self.text + later.text,
            top_logprobs=self.top_logprobs + later.top_logprobs,
            prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs,
        )


PromptLogprob = tuple[float, list[tuple[int, float]]]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # params.seed, or a random one drawn at creation (so preemption resumes exactly)
    index: int = 0  # choice index (n > 1): choice i is a fork of choice 0 with seed + i
    forks: list[Request] = field(default_factory=list)  # choices 1..n-1 until the prompt is in
    slot: int | None = None
    num_computed: int = 0  # tokens of all_ids already in the cache
    all_ids: list[int] = field(default_factory=list)  # prompt + output
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[list[tuple[int, float]]] = field(default_factory=list)  # top_logprobs
    sampling: SamplingState | None = None  # penalty counts, grammar matcher (attach_sampling)
    prompt_logprobs: list[PromptLogprob | None] | None = None  # filled while prefilling
    detok: IncrementalDetokenizer | None = None
    text: str = ""  # accumulated output text (stop strings removed)
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache (first admission)
    block_hashes: list[bytes] | None = None  # chain hashes of the full prompt blocks
    num_registered: int = 0  # prompt blocks indexed in the prefix cache
    _sent_tokens: int = 0
    _sent_chars: int = 0
    _sent_prompt_logprobs: bool = False
    _stop_from: int = 0  # stop strings count from this text offset (after min_tokens)

    @classmethod
    def create(
        cls,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        limits: EngineConfig,
        model: ModelConfig,
    ) -> Request:
        prompt = list(prompt_ids)
        if not prompt:
            raise RequestError("invalid", "prompt is empty")
        _check_vocab(prompt, model.vocab_size, "token id")
        max_len = min(limits.max_model_len, model.max_position_embeddings)
        if len(prompt) + params.max_tokens > max_len:
            raise RequestError(
                "too_long",
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model length of {max_len} tokens",
            )
        if params.n > limits.max_num_seqs:
            raise RequestError(
                "invalid", f"n ({params.n}) exceeds the {limits.max_num_seqs} concurrent sequences"
            )
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        request = cls(request_id, prompt, params, seed, all_ids=list(prompt))
        request.forks = [request.choice(i) for i in range(1, params.n)]
        return request

    def choice(self, index: int) -> Request:
        """Choice `index` of an n > 1 request: the same prompt, its own seed and output."""
        return Request(
            self.request_id, self.prompt_ids, self.params, (self.seed + index) & _MASK64,
            index=index, all_ids=list(self.prompt_ids),
        )  # fmt: skip

    def attach_detokenizer(self, tokenizer: TextTokenizer | None) -> None:
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        for fork in self.forks:
            fork.attach_detokenizer(tokenizer)

    def attach_sampling(
        self, vocab_size: int, eos_ids: frozenset[int], grammars: GrammarCompiler | None
    ) -> None:
        """Per-choice sampling state (each choice has its own grammar matcher)."""
        end = () if self.params.ignore_eos else sorted(eos_ids)
        for r in (self, *self.forks):
            r.sampling = SamplingState(r.params, r.prompt_ids, vocab_size, end, grammars)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_ids)

    def take_fork(self, parent: Request) -> None:
        """Become a copy of `parent` right after its prompt was computed (its slot's state
        is copied by the cache); sampling then continues with this choice's own seed."""
        self.num_computed = parent.num_computed
        self.cached_tokens = parent.cached_tokens
        self.block_hashes, self.num_registered = parent.block_hashes, parent.num_registered
        self.prompt_logprobs = parent.prompt_logprobs

    # ---------------------------------------------------------------- resume
    def resume(self, state: ResumeState, eos_ids: frozenset[int], vocab_size: int) -> None:
        """Take the output a client already has: replay it through the detokenizer (and later
        the sampling state) without re-sending it; the next step prefills prompt + output."""
        ids, logprobs = list(state.output_ids), list(state.output_logprobs)
        if self.params.n > 1:
            raise RequestError(
                "invalid", "resume: resume each choice of an n > 1 request as n=1 with seed + index"
            )
        _check_vocab(ids, vocab_size, "resume.output_ids: token id")
        if logprobs and len(logprobs) != len(ids):
            raise RequestError(
                "invalid",
                f"resume.output_logprobs: {len(logprobs)} values for {len(ids)} output tokens",
            )
        if len(ids) >= self.params.max_tokens:
            raise RequestError(
                "invalid",
                f"resume.output_ids: {len(ids)} tokens already reach max_tokens "
                f"({self.params.max_tokens})",
            )
        ended = [t for t in ids if t in self.params.stop_token_ids or self._is_eos(t, eos_ids)]
        if ended:
            raise RequestError("invalid", f"resume.output_ids: already ended by token {ended[0]}")
        self.output_ids, self.output_logprobs = ids, logprobs or [0.0] * len(ids)
        self.output_top = [[] for _ in ids]
        self.all_ids = self.prompt_ids + ids
        if self.sampling is not None:
            self.sampling.replay(ids)
            if self.sampling.error is not None:
                raise RequestError("invalid", f"resume.output_ids: {self.sampling.error}")
        self._sent_prompt_logprobs = bool(ids)  # the first output carried them
        if self.detok is not None:
            self.text = self.detok.replay(ids)
            if any(stop in self.text for stop in self.params.stop):
                raise RequestError("invalid", "resume.output_ids: text already holds a stop string")
        if not 0 <= state.sent_text_chars <= len(self.text):
            raise RequestError(
                "invalid",
                f"resume.sent_text_chars: {state.sent_text_chars} is outside [0, "
                f"{len(self.text)}] (the text of output_ids)",
            )
        self._sent_tokens, self._sent_chars = len(ids), state.sent_text_chars

    # ------------------------------------------------------------------ steps
    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: the prompt (or prompt + output after a preemption or
        a resume) while prefilling, 1 while decoding."""
        return len(self.all_ids) - self.num_computed

    def next_tokens(self, budget: int) -> list[int]:
        return self.all_ids[self.num_computed : self.num_computed + budget]

    def generator(self) -> torch.Generator | None:
        """The RNG of the token at the current output position (None for greedy)."""
        if self.params.greedy:
            return None
        return torch.Generator().manual_seed(position_seed(self.seed, len(self.output_ids)))

    def append_token(
        self,
        token: int,
        logprob: float,
        eos_ids: frozenset[int],
        max_model_len: int,
        top: list[tuple[int, float]] | None = None,
    ) -> str | None:
        """Record a sampled token; return the finish reason if the request is done. Before
        min_tokens nothing stops it but the length limits."""
        self.output_ids.append(token)
        self.output_logprobs.append(logprob)
        self.output_top.append(top or [])
        self.all_ids.append(token)
        if self.sampling is not None:
            self.sampling.advance(token)
        p = self.params
        may_stop = len(self.output_ids) > p.min_tokens
        if self.detok is not None:
            self.text += self.detok.push(self.output_ids)
            if not may_stop:
                self._stop_from = len(self.text)
            for stop in p.stop if may_stop else ():
                cut = self.text.find(stop, max(0, self._stop_from - len(stop) + 1))
                if cut >= 0:
                    self.text = self.text[:cut]
                    return "stop"
        if may_stop and (token in p.stop_token_ids or self._is_eos(token, eos_ids)):
            return "stop"
        if may_stop and self.sampling is not None and self.sampling.done:
            return "stop"  # the grammar is complete: only end of sequence could follow
        if len(self.output_ids) >= p.max_tokens:
            return "length"
        if len(self.all_ids) >= max_model_len:
            return "length"
        return None

    def _is_eos(self, token: int, eos_ids: frozenset[int]) -> bool:
        return token in eos_ids and not self.params.ignore_eos

    # ---------------------------------------------------------------- outputs
    def take_output(self, finished: bool = False) -> RequestOutput:
        """The tokens and text not yet reported (text that may start a stop string is held)."""
        hold = 0 if finished else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(self._sent_chars, len(self.text) - hold)
        out = RequestOutput(
            self.request_id,
            self.output_ids[self._sent_tokens :],
            self.output_logprobs[self._sent_tokens :],
            self.text[self._sent_chars : end],
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            index=self.index,
            cached_tokens=self.cached_tokens or 0,
        )
        if self.params.logprobs and self.params.top_logprobs:
            out.top_logprobs = self.output_top[self._sent_tokens :]
        if self.prompt_logprobs is not None and not self._sent_prompt_logprobs:
            out.prompt_logprobs = self.prompt_logprobs
            self._sent_prompt_logprobs = True
        self._sent_tokens, self._sent_chars = len(self.output_ids), end
        return out

    def record_prompt_logprobs(self, start: int, entries: list[PromptLogprob]) -> None:
        """Logprobs of prompt tokens start+1, start+2, ... from logits at positions start, ..."""
        assert self.prompt_logprobs is not None
        for i, entry in enumerate(entries):
            if start + 1 + i < len(self.prompt_ids):
                self.prompt_logprobs[start + 1 + i] = entry

    def finish(
        self, reason: str, error: str | None = None, error_kind: str = "internal"
    ) -> RequestOutput:
        out = self.take_output(finished=True)
        out.finished, out.finish_reason, out.error = True, reason, error
        out.error_kind = error_kind
        return out


def position_seed(seed: int, position: int) -> int:
    """A 64-bit RNG seed for output position `position` of a request seeded with `seed`
    (splitmix64 of both), so any replica draws the same token at the same position."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ position)


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _check_vocab(ids: list[int], vocab_size: int, what: str) -> None:
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise RequestError("invalid", f"{what} {bad[0]!r} is outside [0, {vocab_size})")
