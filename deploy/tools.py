"""Tool calls in Qwen3-Coder's format: parsing the model's markup into OpenAI `tool_calls`
(whole responses and streaming deltas) and the grammar that forces a valid call.

The model writes calls after any text, in the form its chat template teaches:

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    value (raw text; may span lines)
    </parameter>
    </function>
    </tool_call>

Parameter values are converted by the tool's JSON schema types (integer, number, boolean,
null, object, array; strings stay raw); a value that does not convert stays a string.

One incremental parser serves both paths, so a streamed response reassembles to exactly the
whole one. A call is decided at `<function=NAME>` with NAME one of the request's tools: from
then on it is a tool call (name first, then one argument fragment per finished parameter; the
fragments concatenate to `json.dumps(arguments)`). Until then, text that may start a call
(`<tool_call>` and the whitespace before it) is held back; markup that turns out not to be a
call is sent as text. Whitespace around calls is dropped; other text stays content.
"""

from __future__ import annotations

import ast
import json
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from deploy.params import InvalidParam
from workers.structured import GrammarError, json_subschema, lark_grammar

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNC_OPEN, FUNC_CLOSE = "<function=", "</function>"
PARAM_OPEN, PARAM_CLOSE = "<parameter=", "</parameter>"
_MAX_NAME = 256  # longest function / parameter name we wait for before calling it text


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments (an object)

    @property
    def properties(self) -> dict[str, Any]:
        props = self.parameters.get("properties")
        return props if isinstance(props, dict) else {}

    @property
    def required(self) -> list[str]:
        req = self.parameters.get("required")
        return [r for r in req if isinstance(r, str)] if isinstance(req, list) else []

    def spec(self) -> dict[str, Any]:
        """The OpenAI tool object the chat template renders."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


def parse_tools(raw: Sequence[Any] | None, param: str = "tools") -> list[Tool]:
    """OpenAI `tools` (function tools) -> Tool list; InvalidParam names the bad field."""
    tools: list[Tool] = []
    for i, item in enumerate(raw or ()):
        where = f"{param}.{i}"
        if not isinstance(item, dict) or item.get("type", "function") != "function":
            raise InvalidParam(where, f"{where}: only tools of type 'function' are supported")
        fn = item.get("function")
        if not isinstance(fn, dict):
            raise InvalidParam(f"{where}.function", f"{where}.function: expected an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or "<" in name or ">" in name:
            raise InvalidParam(
                f"{where}.function.name",
                f"{where}.function.name: expected 1-64 characters without '<' or '>', got {name!r}",
            )
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidParam(
                f"{where}.function.parameters", f"{where}.function.parameters: expected an object"
            )
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise InvalidParam(
                f"{where}.function.description", f"{where}.function.description: expected a string"
            )
        if any(t.name == name for t in tools):
            raise InvalidParam(f"{where}.function.name", f"{where}: duplicate tool name {name!r}")
        tools.append(Tool(name, desc, params))
    return tools


# ------------------------------------------------------------------------- value types
def schema_types(schema: Any) -> list[str]:
    """JSON types a schema allows ([] = unknown / any)."""
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            out: list[str] = []
            for sub in schema[key]:
                sub_types = schema_types(sub)
                if not sub_types:
                    return []
                out += [x for x in sub_types if x not in out]
            return out
    values = schema["enum"] if isinstance(schema.get("enum"), list) else None
    if values is None and "const" in schema:
        values = [schema["const"]]
    if values:
        return sorted({_json_type(v) for v in values})
    return []


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), "string")


def convert_value(raw: str, schema: Any) -> Any:
    """A parameter's raw text -> a JSON value by the schema's types; strings stay as they are,
    and text that converts to none of the types stays a string."""
    types = schema_types(schema)
    if not types or types == ["string"]:
        return raw
    text = raw.strip()
    for t in (t for t in types if t != "string"):
        ok, value = _convert(text, t)
        if ok:
            return value
    return raw


def _convert(text: str, t: str) -> tuple[bool, Any]:
    low = text.lower()
    if t == "null":
        return (True, None) if low in ("null", "none") else (False, None)
    if t == "boolean":
        return (True, low == "true") if low in ("true", "false") else (False, None)
    if t == "integer":
        try:
            return True, int(text)
        except ValueError:
            return False, None
    if t == "number":
        try:
            return True, int(text)
        except ValueError:
            pass
        try:
            value = float(text)
        except ValueError:
            return False, None
        return math.isfinite(value), value
    if t in ("object", "array"):
        want = dict if t == "object" else list
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, want):
                return True, value
        return False, None
    return False, None


# ------------------------------------------------------------------------------ parsing
@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # JSON text (fragments concatenated)

    def to_openai(self) -> dict[str, Any]:
        fn = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": fn}


@dataclass
class Event:
    """A parser output: text (`text`), a call's start (`index`, `id`, `name`), or an argument
    fragment of call `index` (`arguments`)."""

    kind: str  # "text" | "call" | "args"
    text: str = ""
    index: int = 0
    id: str = ""
    name: str = ""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolParser:
    """Incremental parser of one choice's output text (see the module docstring)."""

    tools: Sequence[Tool]
    max_calls: int | None = None  # parallel_tool_calls=false: 1 (later calls stay text)
    calls: list[ToolCall] = field(default_factory=list)
    _buf: str = ""
    _mode: str = "text"  # text | head | params | value | tail
    _held_space: str = ""  # whitespace that may precede a call (dropped if one follows)
    _emitted: bool = False  # some content went out
    _tool: Tool | None = None
    _args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tools}

    # ------------------------------------------------------------------ public
    def feed(self, text: str) -> list[Event]:
        self._buf += text
        out: list[Event] = []
        while getattr(self, f"_in_{self._mode}")(out, False):
            pass
        return _merge_text(out)

    def finish(self) -> list[Event]:
        """End of output: flush what was held; a call cut short keeps its finished params."""
        out: list[Event] = []
        while getattr(self, f"_in_{self._mode}")(out, True):
            pass
        if self._mode == "value":
            self._emit_args(out, _escape(self._buf) + '"')
            self._mode = "params"
        if self._mode == "params":
            self._close_call(out)
        elif self._mode == "text":
            self._hold(out, self._buf)
        if self._held_space and not self.calls:
            out.append(Event("text", self._held_space))
        self._buf, self._held_space, self._mode = "", "", "text"
        return _merge_text(out)

    # ------------------------------------------------------------------ states
    # Each returns True when it consumed something and the machine should go on, False when
    # it must wait for more text (or, at the end, when nothing more can be decided).
    def _in_text(self, out: list[Event], final: bool) -> bool:
        buf = self._buf
        at = buf.find(CALL_OPEN)
        if at >= 0:
            self._hold(out, buf[:at])
            self._buf = buf[at + len(CALL_OPEN) :]
            self._mode = "head"
            return True
        if final:
            return False
        cut = len(buf) - _partial_suffix(buf, CALL_OPEN)
        self._hold(out, buf[:cut])
        self._buf = buf[cut:]
        return False

    def _in_head(self, out: list[Event], final: bool) -> bool:
        rest = self._buf.lstrip()
        if rest.startswith(FUNC_OPEN):
            end = rest.find(">")
            name = rest[len(FUNC_OPEN) : end] if end >= 0 else None
            if name is not None and name in self._by_name and self._room():
                self._start_call(out, self._by_name[name])
                self._buf = rest[end + 1 :]
                return True
            if name is None and not final and len(rest) < len(FUNC_OPEN) + _MAX_NAME:
                return False  # the name is still coming
        elif FUNC_OPEN.startswith(rest) and not final:
            return False  # `<function=` may still be coming
        self._hold(out, CALL_OPEN)  # not a call: `<tool_call>` was text; go on after it
        self._mode = "text"
        return True

    def _in_params(self, out: list[Event], final: bool) -> bool:
        rest = self._buf.lstrip()
        if rest.startswith(FUNC_CLOSE):
            self._close_call(out)
            self._buf = rest[len(FUNC_CLOSE) :]
            self._mode = "tail"
            return True
        if rest.startswith(PARAM_OPEN):
            head = rest.find(">")
            if head < 0:
                if final or len(rest) > len(PARAM_OPEN) + _MAX_NAME:
                    self._buf = rest[1:]  # never named: stray text
                    return True
                return False
            name, after = rest[len(PARAM_OPEN) : head], rest[head + 1 :]
            schema = self._tool.properties.get(name) if self._tool else None
            if schema_types(schema) in ([], ["string"]) and name not in self._args:
                if not after and not final:
                    return False  # wait: a newline right after `>` is not part of the value
                lead = self._lead()
                self._args.append(name)
                self._emit_args(out, f'{lead}{_dumps(name)}: "')
                self._buf = after[1:] if after.startswith("\n") else after
                self._mode = "value"
                return True
            end = rest.find(PARAM_CLOSE, head)
            if end < 0:
                return False  # the value is still coming
            self._add_arg(out, name, _strip_newlines(rest[head + 1 : end]))
            self._buf = rest[end + len(PARAM_CLOSE) :]
            return True
        if not rest or PARAM_OPEN.startswith(rest) or FUNC_CLOSE.startswith(rest):
            self._buf = rest
            return False
        nxt = rest.find("<", 1)  # stray text inside a call is skipped
        self._buf = rest[nxt:] if nxt >= 0 else ""
        return nxt >= 0

    def _in_value(self, out: list[Event], final: bool) -> bool:
        """A string parameter's value, streamed as it comes (JSON-escaped)."""
        buf = self._buf
        end = buf.find(PARAM_CLOSE)
        if end >= 0:
            value = buf[:end]
            value = value[:-1] if value.endswith("\n") else value
            self._emit_args(out, _escape(value) + '"')
            self._buf = buf[end + len(PARAM_CLOSE) :]
            self._mode = "params"
            return True
        if final:
            return False
        cut = len(buf) - _partial_suffix(buf, "\n" + PARAM_CLOSE)
        if cut:
            self._emit_args(out, _escape(buf[:cut]))
        self._buf = buf[cut:]
        return False

    def _in_tail(self, out: list[Event], final: bool) -> bool:
        rest = self._buf.lstrip()
        if rest.startswith(CALL_CLOSE):
            self._buf = rest[len(CALL_CLOSE) :]
        elif (not rest or CALL_CLOSE.startswith(rest)) and not final:
            return False
        else:
            self._buf = rest  # `</tool_call>` missing: the call stands as it is
        self._mode = "text"
        return True

    # ------------------------------------------------------------------ helpers
    def _room(self) -> bool:
        return self.max_calls is None or len(self.calls) < self.max_calls

    def _hold(self, out: list[Event], text: str) -> None:
        """Send text, holding trailing whitespace: dropped if a call follows (or, after calls,
        if nothing follows); whitespace after a call is dropped when no content precedes."""
        full = self._held_space + text
        body = full.rstrip()
        self._held_space = full[len(body) :]
        if self.calls and not self._emitted:
            body = body.lstrip()
        if body:
            out.append(Event("text", body))
            self._emitted = True

    def _start_call(self, out: list[Event], tool: Tool) -> None:
        call = ToolCall(new_call_id(), tool.name)
        self.calls.append(call)
        self._tool, self._args, self._held_space = tool, [], ""
        self._mode = "params"
        out.append(Event("call", index=len(self.calls) - 1, id=call.id, name=tool.name))

    def _lead(self) -> str:
        return "{" if not self._args else ", "

    def _add_arg(self, out: list[Event], name: str, raw: str) -> None:
        if name in self._args:
            return  # a repeated parameter: the first one counts
        value = convert_value(raw, self._tool.properties.get(name) if self._tool else None)
        lead = self._lead()
        self._args.append(name)
        self._emit_args(out, f"{lead}{_dumps(name)}: {_dumps(value)}")

    def _close_call(self, out: list[Event]) -> None:
        self._emit_args(out, "}" if self._args else "{}")
        self._tool = None

    def _emit_args(self, out: list[Event], frag: str) -> None:
        self.calls[-1].arguments += frag
        out.append(Event("args", text=frag, index=len(self.calls) - 1))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _escape(text: str) -> str:
    """JSON string escaping of a piece of a string (pieces concatenate to the whole)."""
    return _dumps(text)[1:-1]


