"""Request -> engine input, shared by the HTTP (OpenAI) and gRPC front ends: prompt to token
ids (text, token ids or chat messages through the checkpoint's chat template) and sampling
fields to a validated `SamplingParams`. Invalid input raises `InvalidParam`, a RequestError of
kind "invalid" that also names the offending field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from workers.requests import RequestError
from workers.sampler import SamplingError, SamplingParams
from workers.tokenizer import TextTokenizer, TokenizerError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SEED_RANGE = (-(2**63), 2**64)
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


class InvalidParam(RequestError):
    """A request field is invalid; `param` names it (OpenAI's error.param)."""

    def __init__(self, param: str | None, message: str, kind: str = "invalid") -> None:
        super().__init__(kind, message)
        self.param = param


@dataclass(frozen=True)
class StreamError:
    """Yielded by a dense replica instead of raising, so that the kind survives the hop."""

    kind: str
    message: str

    def to_exception(self) -> RequestError:
        return RequestError(self.kind, self.message)


@dataclass(frozen=True)
class ModelInfo:
    """What the front ends need to know about the served model (DenseReplica.model_info)."""

    name: str
    max_model_len: int
    vocab_size: int
    has_tokenizer: bool
    has_chat_template: bool


def sampling_params(
    *,
    prompt_len: int,
    max_model_len: int,
    max_tokens: int | None = None,
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    prompt_logprobs: int | None = None,
    min_p: float | None = None,
    min_tokens: int | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    repetition_penalty: float | None = None,
    logit_bias: Sequence[tuple[int, float]] = (),
    grammar: str | None = None,
    n: int | None = None,
) -> SamplingParams:
    """Validated SamplingParams. max_tokens None takes `default_max_tokens`, or, when that is
    None too (chat), whatever room the model length leaves after the prompt. None means the
    default everywhere (OpenAI clients send explicit nulls)."""
    if max_tokens is None:
        max_tokens = default_max_tokens or max(1, max_model_len - prompt_len)
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise InvalidParam("seed", f"seed must fit in 64 bits, got {seed}")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            top_k=0 if top_k is None else top_k,
            min_p=0.0 if min_p is None else float(min_p),
            seed=seed,
            stop=_stop_strings(stop),
            stop_token_ids=tuple(stop_token_ids or ()),
            ignore_eos=bool(ignore_eos),
            min_tokens=min_tokens or 0,
            logprobs=bool(logprobs),
            top_logprobs=top_logprobs if logprobs else 0,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=float(presence_penalty or 0.0),
            frequency_penalty=float(frequency_penalty or 0.0),
            repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
            logit_bias=tuple(logit_bias),
            grammar=grammar,
            n=1 if n is None else n,
        )
    except SamplingError as exc:  # its message starts with the field name
        name = str(exc).split(" ", 1)[0].rstrip(":")
        raise InvalidParam(name, str(exc)) from None


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not isinstance(s, str) or not s for s in strings):
        raise InvalidParam("stop", "stop: expected non-empty strings")
    return strings


def prompt_ids(
    tokenizer: TextTokenizer | None,
    *,
    text: str | None = None,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[dict[str, Any]] | None = None,
    param: str = "prompt",
    tools: Sequence[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Exactly one of text / token_ids / messages -> the prompt's token ids (messages with
    the chat template, which also renders `tools` and sees `template_kwargs`)."""
    if token_ids is not None:
        ids = [int(t) for t in token_ids]
    elif messages is not None:
        text = render_chat(
            tokenizer, messages, param, tools, template_kwargs, add_generation_prompt
        )
        ids = _encode(tokenizer, text, param)
    elif text is not None:
        ids = _encode(tokenizer, text, param)
    else:
        raise InvalidParam(param, f"{param}: a prompt is required")
    if not ids:
        raise InvalidParam(param, f"{param}: the prompt is empty")
    return ids


def render_chat(
    tokenizer: TextTokenizer | None,
    messages: Sequence[dict[str, Any]],
    param: str = "messages",
    tools: Sequence[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    if tokenizer is None or not tokenizer.chat_template:
        raise InvalidParam(param, "this model has no chat template: use a completion prompt")
    if not messages:
        raise InvalidParam(param, f"{param}: at least one message is required")
    for i, m in enumerate(messages):
        if m.get("role") not in CHAT_ROLES:
            raise InvalidParam(
                f"{param}.{i}.role",
                f"{param}.{i}.role: expected one of {list(CHAT_ROLES)}, got {m.get('role')!r}",
            )
    reserved = {"messages", "tools", "add_generation_prompt"} & set(template_kwargs or {})
    if reserved:
        name = sorted(reserved)[0]
        raise InvalidParam(
            "chat_template_kwargs", f"chat_template_kwargs: {name!r} is set by the request itself"
        )
    try:
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            **(template_kwargs or {}),
        )
    except TokenizerError as exc:
        raise InvalidParam(param, f"{param}: {exc}") from None


def _encode(tokenizer: TextTokenizer | None, text: str, param: str) -> list[int]:
    if tokenizer is None:
        raise InvalidParam(param, "this model has no tokenizer: send the prompt as token ids")
    return tokenizer.encode(text)


def token_strings(tokenizer: TextTokenizer | None, ids: Sequence[int]) -> list[str]:
    """Per-token text for logprob reports (vLLM's `token_id:N` without a tokenizer)."""
    if tokenizer is None:
        return [f"token_id:{i}" for i in ids]
    return [tokenizer.decode([i]) for i in ids]
