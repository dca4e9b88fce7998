"""OpenAI response side: whole responses and stream chunks (`text_completion`,
`chat.completion`, `chat.completion.chunk`) built from RequestOutput deltas of the n choices of
a request, and server-sent events.

A format object is per request: `add(out)` collects outputs for the whole response, `chunks(out)`
turns one output into stream chunks. Chat choices of a request with tools run the model's text
through deploy/tools.py (calls become `tool_calls`; text that may start a call is held back
while streaming). Logprobs are of the raw model distribution (see workers/sampler.py)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from deploy.openai_api import ChatCompletionRequest, CompletionRequest, _Common, error_body
from deploy.params import token_strings
from deploy.tools import Event, ToolChoice, ToolParser, parse_tool_calls
from workers.requests import RequestError, RequestOutput
from workers.tokenizer import TextTokenizer

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


def usage_dict(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def warning_headers(req: Any) -> dict[str, str]:
    """An RFC 7234 Warning header naming the fields the server accepted but ignores."""
    notes = req.warnings()
    return {"Warning": ", ".join(f'299 - "{n}"' for n in notes)} if notes else {}


def usage(out: RequestOutput) -> dict[str, Any]:
    return usage_dict(out.prompt_tokens, out.completion_tokens, out.cached_tokens)


@dataclass
class _Choice:
    """One choice's state: its merged output (whole responses) and stream position."""

    merged: RequestOutput | None = None
    started: bool = False  # its first stream chunk went out
    completion_tokens: int = 0
    parser: ToolParser | None = None
    text_offset: int = 0  # completions logprobs: characters before the next token
    echoed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class _Format:
    """Builds one request's response, or its stream chunks, from RequestOutput deltas."""

    object_full = object_chunk = ""

    def __init__(
        self,
        rid: str,
        model: str,
        tok: TextTokenizer | None,
        req: _Common,
        prompt_ids: list[int] | None = None,
    ) -> None:
        self.rid, self.model, self.tok, self.req = rid, model, tok, req
        self.prompt_ids = prompt_ids or []
        self.created = int(time.time())
        self.choices: dict[int, _Choice] = {}
        self.prompt_tokens = self.cached_tokens = 0

    # ---------------------------------------------------------------- shared
    def _state(self, out: RequestOutput) -> _Choice:
        self.prompt_tokens = max(self.prompt_tokens, out.prompt_tokens)
        self.cached_tokens = max(self.cached_tokens, out.cached_tokens)
        choice = self.choices.get(out.index)
        if choice is None:
            choice = self.choices[out.index] = self._new_choice()
        choice.completion_tokens = max(choice.completion_tokens, out.completion_tokens)
        return choice

    def _new_choice(self) -> _Choice:
        return _Choice()

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage(self) -> dict[str, Any]:
        """Prompt tokens once (the choices share the prefill), completion tokens summed."""
        done = sum(c.completion_tokens for c in self.choices.values())
        return usage_dict(self.prompt_tokens, done, self.cached_tokens)

    def totals(self) -> tuple[int, int]:
        """(prompt tokens, completion tokens of all choices), for metrics."""
        return self.prompt_tokens, sum(c.completion_tokens for c in self.choices.values())

    # ------------------------------------------------------------ whole response
    def add(self, out: RequestOutput) -> None:
        choice = self._state(out)
        choice.merged = out if choice.merged is None else choice.merged.merge(out)

    def response(self) -> dict[str, Any]:
        choices = [self._full_choice(i, c) for i, c in sorted(self.choices.items())]
        return self._envelope(self.object_full, choices) | {"usage": self.usage()}

    def _full_choice(self, index: int, c: _Choice) -> dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------- stream
    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        choice = self._state(out)
        chunks = [self._envelope(self.object_chunk, [c]) for c in self._stream(out, choice)]
        if self.req.include_usage:
            for c in chunks:
                c["usage"] = None
        return chunks

    def usage_chunk(self) -> dict[str, Any]:
        return self._envelope(self.object_chunk, []) | {"usage": self.usage()}

    def _stream(self, out: RequestOutput, c: _Choice) -> list[dict[str, Any]]:
        raise NotImplementedError

    # server-sent events: what the HTTP ingress writes (the Responses format has the same)
    def sse_start(self) -> list[bytes]:
        return []

    def sse(self, out: RequestOutput) -> list[bytes]:
        return [sse(chunk) for chunk in self.chunks(out)]

    def sse_end(self) -> list[bytes]:
        return ([sse(self.usage_chunk())] if self.req.include_usage else []) + [SSE_DONE]

    def sse_error(self, exc: RequestError) -> list[bytes]:
        return [sse(error_body(exc)), SSE_DONE]

    def _token_ids(self, out: RequestOutput) -> dict[str, Any]:
        return {"token_ids": out.token_ids} if self.req.return_token_ids else {}

    @property
    def _wants_tokens(self) -> bool:
        return self.req.return_token_ids or self.req.wants_logprobs


