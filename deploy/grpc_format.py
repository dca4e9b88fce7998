"""gRPC generation requests <-> the engine, with the HTTP API's rules: a GenerateRequest is
converted into the equivalent OpenAI request (so validation, chat templating, tools and
structured outputs are exactly the HTTP ones), and RequestOutput deltas into GenerateResponses
(tool calls parsed per choice, as deltas in a stream; all n choices in a unary answer)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pydantic import ValidationError

from deploy.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    _Common,
    engine_inputs,
    validation_error,
)
from deploy.params import InvalidParam
from deploy.tools import Event, ToolChoice, parse_tool_calls
from router.rpc import generate_pb2
from workers.requests import RequestOutput
from workers.sampler import SamplingParams
from workers.tokenizer import TextTokenizer

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed", "min_p", "presence_penalty",
             "frequency_penalty", "repetition_penalty", "min_tokens", "n")  # fmt: skip


def to_openai(request: generate_pb2.GenerateRequest) -> _Common:
    """The OpenAI request equivalent to a GenerateRequest (InvalidParam names the field)."""
    kind = request.WhichOneof("prompt")
    body: dict[str, Any] = {"model": request.model}
    for name in _OPTIONAL:
        if request.HasField(name):
            body[name] = getattr(request, name)
    body |= {"stop": list(request.stop), "stop_token_ids": list(request.stop_token_ids),
             "ignore_eos": request.ignore_eos}  # fmt: skip
    if request.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in request.logit_bias.items()}
    body |= _structured(request.structured_output)
    if kind == "chat":
        body["messages"] = [_message(m) for m in request.chat.messages]
        body |= _tools(request)
        body["logprobs"] = request.logprobs
        if request.top_logprobs:
            body["top_logprobs"] = request.top_logprobs
        schema: type[_Common] = ChatCompletionRequest
    elif kind in ("text", "token_ids"):
        if request.tools or request.tool_choice or request.chat_template_kwargs_json:
            raise InvalidParam("tools", "tools: need a chat prompt")
        body["prompt"] = request.text if kind == "text" else list(request.token_ids.ids)
        if request.logprobs:
            body["logprobs"] = request.top_logprobs
        schema = CompletionRequest
    else:
        raise InvalidParam("prompt", "prompt: set one of text, token_ids or chat")
    try:
        req = schema.model_validate(body)
    except ValidationError as exc:
        raise _rename(validation_error(exc)) from None
    try:
        req.check_supported()
    except InvalidParam as exc:
        raise _rename(exc) from None
    return req


def _rename(exc: InvalidParam) -> InvalidParam:
    """HTTP field names -> the GenerateRequest's."""
    param = exc.param or ""
    names = {"messages": "chat.messages", "response_format": "structured_output",
             "guided_json": "structured_output.json_schema",
             "guided_regex": "structured_output.regex", "guided_choice": "structured_output.choice",
             "guided_grammar": "structured_output.grammar", "prompt": "prompt"}  # fmt: skip
    for http, grpc_name in names.items():
        if param == http or param.startswith(http + "."):
            new = grpc_name + param[len(http) :]
            return InvalidParam(new, exc.message.replace(param, new, 1))
    return exc


def _message(m: generate_pb2.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments or "{}"}}
                             for c in m.tool_calls]  # fmt: skip
        out["content"] = m.content or None
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out


def _tools(request: generate_pb2.GenerateRequest) -> dict[str, Any]:
    body: dict[str, Any] = {}
    tools = []
    for i, t in enumerate(request.tools):
        try:
            params = json.loads(t.parameters_json) if t.parameters_json else None
        except json.JSONDecodeError as exc:
            where = f"tools.{i}.parameters_json"
            raise InvalidParam(where, f"{where}: not valid JSON ({exc.msg})") from None
        fn: dict[str, Any] = {"name": t.name, "description": t.description}
        if params is not None:
            fn["parameters"] = params
        tools.append({"type": "function", "function": fn})
    if tools:
        body["tools"] = tools
    choice = request.tool_choice
    if choice:
        named = {"type": "function", "function": {"name": choice}}
        body["tool_choice"] = choice if choice in ("auto", "none", "required") else named
    if request.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.chat_template_kwargs_json:
        try:
            kwargs = json.loads(request.chat_template_kwargs_json)
        except json.JSONDecodeError as exc:
            where = "chat_template_kwargs_json"
            raise InvalidParam(where, f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(kwargs, dict):
            raise InvalidParam(
                "chat_template_kwargs_json", "chat_template_kwargs_json: expected a JSON object"
            )
        body["chat_template_kwargs"] = kwargs
    return body


def _structured(so: generate_pb2.StructuredOutput) -> dict[str, Any]:
    kind = so.WhichOneof("kind")
    if kind == "json_schema":
        return {"guided_json": so.json_schema}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}} if so.json_object else {}
    if kind == "regex":
        return {"guided_regex": so.regex}
    if kind == "choice":
        return {"guided_choice": list(so.choice.choices)}
    if kind == "grammar":
        return {"guided_grammar": so.grammar}
    return {}


