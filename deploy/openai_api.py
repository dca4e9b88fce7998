"""OpenAI request side: strict request models (unknown fields rejected; the extras agents send
to vLLM-compatible servers accepted; documented parameters we do not implement accepted only at
their no-op values), parsing with errors that name the field, and the OpenAI error body.
Responses are built in deploy/openai_format.py (deploy/responses_api.py for /v1/responses)."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy.guided import StructuredRequest, guided_grammar
from deploy.params import DEFAULT_MAX_TOKENS, InvalidParam, prompt_ids, sampling_params
from deploy.tools import Tool, ToolChoice, parse_tool_choice, parse_tools, template_tool_calls
from workers.requests import RequestError
from workers.sampler import MAX_TOP_LOGPROBS
from workers.tokenizer import TextTokenizer

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    500: "server_error",
}
ERROR_CODES = {
    "too_long": "context_length_exceeded",
    "not_found": "model_not_found",
    "queue_full": "queue_full",
    "unavailable": "unavailable",
}
_TYPE_TAG = re.compile(r"[\[A-Z]|^(str|int|float|bool|list|dict|none)$")
# Accepted and ignored: the server has no such knob (a warning header says so).
IGNORED_WITH_WARNING = ("reasoning_effort", "verbosity")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extension, accepted and ignored


class _Common(_Strict, StructuredRequest):
    default_max_tokens: ClassVar[int | None] = DEFAULT_MAX_TOKENS
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension
    min_p: float | None = None  # vLLM extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    min_tokens: int | None = None  # vLLM extension
    return_token_ids: bool = False  # vLLM extension: add token_ids to each choice
    n: int | None = Field(default=1, ge=1, le=128)
    user: str | None = None  # ignored
    safety_identifier: str | None = None  # ignored
    prompt_cache_key: str | None = None  # ignored: prefix caching is automatic
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM extension (HF semantics)
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None

    def check_supported(self) -> None:
        """Cross-field rules pydantic cannot express."""

    def sampling_fields(self, tokenizer: TextTokenizer | None) -> dict[str, Any]:
        """Keyword arguments of deploy.params.sampling_params (but the lengths)."""
        names = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                 "ignore_eos", "min_tokens", "frequency_penalty", "presence_penalty",
                 "repetition_penalty", "n")  # fmt: skip
        fields = {k: getattr(self, k) for k in names}
        fields["logit_bias"] = _logit_bias(self.logit_bias)
        fields["grammar"] = self.grammar(tokenizer)
        return fields

    def grammar(self, tokenizer: TextTokenizer | None) -> str | None:
        return guided_grammar(self)

    def output_limit(self) -> tuple[str, int | None]:
        """(field name, value) of the requested output length."""
        return "max_tokens", self.max_tokens

    @property
    def wants_logprobs(self) -> bool:
        lp = getattr(self, "logprobs", None)  # completions: int (0 counts); chat: bool
        return lp is True or type(lp) is int

    @property
    def top_logprobs_count(self) -> int:
        return 0

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def warnings(self) -> list[str]:
        """Fields accepted but ignored, for the response's Warning header."""
        return [
            f"{name} is ignored by this server"
            for name in IGNORED_WITH_WARNING
            if getattr(self, name, None) is not None
        ]


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise InvalidParam("logit_bias", f"logit_bias: keys are token ids, got {key!r}")
        out.append((int(key), float(value)))
    return tuple(out)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise InvalidParam(
                "best_of", f"best_of: only best_of = n is supported, got {self.best_of}"
            )
        if self.suffix:
            raise InvalidParam("suffix", "suffix: not supported")

    @property
    def top_logprobs_count(self) -> int:
        return self.logprobs or 0

    def sampling_fields(self, tokenizer: TextTokenizer | None) -> dict[str, Any]:
        fields = super().sampling_fields(tokenizer)
        fields["top_logprobs"] = self.top_logprobs_count
        if self.echo and self.wants_logprobs:
            fields["prompt_logprobs"] = self.top_logprobs_count
        return fields

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise InvalidParam("prompt", f"prompt: one prompt per request, got {len(p)}")
            return p[0]
        return p

    def prompt_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of deploy.params.prompt_ids."""
        prompt = self.single_prompt()
        return {"text": prompt} if isinstance(prompt, str) else {"token_ids": prompt}

    def template_kwargs(self) -> dict[str, Any]:
        return {}


class ContentPart(_Strict):
    type: Literal["text", "input_text", "output_text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # refusal, audio, ...: ignored
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def check_content(self, param: str) -> None:
        """Only an assistant message that calls tools may come without content."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise InvalidParam(
                f"{param}.content", f"{param}.content: a {self.role!r} message needs content"
            )

    def as_template_input(self, param: str = "messages") -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = template_tool_calls(self.tool_calls, f"{param}.tool_calls")
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        return out


