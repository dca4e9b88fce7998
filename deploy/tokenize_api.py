"""vLLM's `/tokenize` and `/detokenize` and the OpenAI model card (`/v1/models`,
`/v1/models/{id}`): request models and the answers, without Ray (the HTTP ingress calls these)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy.openai_api import ChatMessage, validation_error
from deploy.params import InvalidParam, ModelInfo, prompt_ids
from deploy.tools import parse_tools
from workers.tokenizer import TextTokenizer


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # accepted: this tokenizer adds none either way
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def _parse(raw: bytes, schema: type[BaseModel]) -> Any:
    try:
        return schema.model_validate_json(raw or b"")
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_tokenize(raw: bytes) -> TokenizeRequest:
    req = _parse(raw, TokenizeRequest)
    if (req.prompt is None) == (req.messages is None):
        raise InvalidParam("prompt", "set exactly one of prompt and messages")
    return req


def parse_detokenize(raw: bytes) -> DetokenizeRequest:
    return _parse(raw, DetokenizeRequest)


def tokenize(req: TokenizeRequest, tok: TextTokenizer | None, info: ModelInfo) -> dict[str, Any]:
    """{"count", "max_model_len", "tokens"[, "token_strs"]}. Blocking (tokenizes)."""
    if req.messages is not None:
        messages = [m.as_template_input(f"messages.{i}") for i, m in enumerate(req.messages)]
        tools = [t.spec() for t in parse_tools(req.tools)]
        ids = prompt_ids(tok, messages=messages, param="messages", tools=tools or None,
                         template_kwargs=req.chat_template_kwargs,
                         add_generation_prompt=req.add_generation_prompt)  # fmt: skip
    else:
        ids = prompt_ids(tok, text=req.prompt) if req.prompt else []
    out: dict[str, Any] = {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = [tok.decode([i]) for i in ids] if tok is not None else None
    return out


def detokenize(req: DetokenizeRequest, tok: TextTokenizer | None, info: ModelInfo) -> dict:
    if tok is None:
        raise InvalidParam("tokens", "this model has no tokenizer")
    bad = [t for t in req.tokens if not 0 <= t < info.vocab_size]
    if bad:
        raise InvalidParam(
            "tokens", f"tokens: {bad[0]} is outside the vocabulary [0, {info.vocab_size})"
        )
    return {"prompt": tok.decode(list(req.tokens))}


def model_card(info: ModelInfo, created: int, root: str) -> dict[str, Any]:
    return {
        "id": info.name,
        "object": "model",
        "created": created,
        "owned_by": "expertmesh",
        "root": root,
        "max_model_len": info.max_model_len,
    }
