"""OpenAI response side: whole responses and stream chunks (`text_completion`,
`chat.completion`, `chat.completion.chunk`) built from RequestOutput deltas, and server-sent
events."""

from __future__ import annotations

import json
import time
from typing import Any

from deploy.openai_api import ChatCompletionRequest, CompletionRequest
from deploy.params import token_strings
from workers.requests import RequestOutput
from workers.tokenizer import TextTokenizer

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def usage(out: RequestOutput) -> dict[str, Any]:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
    }


class _Format:
    """Builds one request's response, or its stream chunks, from RequestOutput deltas."""

    object_full = object_chunk = ""

    def __init__(
        self,
        rid: str,
        model: str,
        tok: TextTokenizer | None,
        req: CompletionRequest | ChatCompletionRequest,
    ) -> None:
        self.rid, self.model, self.tok, self.req = rid, model, tok, req
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(self, out: RequestOutput, body: dict[str, Any], finish: bool) -> dict[str, Any]:
        logprobs = self._logprobs(out) if self.req.wants_logprobs else None
        choice = {
            "index": 0,
            **body,
            "logprobs": logprobs,
            "finish_reason": out.finish_reason if finish else None,
        }
        if self.req.return_token_ids:
            choice["token_ids"] = out.token_ids
        return choice

    def response(self, out: RequestOutput) -> dict[str, Any]:
        full = self._envelope(self.object_full, [self._choice(out, self._body(out), True)])
        return full | {"usage": usage(out)}

    def chunks(self, out: RequestOutput, first: bool) -> list[dict[str, Any]]:
        chunks = [self._envelope(self.object_chunk, [c]) for c in self._stream_choices(out, first)]
        if self.req.include_usage:
            for c in chunks:
                c["usage"] = None
        return chunks

    def usage_chunk(self, out: RequestOutput) -> dict[str, Any]:
        return self._envelope(self.object_chunk, []) | {"usage": usage(out)}

    def _logprobs(self, out: RequestOutput) -> dict[str, Any] | None:
        raise NotImplementedError

    def _body(self, out: RequestOutput) -> dict[str, Any]:
        raise NotImplementedError

    def _stream_choices(self, out: RequestOutput, first: bool) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _has_delta(self, out: RequestOutput) -> bool:
        """Text, or tokens the client asked to see (text can lag tokens: partial UTF-8)."""
        wants_tokens = self.req.return_token_ids or self.req.wants_logprobs
        return bool(out.text or (out.token_ids and wants_tokens))


class CompletionFormat(_Format):
    object_full = object_chunk = "text_completion"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._offset = 0

    def _body(self, out: RequestOutput) -> dict[str, Any]:
        return {"text": out.text}

    def _logprobs(self, out: RequestOutput) -> dict[str, Any]:
        tokens = token_strings(self.tok, out.token_ids)
        offsets = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": out.logprobs,
            "top_logprobs": None,
            "text_offset": offsets,
        }

    def _stream_choices(self, out: RequestOutput, first: bool) -> list[dict[str, Any]]:
        if not (self._has_delta(out) or out.finished):
            return []
        return [self._choice(out, {"text": out.text}, out.finished)]


class ChatFormat(_Format):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def _body(self, out: RequestOutput) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": out.text}}

    def _logprobs(self, out: RequestOutput) -> dict[str, Any]:
        tokens = token_strings(self.tok, out.token_ids)
        content = [
            {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
            for t, lp in zip(tokens, out.logprobs, strict=True)
        ]
        return {"content": content}

    def _stream_choices(self, out: RequestOutput, first: bool) -> list[dict[str, Any]]:
        choices = []
        if first:
            role = RequestOutput(out.request_id, [], [], "")
            choices.append(
                self._choice(role, {"delta": {"role": "assistant", "content": ""}}, False)
            )
        if self._has_delta(out):
            choices.append(self._choice(out, {"delta": {"content": out.text}}, False))
        if out.finished:
            done = RequestOutput(out.request_id, [], [], "", True, out.finish_reason)
            choices.append(self._choice(done, {"delta": {}}, True))
        return choices
