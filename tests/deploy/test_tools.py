"""Qwen3-Coder tool-call parsing on hand-written model outputs (valid, parallel, malformed,
typed parameters), streaming deltas that reassemble to the whole parse, tool_choice, the
grammar that forces calls, and prompt history."""

from __future__ import annotations

import json
import random

import pytest

from deploy.params import InvalidParam
from deploy.tools import (
    ToolParser,
    convert_value,
    parse_tool_calls,
    parse_tool_choice,
    parse_tools,
    template_tool_calls,
    tool_call_grammar,
)
from workers.make_checkpoint import make_checkpoint
from workers.structured import GrammarCompiler
from workers.tokenizer import TextTokenizer

TOOLS = parse_tools([
    {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string"}, "days": {"type": "integer"},
         "units": {"enum": ["c", "f"]}, "detailed": {"type": "boolean"},
         "lat": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}},
         "opts": {"type": "object"}, "note": {"type": ["string", "null"]}},
         "required": ["city"]}}},
    {"type": "function", "function": {"name": "run", "parameters": {
        "type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}},
])  # fmt: skip


def call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def args(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def stream(text: str, tools=TOOLS, cuts=None, max_calls=None):
    """Feed text in pieces; reassemble content and each call's name and arguments."""
    parser = ToolParser(tools, max_calls)
    rng = random.Random(cuts)
    events, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7) if cuts is not None else 1
        events += parser.feed(text[i : i + n])
        i += n
    events += parser.finish()
    content = "".join(e.text for e in events if e.kind == "text")
    calls: dict[int, list] = {}
    for e in events:
        if e.kind == "call":
            assert e.index not in calls  # the name comes first, once
            calls[e.index] = [e.name, e.id, ""]
        elif e.kind == "args":
            calls[e.index][2] += e.text
    return content, [tuple(c) for _, c in sorted(calls.items())]


def test_valid_call_with_typed_parameters():
    text = "I'll check the weather.\n\n" + call(
        "get_weather", city="New York\nNY", days="3", units="f", detailed="True", lat="-40.5",
        tags='["a", "b"]', opts="{'deep': True}", note="null",
    )  # fmt: skip
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.content == "I'll check the weather."
    assert args(parsed) == [("get_weather", {
        "city": "New York\nNY", "days": 3, "units": "f", "detailed": True, "lat": -40.5,
        "tags": ["a", "b"], "opts": {"deep": True}, "note": None})]  # fmt: skip
    assert parsed.calls[0].id.startswith("call_") and len(parsed.calls[0].id) == 29


def test_parallel_calls_and_text_between_is_content():
    text = call("run", cmd="ls -la") + "\n" + call("get_weather", city="Paris") + "\n"
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.content is None
    assert args(parsed) == [("run", {"cmd": "ls -la"}), ("get_weather", {"city": "Paris"})]
    assert len({c.id for c in parsed.calls}) == 2
    one = parse_tool_calls(text, TOOLS, max_calls=1)  # parallel_tool_calls=false
    assert [c.name for c in one.calls] == ["run"] and "<function=get_weather>" in one.content


@pytest.mark.parametrize(
    "text",
    [
        "plain answer with no call",
        "a <tool_call> in prose, then more prose",
        "<tool_call>\n<function=unknown_tool>\n</function>\n</tool_call>",  # not a tool we have
        "<tool_call>\nnot a function at all\n</tool_call>",
        "see <tool_call",  # an unfinished tag at the very end
        "trailing spaces and newline \n",
        "<tool_call>",
    ],
)
def test_malformed_markup_stays_text(text):
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.calls == [] and parsed.content == text
    for cuts in (None, 1, 2):
        assert stream(text, cuts=cuts) == (text, [])


def test_values_that_do_not_convert_stay_strings():
    parsed = parse_tool_calls(call("get_weather", city="x", days="three", tags="[oops"), TOOLS)
    assert json.loads(parsed.calls[0].arguments) == {"city": "x", "days": "three", "tags": "[oops"}
    assert convert_value("12", {"type": "number"}) == 12
    assert convert_value("1e3", {"type": "number"}) == 1000.0
    assert convert_value("nan", {"type": "number"}) == "nan"
    assert convert_value("  7 ", {"anyOf": [{"type": "integer"}, {"type": "null"}]}) == 7
    assert convert_value("x", None) == "x"  # a parameter the schema does not know


def test_truncated_call_keeps_finished_parameters():
    text = call("get_weather", city="Rome", days="2")[:-40]  # cut inside </parameter> of days
    parsed = parse_tool_calls(text, TOOLS)
    assert args(parsed) == [("get_weather", {"city": "Rome"})]
    cut_in_string = "<tool_call>\n<function=run>\n<parameter=cmd>\necho hi"
    assert args(parse_tool_calls(cut_in_string, TOOLS)) == [("run", {"cmd": "echo hi"})]


def test_missing_closing_tool_call_tag_is_accepted():
    text = "<tool_call>\n<function=run>\n<parameter=cmd>\nls\n</parameter>\n</function>"
    assert args(parse_tool_calls(text, TOOLS)) == [("run", {"cmd": "ls"})]


@pytest.mark.parametrize("cuts", [None, 3, 4, 5])
def test_stream_reassembles_to_the_whole_parse(cuts):
    text = (
        "Let me look.  \n"
        + call("get_weather", city="Oslo <b>&</b>\n\n", days="4", opts='{"k": [1, 2]}')  # fmt: skip
        + "\n"
        + call("run", cmd="grep -n '</param' x.py\nexit 0")
        + "\n\nDone."
    )
    whole = parse_tool_calls(text, TOOLS)
    content, calls = stream(text, cuts=cuts)
    assert content == whole.content == "Let me look.\n\nDone."
    assert [(n, a) for n, _, a in calls] == [(c.name, c.arguments) for c in whole.calls]
    assert json.loads(calls[1][2]) == {"cmd": "grep -n '</param' x.py\nexit 0"}


def test_stream_sends_nothing_that_is_taken_back():
    """Text is released as soon as it cannot start a call; `<tool_call>` is held."""
    parser = ToolParser(TOOLS)
    assert [e.text for e in parser.feed("Hello <tool")] == ["Hello"]
    assert parser.feed("_c") == []
    assert [e.text for e in parser.feed("x")] == [" <tool_cx"]  # not a call after all
    parser.feed(" <tool_call>\n<func")
    events = parser.feed("tion=run>\n<parameter=cmd>\nl")
    assert [(e.kind, e.name) for e in events][:1] == [("call", "run")]
    assert [e.text for e in events if e.kind == "args"] == ['{"cmd": "', "l"]


def test_tool_choice_rules():
    assert parse_tool_choice(None, TOOLS, None).mode == "auto"
    assert parse_tool_choice(None, [], None).mode == "none"
    named = parse_tool_choice({"type": "function", "function": {"name": "run"}}, TOOLS, None)
    assert (named.mode, named.name, named.max_calls) == ("named", "run", 1)
    assert parse_tool_choice("required", TOOLS, False).max_calls == 1
    assert not parse_tool_choice("none", TOOLS, None).parses
    for raw, tools, fragment in [
        ("required", [], "needs tools"),
        ({"type": "function", "function": {"name": "nope"}}, TOOLS, "no tool named"),
        ("sometimes", TOOLS, "expected"),
    ]:
        with pytest.raises(InvalidParam, match=fragment):
            parse_tool_choice(raw, tools, None)
    with pytest.raises(InvalidParam, match="duplicate"):
        parse_tools([{"type": "function", "function": {"name": "a"}}] * 2)
    with pytest.raises(InvalidParam, match="tools.0"):
        parse_tools([{"type": "retrieval"}])


def test_history_arguments_become_mappings():
    fn = {"name": "run", "arguments": '{"cmd": "ls"}'}
    calls = template_tool_calls([{"id": "c1", "type": "function", "function": fn}], "m.tool_calls")
    assert calls[0]["function"]["arguments"] == {"cmd": "ls"}
    with pytest.raises(InvalidParam) as info:
        template_tool_calls([{"function": {"name": "run", "arguments": "{bad"}}], "m.tool_calls")
    assert info.value.param == "m.tool_calls.0.function.arguments"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer(make_checkpoint(tmp_path_factory.mktemp("t"), preset="tiny"))


def test_forced_call_grammar_accepts_calls_and_rejects_others(tok):
    compiler = GrammarCompiler(tok, 1024, [tok.token_id("<|im_end|>")])
    g = tool_call_grammar(TOOLS, added_tokens=tok.added_tokens())
    good = (
        call("get_weather", city="Lima", days="5", units="c", tags='["x"]')
        + "\n"
        + call("run", cmd="make test")
    )
    m = compiler.matcher(g)
    assert m.consume_tokens(tok.encode(good)) and m.is_accepting()
    for bad in [
        "Sure! " + call("run", cmd="x"),  # text before the call
        call("get_weather", days="5"),  # the required city is missing
        call("get_weather", city="a", units="kelvin"),  # not in the enum
        call("get_weather", city="a", days="five"),  # not an integer
        call("nope", x="1"),
    ]:
        m = compiler.matcher(g)
        assert not (m.consume_tokens(tok.encode(bad)) and m.is_accepting()), bad
    named = compiler.matcher(tool_call_grammar(TOOLS, name="run", added_tokens=tok.added_tokens()))
    assert not named.consume_tokens(tok.encode(call("get_weather", city="a")))