class ChatCompletionRequest(_Common):
    default_max_tokens: ClassVar[int | None] = None  # up to the model length
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM extension: template variables
    add_generation_prompt: bool = True  # vLLM extension
    reasoning_effort: str | None = None  # ignored (with a warning header)
    verbosity: str | None = None  # ignored (with a warning header)
    store: bool | None = None  # ignored
    metadata: dict[str, str] | None = None  # ignored
    service_tier: str | None = None  # ignored

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise InvalidParam("top_logprobs", "top_logprobs: requires logprobs to be true")
        for i, message in enumerate(self.messages):
            message.check_content(f"messages.{i}")
        self.tool_list()  # validates tools and tool_choice
        self.choice()

    @property
    def top_logprobs_count(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0

    def tool_list(self) -> list[Tool]:
        return parse_tools(self.tools)

    def choice(self) -> ToolChoice:
        return parse_tool_choice(self.tool_choice, self.tool_list(), self.parallel_tool_calls)

    def grammar(self, tokenizer: TextTokenizer | None) -> str | None:
        tool_grammar = self.choice().grammar(tokenizer)
        if tool_grammar is not None and self.has_guided_output():
            raise InvalidParam(
                "tool_choice",
                "tool_choice: 'required' or a named function cannot be combined with "
                "response_format or guided decoding",
            )
        return tool_grammar or guided_grammar(self)

    def sampling_fields(self, tokenizer: TextTokenizer | None) -> dict[str, Any]:
        fields = super().sampling_fields(tokenizer)
        fields["top_logprobs"] = self.top_logprobs_count
        return fields

    def output_limit(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def prompt_kwargs(self) -> dict[str, Any]:
        messages = [m.as_template_input(f"messages.{i}") for i, m in enumerate(self.messages)]
        return {"messages": messages, "param": "messages"}

    def template_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of deploy.params.prompt_ids besides the messages: the tools the
        template renders (none with tool_choice "none", like vLLM), extra template variables."""
        choice = self.choice()
        tools = [t.spec() for t in self.tool_list()] if choice.mode != "none" else None
        return {
            "tools": tools or None,
            "template_kwargs": dict(self.chat_template_kwargs or {}),
            "add_generation_prompt": self.add_generation_prompt,
        }


def parse_request(raw: bytes, schema: type[_Common]) -> _Common:
    """JSON body -> request model; malformed JSON and bad fields raise InvalidParam."""
    try:
        body = schema.model_validate_json(raw or b"")
    except ValidationError as exc:
        raise validation_error(exc) from None
    body.check_supported()
    return body


def validation_error(exc: ValidationError) -> InvalidParam:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return InvalidParam(None, f"request body is not valid JSON: {err['msg']}")
    loc = [str(p) for p in err["loc"] if isinstance(p, int) or not _TYPE_TAG.search(p)]
    param = ".".join(loc) or None
    if err["type"] == "extra_forbidden":
        return InvalidParam(param, f"Unrecognized request argument supplied: {param}")
    if param is None:
        return InvalidParam(None, f"request body: {err['msg']}")
    return InvalidParam(param, f"{param}: {err['msg']}")


def error_body(exc: RequestError) -> dict[str, Any]:
    status = exc.http_status
    return {
        "error": {
            "message": exc.message,
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": getattr(exc, "param", None),
            "code": ERROR_CODES.get(exc.kind),
        }
    }


def engine_inputs(
    req: Any, tokenizer: TextTokenizer | None, max_model_len: int
) -> tuple[list[int], Any]:
    """A parsed request (completions, chat, responses, or gRPC's converted to one of them) ->
    (prompt token ids, SamplingParams). Blocking (tokenizes): run it off the event loop."""
    ids = prompt_ids(tokenizer, **req.prompt_kwargs(), **req.template_kwargs())
    name, limit = req.output_limit()
    if limit is not None and limit <= 0:
        raise InvalidParam(name, f"{name} must be > 0, got {limit}")
    params = sampling_params(
        prompt_len=len(ids),
        max_model_len=max_model_len,
        max_tokens=limit,
        default_max_tokens=req.default_max_tokens,
        logprobs=req.wants_logprobs,
        **req.sampling_fields(tokenizer),
    )
    return ids, params