class CompletionFormat(_Format):
    object_full = object_chunk = "text_completion"
    req: CompletionRequest

    def _echo(self, c: _Choice) -> tuple[str, dict[str, Any] | None]:
        """The prompt's text and logprobs, once per choice (echo)."""
        if not self.req.echo or c.echoed:
            return "", None
        c.echoed = True
        text = self._prompt_text()
        if not self.req.wants_logprobs:
            c.text_offset += len(text)
            return text, None
        entries = c.extra.get("prompt_logprobs") or [None] * len(self.prompt_ids)
        tokens = token_strings(self.tok, self.prompt_ids)
        lps = [None if e is None else e[0] for e in entries]
        tops = [None if e is None else self._top_map(e[1]) for e in entries]
        return text, self._logprob_block(c, tokens, lps, tops)

    def _prompt_text(self) -> str:
        p = self.req.single_prompt()
        if isinstance(p, str):
            return p
        return self.tok.decode(list(p)) if self.tok is not None else ""

    def _top_map(self, top: list[tuple[int, float]]) -> dict[str, float]:
        return dict(
            zip(token_strings(self.tok, [t for t, _ in top]), (v for _, v in top), strict=True)
        )

    def _logprob_block(
        self, c: _Choice, tokens: list[str], lps: list, tops: list
    ) -> dict[str, Any]:
        offsets = []
        for t in tokens:
            offsets.append(c.text_offset)
            c.text_offset += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}  # fmt: skip

    def _logprobs(self, out: RequestOutput, c: _Choice) -> dict[str, Any] | None:
        if not self.req.wants_logprobs:
            return None
        k = self.req.top_logprobs_count
        tops = [self._top_map(t) for t in out.top_logprobs] if k else None
        return self._logprob_block(c, token_strings(self.tok, out.token_ids), list(out.logprobs),
                                   tops)  # fmt: skip

    def _full_choice(self, index: int, c: _Choice) -> dict[str, Any]:
        out = c.merged
        assert out is not None
        c.extra["prompt_logprobs"] = out.prompt_logprobs
        c.text_offset, c.echoed = 0, False
        echo_text, echo_lp = self._echo(c)
        logprobs = _join_logprobs(echo_lp, self._logprobs(out, c))
        return {
            "index": index,
            "text": echo_text + out.text,
            "logprobs": logprobs,
            "finish_reason": out.finish_reason,
            **self._token_ids(out),
        }

    def _stream(self, out: RequestOutput, c: _Choice) -> list[dict[str, Any]]:
        if out.prompt_logprobs is not None:
            c.extra["prompt_logprobs"] = out.prompt_logprobs
        echo_text, echo_lp = self._echo(c)
        if not (echo_text or out.text or out.finished or (out.token_ids and self._wants_tokens)):
            return []
        logprobs = _join_logprobs(echo_lp, self._logprobs(out, c))
        return [{
            "index": out.index,
            "text": echo_text + out.text,
            "logprobs": logprobs,
            "finish_reason": out.finish_reason if out.finished else None,
            **self._token_ids(out),
        }]  # fmt: skip