def request_inputs(
    request: generate_pb2.GenerateRequest, tokenizer: TextTokenizer | None, max_model_len: int
) -> tuple[list[int], SamplingParams, GrpcFormat]:
    """GenerateRequest -> (prompt ids, SamplingParams, the response builder). Blocking."""
    req = to_openai(request)
    try:
        ids, params = engine_inputs(req, tokenizer, max_model_len)
    except InvalidParam as exc:
        raise _rename(exc) from None
    if request.HasField("prompt_logprobs"):
        try:
            params = dataclasses.replace(params, prompt_logprobs=request.prompt_logprobs)
        except ValueError as exc:
            raise InvalidParam("prompt_logprobs", str(exc)) from None
    choice = req.choice() if isinstance(req, ChatCompletionRequest) else ToolChoice("none")
    return ids, params, GrpcFormat(choice, params)


class GrpcFormat:
    """RequestOutput deltas -> GenerateResponses for one request."""

    def __init__(self, choice: ToolChoice, params: SamplingParams) -> None:
        self.choice = choice
        self.params = params
        self.parsers: dict[int, Any] = {}
        self.merged: dict[int, RequestOutput] = {}

    def stream(self, out: RequestOutput, request_id: str) -> generate_pb2.GenerateResponse:
        """One choice's delta (text without call markup, call deltas)."""
        if out.index not in self.parsers:
            self.parsers[out.index] = self.choice.parser()
        parser = self.parsers[out.index]
        if parser is None:
            return self._response(out, request_id, out.text, [], 0)
        events = parser.feed(out.text) + (parser.finish() if out.finished else [])
        calls = [_call_delta(e) for e in events if e.kind != "text"]
        text = "".join(e.text for e in events if e.kind == "text")
        return self._response(out, request_id, text, calls, len(parser.calls))

    def add(self, out: RequestOutput) -> None:
        prev = self.merged.get(out.index)
        self.merged[out.index] = out if prev is None else prev.merge(out)

    def unary(self, request_id: str) -> generate_pb2.GenerateResponse:
        """The whole answer: choice 0's fields, and every choice in `choices` when n > 1."""
        answers = []
        for index in sorted(self.merged):
            out = self.merged[index]
            text, calls = out.text, []
            if self.choice.parses:
                parsed = parse_tool_calls(out.text, self.choice.tools, self.choice.max_calls)
                text = parsed.content or ""
                calls = [generate_pb2.ToolCall(index=i, id=c.id, name=c.name,
                                               arguments=c.arguments)
                         for i, c in enumerate(parsed.calls)]  # fmt: skip
            answers.append(self._response(out, request_id, text, calls, len(calls)))
        first = answers[0]
        if len(answers) > 1:
            first.choices.extend(answers)
            done = sum(o.completion_tokens for o in self.merged.values())
            first.usage.completion_tokens = done
            first.usage.total_tokens = first.usage.prompt_tokens + done
        return first

    def _response(
        self,
        out: RequestOutput,
        request_id: str,
        text: str,
        calls: list[generate_pb2.ToolCall],
        num_calls: int,
    ) -> generate_pb2.GenerateResponse:
        p = self.params
        reason = ""
        if out.finished:
            reason = out.finish_reason or ""
            reason = "tool_calls" if num_calls and reason == "stop" else reason
        response = generate_pb2.GenerateResponse(
            request_id=request_id,
            text=text,
            token_ids=out.token_ids,
            logprobs=out.logprobs if p.logprobs else [],
            finish_reason=reason,
            index=out.index,
            tool_calls=calls,
        )
        if p.logprobs and p.top_logprobs:
            for top in out.top_logprobs:
                response.top_logprobs.add(
                    token_ids=[t for t, _ in top], logprobs=[v for _, v in top]
                )
        for entry in out.prompt_logprobs or ():
            item = response.prompt_logprobs.add()
            if entry is not None:
                item.logprob = entry[0]
                item.top.token_ids.extend(t for t, _ in entry[1])
                item.top.logprobs.extend(v for _, v in entry[1])
        if out.finished:
            response.usage.CopyFrom(generate_pb2.Usage(
                prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                total_tokens=out.prompt_tokens + out.completion_tokens,
                cached_tokens=out.cached_tokens,
            ))  # fmt: skip
        return response


def _call_delta(e: Event) -> generate_pb2.ToolCall:
    if e.kind == "call":
        return generate_pb2.ToolCall(index=e.index, id=e.id, name=e.name)
    return generate_pb2.ToolCall(index=e.index, arguments=e.text)
