"""OpenAI request side: strict request models (unknown fields rejected; documented parameters
we do not implement accepted only at their no-op values), parsing with errors that name the
field, and the OpenAI error body. Responses are built in deploy/openai_format.py."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy.params import DEFAULT_MAX_TOKENS, InvalidParam
from workers.requests import RequestError

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extension, accepted and ignored


class _Common(_Strict):
    default_max_tokens: ClassVar[int | None] = DEFAULT_MAX_TOKENS
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    return_token_ids: bool = False  # vLLM extension: add token_ids to each choice
    n: int | None = 1
    user: str | None = None  # ignored
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None

    def check_supported(self) -> None:
        """Documented OpenAI parameters accepted only at their no-op values."""
        rules = [
            ("n", self.n in (None, 1), "only n=1 is supported"),
            ("frequency_penalty", not self.frequency_penalty, "only 0 is supported"),
            ("presence_penalty", not self.presence_penalty, "only 0 is supported"),
            ("logit_bias", not self.logit_bias, "not supported"),
        ]
        for name, ok, why in rules:
            if not ok:
                raise InvalidParam(name, f"{name}: {why}, got {getattr(self, name)!r}")

    def sampling_fields(self) -> dict[str, Any]:
        names = ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")
        return {k: getattr(self, k) for k in names}

    def output_limit(self) -> tuple[str, int | None]:
        """(field name, value) of the requested output length."""
        return "max_tokens", self.max_tokens

    @property
    def wants_logprobs(self) -> bool:
        lp = getattr(self, "logprobs", None)  # completions: int (0 counts); chat: bool
        return lp is True or type(lp) is int

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidParam("echo", "echo: not supported")
        if self.best_of not in (None, 1):
            raise InvalidParam("best_of", f"best_of: only 1 is supported, got {self.best_of}")
        if self.suffix:
            raise InvalidParam("suffix", "suffix: not supported")

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


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # refusal, ...: ignored
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def check_content(self, param: str) -> None:
        """Only an assistant message that calls tools may come without content."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise InvalidParam(
                f"{param}.content", f"{param}.content: a {self.role!r} message needs content"
            )

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out = {"role": self.role, "content": content or ""}
        return out | ({"name": self.name} if self.name else {})


class ChatCompletionRequest(_Common):
    default_max_tokens: ClassVar[int | None] = None  # up to the model length
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None  # ignored
    metadata: dict[str, str] | None = None  # ignored
    service_tier: str | None = None  # ignored

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs:
            raise InvalidParam(
                "top_logprobs",
                "top_logprobs: only 0 is supported (the sampled token's logprob is returned)",
            )
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidParam("response_format", "response_format: only type 'text'")
        if self.tools or self.tool_choice not in (None, "none"):
            raise InvalidParam("tools", "tools: tool calling is not supported")
        for i, message in enumerate(self.messages):
            message.check_content(f"messages.{i}")

    def output_limit(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def prompt_kwargs(self) -> dict[str, Any]:
        return {"messages": [m.as_template_input() for m in self.messages], "param": "messages"}


def parse_request(raw: bytes, schema: type[_Common]) -> _Common:
    """JSON body -> request model; malformed JSON and bad fields raise InvalidParam."""
    try:
        body = schema.model_validate_json(raw or b"")
    except ValidationError as exc:
        raise _validation_error(exc) from None
    body.check_supported()
    return body


def _validation_error(exc: ValidationError) -> InvalidParam:
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
