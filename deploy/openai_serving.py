"""The generation endpoints of the HTTP ingress as data: how each parses its body, names its
ids and builds its response (deploy/app.py runs them all through one path: auth, body cap,
parse, inputs, stream, then a whole response or server-sent events)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deploy.openai_api import ChatCompletionRequest, CompletionRequest, parse_request
from deploy.openai_format import ChatFormat, CompletionFormat
from deploy.responses_api import ResponsesFormat, parse_responses_request


@dataclass(frozen=True)
class Endpoint:
    name: str  # metrics label
    parse: Callable[[bytes], Any]  # body -> request model (InvalidParam on bad input)
    id_prefix: str
    make_format: Callable[..., Any]  # (rid, model name, tokenizer, request, prompt ids)


def _responses_format(rid: str, model: str, tok: Any, req: Any, ids: list[int]) -> Any:
    return ResponsesFormat(rid, model, tok, req)


ENDPOINTS = {
    "completions": Endpoint(
        "completions", lambda raw: parse_request(raw, CompletionRequest), "cmpl", CompletionFormat
    ),
    "chat_completions": Endpoint(
        "chat_completions",
        lambda raw: parse_request(raw, ChatCompletionRequest),
        "chatcmpl",
        ChatFormat,
    ),
    "responses": Endpoint("responses", parse_responses_request, "resp", _responses_format),
}
