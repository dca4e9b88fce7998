"""Structured outputs: OpenAI `response_format` (json_object, json_schema) and vLLM's guided
decoding fields (`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, or their
`structured_outputs` form) -> one llguidance grammar for SamplingParams.grammar.

A schema is enforced whether or not `strict` is set (as vLLM does). The grammar is checked
here, so a bad schema or regex is a 400 naming the field; it is compiled against the vocabulary
in the dense replica (workers/structured.py)."""

from __future__ import annotations

import json
from typing import Any

import llguidance as llg
from pydantic import BaseModel, ConfigDict, Field

from deploy.params import InvalidParam
from workers.structured import (
    GrammarError,
    choice_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` request field: exactly one of these."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredRequest(BaseModel):
    """The structured-output fields a completion or chat request may carry."""

    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    def has_guided_output(self) -> bool:
        return bool(_sources(self))


def _sources(req: StructuredRequest) -> list[tuple[str, str, Any]]:
    """(param, kind, value) of every structured-output field set."""
    out: list[tuple[str, str, Any]] = []
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            out.append(("response_format", "json", {"type": "object"}))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise InvalidParam(
                    "response_format.json_schema",
                    "response_format.json_schema: expected {'name', 'schema', 'strict'}",
                )
            out.append(("response_format.json_schema.schema", "json", spec.get("schema", {})))
        elif kind != "text":
            raise InvalidParam(
                "response_format.type",
                "response_format.type: expected 'text', 'json_object' or 'json_schema', got "
                f"{kind!r}",
            )
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                       ("guided_choice", "choice"), ("guided_grammar", "grammar")):  # fmt: skip
        value = getattr(req, name)
        if value is not None:
            out.append((name, kind, value))
    so = req.structured_outputs
    if so is not None:
        fields = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex),
                  ("choice", so.choice), ("grammar", so.grammar)) if v is not None]  # fmt: skip
        if so.json_object:
            fields.append(("json", {"type": "object"}))
        if len(fields) != 1:
            raise InvalidParam(
                "structured_outputs",
                "structured_outputs: set exactly one of json, regex, choice, grammar, json_object",
            )
        kind, value = fields[0]
        out.append((f"structured_outputs.{kind}", kind, value))
    return out


def guided_grammar(req: StructuredRequest) -> str | None:
    """The request's llguidance grammar, or None for free text; InvalidParam names the field
    that is wrong (or the second one when several ask for structure)."""
    sources = _sources(req)
    if not sources:
        return None
    if len(sources) > 1:
        names = [param.split(".")[0] for param, _, _ in sources]
        raise InvalidParam(names[1], f"only one structured output may be asked for, got {names}")
    param, kind, value = sources[0]
    try:
        grammar = _build(kind, value)
    except GrammarError as exc:
        raise InvalidParam(param, f"{param}: {exc}") from None
    problem = llg.LLMatcher.validate_grammar(grammar)
    if problem:
        raise InvalidParam(param, f"{param}: {_first_line(problem)}")
    return grammar


def _build(kind: str, value: Any) -> str:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"not valid JSON ({exc.msg})") from None
        return json_schema_grammar(value)
    if kind == "regex":
        return regex_grammar(value)
    if kind == "choice":
        return choice_grammar(value)
    return lark_grammar(value)


def _first_line(message: str) -> str:
    """llguidance's message without its source excerpt (lines of `|` and `^` markers)."""
    lines = [ln.strip() for ln in message.strip().splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith("^") and "|" not in ln[:6]]
    return " ".join(keep)[:400]