def _strip_newlines(value: str) -> str:
    """The newline after `<parameter=X>` and the one before `</parameter>` are markup."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _merge_text(events: Iterable[Event]) -> list[Event]:
    out: list[Event] = []
    for e in events:
        if e.kind == "text" and out and out[-1].kind == "text":
            out[-1] = Event("text", out[-1].text + e.text)
        else:
            out.append(e)
    return out


@dataclass
class ParsedOutput:
    content: str | None
    calls: list[ToolCall]


def parse_tool_calls(
    text: str, tools: Sequence[Tool], max_calls: int | None = None
) -> ParsedOutput:
    """A whole output -> content (None when only calls) and the tool calls."""
    parser = ToolParser(tools, max_calls)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if e.kind == "text")
    return ParsedOutput(content if content or not parser.calls else None, parser.calls)


# ------------------------------------------------------------------------------ grammar
def tool_call_grammar(
    tools: Sequence[Tool],
    *,
    name: str | None = None,
    parallel: bool = True,
    added_tokens: Iterable[str] = (),
) -> str:
    """An llguidance grammar forcing the output to be tool calls in the format above: one call
    of `name`, or (tool_choice "required") one or more calls of any tool (one if not
    `parallel`). Required parameters come first-to-last in schema order, optional ones may be
    left out; values follow their schema (`%json` for non-string types, raw text for strings).
    `added_tokens`: the tokenizer's added tokens (`<tool_call>` is matched as that token)."""
    chosen = [t for t in tools if name is None or t.name == name]
    if not chosen:
        raise GrammarError(f"no tool named {name!r}")
    special = set(added_tokens)

    def tag(text: str) -> str:
        return text if text in special else json.dumps(text)

    repeat = "" if name is not None or not parallel else ' ("\\n" call)*'
    alternatives = " | ".join(f"fn_{i}" for i in range(len(chosen)))
    lines = [
        f"start: call{repeat}",
        f'call: {tag(CALL_OPEN)} "\\n" ({alternatives}) {tag(CALL_CLOSE)}',
    ]
    for i, tool in enumerate(chosen):
        defs = {k: tool.parameters[k] for k in ("$defs", "definitions") if k in tool.parameters}
        items = []
        for j, (pname, pschema) in enumerate(tool.properties.items()):
            rule = f"p_{i}_{j}"
            items.append(rule if pname in tool.required else f"{rule}?")
            head = json.dumps(f"{PARAM_OPEN}{pname}>\n")
            value, value_rules = _value_rule(f"v_{i}_{j}", pschema, defs)
            lines.append(f"{rule}: {head} {value}")
            lines += value_rules
        body = " ".join(items)
        lines.append(
            f"fn_{i}: {json.dumps(FUNC_OPEN + tool.name + '>' + chr(10))} {body} "
            f"{json.dumps(FUNC_CLOSE + chr(10))}"
        )
    return lark_grammar("\n".join(lines))


