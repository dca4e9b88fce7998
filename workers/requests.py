"""Request-level types of the engine: limits, per-request state, streamed outputs, errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workers.config import ModelConfig
from workers.sampler import SamplingParams
from workers.tokenizer import IncrementalDetokenizer, TextTokenizer

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

    def merge(self, later: RequestOutput) -> RequestOutput:
        return dataclasses.replace(
            later,
            token_ids=self.token_ids + later.token_ids,
            logprobs=self.logprobs + later.logprobs,
            text=self.text + later.text,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    slot: int | None = None
    num_computed: int = 0  # prompt tokens already in the cache
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    text: str = ""  # accumulated output text (stop strings removed)
    _sent_tokens: int = 0
    _sent_chars: int = 0

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
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < model.vocab_size]
        if bad:
            raise RequestError("invalid", f"token id {bad[0]!r} is outside [0, {model.vocab_size})")
        max_len = min(limits.max_model_len, model.max_position_embeddings)
        if len(prompt) + params.max_tokens > max_len:
            raise RequestError(
                "too_long",
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model length of {max_len} tokens",
            )
        return cls(request_id, prompt, params, params.generator())

    def attach_detokenizer(self, tokenizer: TextTokenizer | None) -> None:
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)

    def append_token(
        self, token: int, logprob: float, eos_ids: frozenset[int], max_model_len: int
    ) -> str | None:
        """Record a sampled token; return the finish reason if the request is done."""
        self.output_ids.append(token)
        self.output_logprobs.append(logprob)
        p = self.params
        if self.detok is not None:
            self.text += self.detok.push(self.output_ids)
            for stop in p.stop:
                cut = self.text.find(stop)
                if cut >= 0:
                    self.text = self.text[:cut]
                    return "stop"
        if token in p.stop_token_ids or (token in eos_ids and not p.ignore_eos):
            return "stop"
        if len(self.output_ids) >= p.max_tokens:
            return "length"
        if len(self.prompt_ids) + len(self.output_ids) >= max_model_len:
            return "length"
        return None

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
        )
        self._sent_tokens, self._sent_chars = len(self.output_ids), end
        return out

    def finish(self, reason: str, error: str | None = None) -> RequestOutput:
        out = self.take_output(finished=True)
        out.finished, out.finish_reason, out.error = True, reason, error
        return out
