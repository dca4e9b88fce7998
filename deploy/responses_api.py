"""OpenAI Responses API (`POST /v1/responses`), stateless, for Codex-style agents.

Request: `input` (a string, or items: messages with text parts, `function_call` and
`function_call_output` items; `reasoning` items are skipped), `instructions` (a system message
first), function `tools` (flat form), `tool_choice`, `parallel_tool_calls`, `text.format`
(text / json_object / json_schema), `max_output_tokens`, sampling fields. Nothing is stored:
`previous_response_id`, `conversation` and `background` are refused, `store` is answered false.

Output: a `response` object whose `output` holds a `message` item (one `output_text` part) and
`function_call` items, parsed from the model's Qwen3-Coder markup (deploy/tools.py). Streaming
sends the Responses events (`response.created`, `response.output_item.added`,
`response.output_text.delta`, `response.function_call_arguments.delta`, ...,
`response.completed` / `response.incomplete`), each with a `sequence_number`."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from deploy.guided import StructuredRequest, guided_grammar
from deploy.openai_api import validation_error
from deploy.params import InvalidParam, token_strings
from deploy.tools import Event, Tool, ToolChoice, parse_tool_choice, parse_tools
from workers.requests import RequestError, RequestOutput
from workers.sampler import MAX_TOP_LOGPROBS
from workers.tokenizer import TextTokenizer

LOGPROBS_INCLUDE = "message.output_text.logprobs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextConfig(_Strict):
    format: dict[str, Any] | None = None
    verbosity: str | None = None  # ignored


class ResponsesRequest(_Strict):
    default_max_tokens: ClassVar[int | None] = None
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension
    seed: int | None = None  # extension
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None  # ignored (with a warning header if set)
    include: list[str] | None = None
    store: bool | None = None  # nothing is stored whatever it says
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # ignored: prefix caching is automatic
    service_tier: str | None = None
    truncation: str | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    stream_options: dict[str, Any] | None = None
    max_tool_calls: int | None = None

    # --------------------------------------------------------------- validation
    def check_supported(self) -> None:
        for name, why in (("previous_response_id", "responses are not stored"),
                          ("conversation", "conversations are not stored"),
                          ("background", "background responses are not supported")):  # fmt: skip
            if getattr(self, name):
                raise InvalidParam(name, f"{name}: {why}; send the whole input each time")
        if self.truncation not in (None, "disabled"):
            raise InvalidParam("truncation", "truncation: only 'disabled' is supported")
        if self.max_tool_calls is not None:
            raise InvalidParam("max_tool_calls", "max_tool_calls: not supported")
        if self.max_output_tokens is not None and self.max_output_tokens <= 0:
            raise InvalidParam(
                "max_output_tokens", f"max_output_tokens must be > 0, got {self.max_output_tokens}"
            )
        self.choice()
        self.prompt_kwargs()

    @property
    def include_usage(self) -> bool:
        return True

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())

    def warnings(self) -> list[str]:
        out = []
        if self.reasoning and self.reasoning.get("effort") is not None:
            out.append("reasoning.effort is ignored by this server")
        return out

    # ------------------------------------------------------------------ tools
    def tool_list(self) -> list[Tool]:
        flat = []
        for i, t in enumerate(self.tools or ()):
            if not isinstance(t, dict) or t.get("type") != "function":
                kind = t.get("type") if isinstance(t, dict) else t
                raise InvalidParam(
                    f"tools.{i}.type", f"tools.{i}.type: only 'function' tools, got {kind!r}"
                )
            fn = {k: t[k] for k in ("name", "description", "parameters") if k in t}
            flat.append({"type": "function", "function": fn})
        return parse_tools(flat)

    def choice(self) -> ToolChoice:
        return parse_tool_choice(self.tool_choice, self.tool_list(), self.parallel_tool_calls)

    # ----------------------------------------------------------------- inputs
    def output_limit(self) -> tuple[str, int | None]:
        return "max_output_tokens", self.max_output_tokens

    def prompt_kwargs(self) -> dict[str, Any]:
        messages = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            messages += input_messages(self.input)
        if not messages:
            raise InvalidParam("input", "input: at least one message is required")
        return {"messages": messages, "param": "input"}

    def template_kwargs(self) -> dict[str, Any]:
        choice = self.choice()
        tools = [t.spec() for t in choice.tools] if choice.mode != "none" else None
        return {"tools": tools or None}

    def sampling_fields(self, tokenizer: TextTokenizer | None) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "top_logprobs": self.top_logprobs or 0,
            "grammar": self.grammar(tokenizer),
        }

    def grammar(self, tokenizer: TextTokenizer | None) -> str | None:
        tool_grammar = self.choice().grammar(tokenizer)
        fmt = self.text.format if self.text else None
        structured = None
        if fmt is not None and fmt.get("type") != "text":
            if fmt.get("type") == "json_schema":  # flat here: name, schema, strict
                spec = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
                rf = {"type": "json_schema", "json_schema": spec}
            else:
                rf = fmt
            try:
                structured = guided_grammar(StructuredRequest(response_format=rf))
            except InvalidParam as exc:
                param = (exc.param or "").replace("response_format.json_schema", "text.format")
                message = exc.message.replace("response_format", "text.format")
                raise InvalidParam(param, message) from None
        if tool_grammar and structured:
            raise InvalidParam(
                "tool_choice", "tool_choice: a forced call cannot be combined with text.format"
            )
        return tool_grammar or structured


def input_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items -> chat-template messages (consecutive function_call items become
    one assistant message's tool_calls; function_call_output items become tool messages)."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise InvalidParam(where, f"{where}: expected an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidParam(f"{where}.role", f"{where}.role: got {role!r}")
            role = "system" if role == "developer" else role
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            name, args = item.get("name"), item.get("arguments", "{}")
            if not isinstance(name, str) or not isinstance(args, str):
                raise InvalidParam(where, f"{where}: a function_call needs name and arguments")
            try:
                parsed = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                raise InvalidParam(
                    f"{where}.arguments", f"{where}.arguments: not valid JSON ({exc.msg})"
                ) from None
            if not isinstance(parsed, dict):
                raise InvalidParam(f"{where}.arguments", f"{where}.arguments: expected an object")
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": name, "arguments": parsed}}  # fmt: skip
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = _text(item.get("output"), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output})  # fmt: skip
        elif kind == "reasoning":
            continue  # this server produces none; a client may echo another model's back
        else:
            raise InvalidParam(f"{where}.type", f"{where}.type: {kind!r} items are not supported")
    return messages


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "text"):
                raise InvalidParam(
                    f"{where}.content.{j}",
                    f"{where}.content.{j}: only text parts are supported, got {kind!r}",
                )
            parts.append(part.get("text") or "")
        return "".join(parts)
    raise InvalidParam(where, f"{where}: expected text content")


def parse_responses_request(raw: bytes) -> ResponsesRequest:
    try:
        body = ResponsesRequest.model_validate_json(raw or b"")
    except Exception as exc:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            raise validation_error(exc) from None
        raise
    body.check_supported()
    return body


# ------------------------------------------------------------------------------ output
@dataclass
class _Item:
    kind: str  # message | function_call
    id: str
    index: int
    text: str = ""  # message text, or call arguments
    call_id: str = ""
    name: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    def to_dict(self, status: str) -> dict[str, Any]:
        if self.kind == "message":
            part: dict[str, Any] = {"type": "output_text", "text": self.text, "annotations": []}
            part["logprobs"] = self.logprobs
            return {"type": "message", "id": self.id, "status": status, "role": "assistant",
                    "content": [part]}  # fmt: skip
        return {"type": "function_call", "id": self.id, "call_id": self.call_id,
                "name": self.name, "arguments": self.text, "status": status}  # fmt: skip


class ResponsesFormat:
    """One request's response object, or its stream of events, from RequestOutput deltas."""

    def __init__(
        self, rid: str, model: str, tok: TextTokenizer | None, req: ResponsesRequest
    ) -> None:
        self.rid, self.model, self.tok, self.req = rid, model, tok, req
        self.created = int(time.time())
        self.choice = req.choice()
        self.parser = self.choice.parser()
        self.items: list[_Item] = []
        self.seq = 0
        self.last: RequestOutput | None = None
        self.status = "in_progress"

    # ---------------------------------------------------------------- building
    def _events(self, out: RequestOutput) -> list[tuple[str, dict[str, Any]]]:
        """Feed one output; the stream events it causes (items are updated either way)."""
        self.last = out
        if self.parser is None:
            events = [Event("text", out.text)] if out.text else []
        else:
            events = self.parser.feed(out.text) + (self.parser.finish() if out.finished else [])
        lps = self._logprobs(out)
        sent: list[tuple[str, dict[str, Any]]] = []
        for e in events:
            if e.kind == "text":
                item = self._open("message", sent)
                item.text += e.text
                item.logprobs += lps
                sent.append(("response.output_text.delta", {"item_id": item.id,
                             "output_index": item.index, "content_index": 0, "delta": e.text,
                             "logprobs": lps}))  # fmt: skip
                lps = []
            elif e.kind == "call":
                item = self._open("function_call", sent, call_id=e.id, name=e.name)
            else:
                item = self.items[-1]
                item.text += e.text
                sent.append(("response.function_call_arguments.delta", {"item_id": item.id,
                             "output_index": item.index, "delta": e.text}))  # fmt: skip
        if out.finished:
            self._close(sent)
            self.status = "incomplete" if out.finish_reason == "length" else "completed"
        return sent

    def _open(self, kind: str, sent: list, call_id: str = "", name: str = "") -> _Item:
        cur = self.items[-1] if self.items else None
        if cur is not None and not cur.done and cur.kind == kind and kind == "message":
            return cur
        self._close(sent)
        prefix = "msg" if kind == "message" else "fc"
        item = _Item(kind, f"{prefix}_{uuid.uuid4().hex[:24]}", len(self.items), call_id=call_id,
                     name=name)  # fmt: skip
        self.items.append(item)
        added = {"output_index": item.index, "item": item.to_dict("in_progress")}
        sent.append(("response.output_item.added", added))
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
            sent.append(("response.content_part.added", where | {"part": part}))
        return item

    def _close(self, sent: list) -> None:
        cur = self.items[-1] if self.items else None
        if cur is None or cur.done:
            return
        cur.done = True
        base = {"item_id": cur.id, "output_index": cur.index}
        if cur.kind == "message":
            sent.append(("response.output_text.done", base | {"content_index": 0,
                         "text": cur.text, "logprobs": cur.logprobs}))  # fmt: skip
            part = cur.to_dict("completed")["content"][0]
            sent.append(("response.content_part.done", base | {"content_index": 0, "part": part}))
        else:
            sent.append(("response.function_call_arguments.done", base | {"arguments": cur.text}))
        sent.append(("response.output_item.done",
                     {"output_index": cur.index, "item": cur.to_dict("completed")}))  # fmt: skip

    def _logprobs(self, out: RequestOutput) -> list[dict[str, Any]]:
        if not self.req.wants_logprobs:
            return []
        tokens = token_strings(self.tok, out.token_ids)
        tops = out.top_logprobs or [[] for _ in tokens]
        result = []
        for t, lp, top in zip(tokens, out.logprobs, tops, strict=True):
            names = token_strings(self.tok, [i for i, _ in top])
            alts = [{"token": s, "logprob": v, "bytes": list(s.encode())}
                    for s, (_, v) in zip(names, top, strict=True)]  # fmt: skip
            result.append({"token": t, "logprob": lp, "bytes": list(t.encode()),
                           "top_logprobs": alts})  # fmt: skip
        return result

    def response(self) -> dict[str, Any]:
        """The response object as it stands."""
        req, last = self.req, self.last
        status = self.status
        usage = None
        if last is not None:
            usage = {
                "input_tokens": last.prompt_tokens,
                "input_tokens_details": {"cached_tokens": last.cached_tokens},
                "output_tokens": last.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": last.prompt_tokens + last.completion_tokens,
            }
        item_status = "incomplete" if status == "incomplete" else "completed"
        fmt = (req.text.format if req.text else None) or {"type": "text"}
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": [i.to_dict(item_status if i.done else "in_progress") for i in self.items],
            "usage": usage,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete" else None,
            "error": None,
            "instructions": req.instructions,
            "tools": req.tools or [],
            "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_logprobs": req.top_logprobs,
            "max_output_tokens": req.max_output_tokens,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "text": {"format": fmt},
            "truncation": "disabled",
            "metadata": req.metadata or {},
            "user": req.user,
        }  # fmt: skip

    # ---------------------------------------------------------- whole response
    def add(self, out: RequestOutput) -> None:
        self._events(out)

    def totals(self) -> tuple[int, int]:
        last = self.last
        return (last.prompt_tokens, last.completion_tokens) if last is not None else (0, 0)

    # ----------------------------------------------------------------- stream
    def _sse(self, name: str, body: dict[str, Any]) -> bytes:
        self.seq += 1
        data = {"type": name, "sequence_number": self.seq - 1} | body
        return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    def sse_start(self) -> list[bytes]:
        snap = self.response()
        return [self._sse("response.created", {"response": snap}),
                self._sse("response.in_progress", {"response": snap})]  # fmt: skip

    def sse(self, out: RequestOutput) -> list[bytes]:
        return [self._sse(name, body) for name, body in self._events(out)]

    def sse_end(self) -> list[bytes]:
        name = "response.incomplete" if self.status == "incomplete" else "response.completed"
        return [self._sse(name, {"response": self.response()})]

    def sse_error(self, exc: RequestError) -> list[bytes]:
        body = {"code": exc.kind, "message": exc.message, "param": getattr(exc, "param", None)}
        self.status = "failed"
        failed = self.response() | {"error": {"code": exc.kind, "message": exc.message}}
        return [self._sse("error", body), self._sse("response.failed", {"response": failed})]