_VALUE_END = json.dumps("\n" + PARAM_CLOSE + "\n")


def _value_rule(rule: str, schema: Any, defs: dict[str, Any]) -> tuple[str, list[str]]:
    """(expression for a parameter's value + its closing tag, extra rules)."""
    types = schema_types(schema)
    if isinstance(schema, dict) and types == ["string"]:
        choices = schema.get("enum") if isinstance(schema.get("enum"), list) else None
        if choices is None and "const" in schema:
            choices = [schema["const"]]
        if choices:
            alts = " | ".join(json.dumps(c) for c in choices if isinstance(c, str))
            return f"({alts}) {_VALUE_END}", []
    if not types or "string" in types:
        lo, hi = _length_bounds(schema)
        regex = f"/(?s:.{{{lo},{hi}}})/" if hi is not None else f"/(?s:.{{{lo},}})/"
        return rule, [f"{rule}[suffix={_VALUE_END}]: {regex}"]
    sub = dict(schema) | defs
    return f"{json_subschema(sub)} {_VALUE_END}", []


def _length_bounds(schema: Any) -> tuple[int, int | None]:
    if not isinstance(schema, dict):
        return 0, None
    lo = schema.get("minLength") if isinstance(schema.get("minLength"), int) else 0
    hi = schema.get("maxLength") if isinstance(schema.get("maxLength"), int) else None
    return max(0, lo), (max(lo, hi) if hi is not None else None)