def _join_logprobs(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None or b is None:
        return a or b
    tops = None if a["top_logprobs"] is None and b["top_logprobs"] is None else (
        (a["top_logprobs"] or [None] * len(a["tokens"])) + (b["top_logprobs"] or [])
    )  # fmt: skip
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "text_offset")} | {
        "top_logprobs": tops
    }


class ChatFormat(_Format):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"
    req: ChatCompletionRequest

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_choice: ToolChoice = self.req.choice()

    def _new_choice(self) -> _Choice:
        return _Choice(parser=self.tool_choice.parser())

    def _logprobs(self, out: RequestOutput) -> dict[str, Any] | None:
        if not self.req.wants_logprobs:
            return None
        tokens = token_strings(self.tok, out.token_ids)
        tops = out.top_logprobs or [[] for _ in tokens]
        content = []
        for t, lp, top in zip(tokens, out.logprobs, tops, strict=True):
            alts = [
                {"token": s, "logprob": v, "bytes": list(s.encode())}
                for s, (_, v) in zip(token_strings(self.tok, [i for i, _ in top]), top, strict=True)
            ]
            content.append({"token": t, "logprob": lp, "bytes": list(t.encode()),
                            "top_logprobs": alts})  # fmt: skip
        return {"content": content}

    def _finish_reason(self, out: RequestOutput, calls: int) -> str | None:
        if calls and out.finish_reason == "stop":
            return "tool_calls"
        return out.finish_reason

    def _full_choice(self, index: int, c: _Choice) -> dict[str, Any]:
        out = c.merged
        assert out is not None
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        calls = 0
        if self.tool_choice.parses:
            parsed = parse_tool_calls(out.text, self.tool_choice.tools, self.tool_choice.max_calls)
            message["content"] = parsed.content
            if parsed.calls:
                message["tool_calls"] = [call.to_openai() for call in parsed.calls]
                calls = len(parsed.calls)
        return {
            "index": index,
            "message": message,
            "logprobs": self._logprobs(out),
            "finish_reason": self._finish_reason(out, calls),
            **self._token_ids(out),
        }

    def _stream(self, out: RequestOutput, c: _Choice) -> list[dict[str, Any]]:
        choices = []
        if not c.started:
            c.started = True
            choices.append(self._delta(out.index, {"role": "assistant", "content": ""}))
        if c.parser is None:
            events = [Event("text", out.text)] if out.text else []
        else:
            events = c.parser.feed(out.text) + (c.parser.finish() if out.finished else [])
        deltas = [_event_delta(e) for e in events]
        logprobs = self._logprobs(out) if out.token_ids else None
        if not deltas and out.token_ids and self._wants_tokens:
            deltas = [{"content": ""}]  # tokens whose text is not out yet (held back)
        for i, delta in enumerate(deltas):
            extra = {"logprobs": logprobs, **self._token_ids(out)} if i == 0 else {}
            choices.append(self._delta(out.index, delta, **extra))
        if out.finished:
            calls = len(c.parser.calls) if c.parser is not None else 0
            choices.append(self._delta(out.index, {}, finish=self._finish_reason(out, calls)))
        return choices

    def _delta(
        self,
        index: int,
        delta: dict[str, Any],
        logprobs: dict[str, Any] | None = None,
        finish: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                **extra}  # fmt: skip


def _event_delta(e: Event) -> dict[str, Any]:
    if e.kind == "text":
        return {"content": e.text}
    if e.kind == "call":
        fn = {"name": e.name, "arguments": ""}
        return {"tool_calls": [{"index": e.index, "id": e.id, "type": "function", "function": fn}]}
    return {"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]}