# ----------------------------------------------------------------------- prompt history
def template_tool_calls(calls: Sequence[Any], param: str) -> list[dict[str, Any]]:
    """An assistant message's OpenAI `tool_calls` -> what chat templates expect (HF style:
    `function.arguments` a mapping, not JSON text)."""
    out = []
    for i, call in enumerate(calls):
        where = f"{param}.{i}"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidParam(where, f"{where}: expected {{'function': {{'name', 'arguments'}}}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                raise InvalidParam(
                    f"{where}.function.arguments",
                    f"{where}.function.arguments: not valid JSON ({exc.msg})",
                ) from None
        if not isinstance(args, dict):
            raise InvalidParam(
                f"{where}.function.arguments", f"{where}.function.arguments: expected a JSON object"
            )
        fn_out = {"name": fn["name"], "arguments": args}
        out.append({"id": call.get("id"), "type": "function", "function": fn_out})
    return out


# ------------------------------------------------------------------------------ choice
@dataclass(frozen=True)
class ToolChoice:
    """What the request lets the model do with its tools: "none" (plain text, tools not
    rendered), "auto" (text or calls), "required" (one or more calls), "named" (one call of
    `name`). `parallel` False allows at most one call."""

    mode: str
    tools: tuple[Tool, ...] = ()
    name: str | None = None
    parallel: bool = True

    @property
    def parses(self) -> bool:
        """Whether outputs are parsed for calls."""
        return self.mode != "none" and bool(self.tools)

    @property
    def max_calls(self) -> int | None:
        return 1 if self.mode == "named" or not self.parallel else None

    def parser(self) -> ToolParser | None:
        return ToolParser(self.tools, self.max_calls) if self.parses else None

    def grammar(self, tokenizer: Any) -> str | None:
        """The grammar forcing calls ("required" / "named"), else None."""
        if self.mode not in ("required", "named"):
            return None
        added = tokenizer.added_tokens() if tokenizer is not None else ()
        try:
            return tool_call_grammar(
                self.tools, name=self.name, parallel=self.parallel, added_tokens=added
            )
        except GrammarError as exc:
            raise InvalidParam(
                "tools", f"tools: cannot build the tool-call grammar: {exc}"
            ) from None


def parse_tool_choice(raw: Any, tools: Sequence[Tool], parallel: bool | None) -> ToolChoice:
    """OpenAI `tool_choice` (with the request's tools) -> ToolChoice."""
    par = parallel is not False
    if raw is None:
        return ToolChoice("auto" if tools else "none", tuple(tools), parallel=par)
    if raw in ("none", "auto", "required"):
        if raw == "required" and not tools:
            raise InvalidParam("tool_choice", "tool_choice: 'required' needs tools")
        return ToolChoice(raw, tuple(tools), parallel=par)
    name = None
    if isinstance(raw, dict) and raw.get("type") == "function":
        fn = raw.get("function")
        name = fn.get("name") if isinstance(fn, dict) else raw.get("name")  # responses: flat
    if not isinstance(name, str):
        raise InvalidParam(
            "tool_choice",
            "tool_choice: expected 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
        )
    if not any(t.name == name for t in tools):
        raise InvalidParam("tool_choice", f"tool_choice: no tool named {name!r} in tools")
    return ToolChoice("named", tuple(tools), name=name, parallel=False)
