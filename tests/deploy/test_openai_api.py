"""Request parsing and response building of the HTTP/gRPC front ends, without Ray."""

from __future__ import annotations

import json

import pytest

from deploy.openai_api import ChatCompletionRequest, CompletionRequest, error_body, parse_request
from deploy.openai_format import ChatFormat, CompletionFormat, sse
from deploy.params import InvalidParam, prompt_ids, sampling_params
from workers.dense_worker import load_tokenizer
from workers.make_checkpoint import make_checkpoint
from workers.requests import RequestError, RequestOutput


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_checkpoint(tmp_path_factory.mktemp("t"), preset="tiny"))


def _parse(body: dict, schema=CompletionRequest):
    return parse_request(json.dumps(body).encode(), schema)


def test_prompt_forms():
    assert _parse({"model": "m", "prompt": "hi"}).single_prompt() == "hi"
    assert _parse({"model": "m", "prompt": [1, 2]}).single_prompt() == [1, 2]
    assert _parse({"model": "m", "prompt": ["hi"]}).single_prompt() == "hi"
    assert _parse({"model": "m", "prompt": [[3, 4]]}).single_prompt() == [3, 4]
    with pytest.raises(InvalidParam, match="one prompt per request"):
        _parse({"model": "m", "prompt": [[3], [4]]}).single_prompt()


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "prompt": "x", "seed": "1"}, "seed"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "m", "prompt": "x", "stream_options": {"bogus": 1}}, "stream_options.bogus"),
        ({"model": "m", "prompt": "x", "echo": 1}, "echo"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": "x", "logit_bias": {"a": 1.0}}, "logit_bias"),
        ({"model": "m", "prompt": "x", "guided_regex": "[a-"}, "guided_regex"),
        ({"model": "m", "prompt": "x", "guided_choice": []}, "guided_choice"),
        (
            {"model": "m", "prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}},
            "structured_outputs",
        ),
        ({"model": "m", "prompt": "x", "response_format": {"type": "xml"}}, "response_format.type"),
        ({"model": "m", "prompt": 5}, "prompt"),
    ],
)
def test_bad_fields_are_named(body, param):
    with pytest.raises(InvalidParam) as info:
        _parse(body).sampling_fields(None)
    assert info.value.param == param and info.value.http_status == 400


def test_chat_request_parts_and_ignored_fields():
    req = _parse(
        {
            "model": "m",
            "user": "u",
            "store": False,
            "metadata": {"a": "b"},
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    "refusal": "ignored",
                }
            ],
        },
        ChatCompletionRequest,
    )
    assert req.messages[0].as_template_input() == {"role": "user", "content": "ab"}
    with pytest.raises(InvalidParam, match="tools.0.function"):
        _parse(
            {"model": "m", "messages": [], "tools": [{"type": "function"}]}, ChatCompletionRequest
        )
    agentish = _parse(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "reasoning_effort": "high",
            "chat_template_kwargs": {"enable_thinking": False},
            "prompt_cache_key": "k",
            "parallel_tool_calls": True,
        },
        ChatCompletionRequest,
    )
    assert agentish.warnings() == ["reasoning_effort is ignored by this server"]
    assert agentish.template_kwargs()["template_kwargs"] == {"enable_thinking": False}


def test_sampling_params_defaults_and_errors():
    p = sampling_params(prompt_len=10, max_model_len=100, stop="x", stop_token_ids=[3])
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop) == (16, 1.0, 1.0, 0, ("x",))
    chat = sampling_params(prompt_len=10, max_model_len=100, default_max_tokens=None)
    assert chat.max_tokens == 90  # chat: whatever room the model length leaves
    for kwargs, param in [
        ({"temperature": -1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
    ]:
        with pytest.raises(InvalidParam) as info:
            sampling_params(prompt_len=1, max_model_len=10, **kwargs)
        assert info.value.param == param


def test_prompt_ids(tok):
    assert prompt_ids(tok, text="hello") == tok.encode("hello")
    chat = prompt_ids(tok, messages=[{"role": "user", "content": "hi"}], param="messages")
    assert chat == tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(InvalidParam, match="no tokenizer"):
        prompt_ids(None, text="hello")
    with pytest.raises(InvalidParam, match="no chat template"):
        prompt_ids(None, messages=[{"role": "user", "content": "x"}])


def test_error_body_kinds():
    body = error_body(RequestError("internal", "boom"))
    assert body == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
    }
    assert error_body(RequestError("queue_full", "full"))["error"]["code"] == "queue_full"
    assert RequestError("unavailable", "x").http_status == 503


def _out(ids, text, finished=False, reason=None, cached=0):
    return RequestOutput(
        "r", ids, [-0.5] * len(ids), text, finished, reason, 3, len(ids), cached_tokens=cached
    )


def test_completion_response_with_logprobs(tok):
    req = _parse({"model": "m", "prompt": "x", "logprobs": 0, "return_token_ids": True})
    fmt = CompletionFormat("cmpl-1", "m", tok, req)
    ids = tok.encode("hello world")
    fmt.add(_out(ids, "hello world", True, "length", cached=2))
    r = fmt.response()
    choice = r["choices"][0]
    assert choice["token_ids"] == ids and choice["finish_reason"] == "length"
    assert "".join(choice["logprobs"]["tokens"]) == "hello world"
    assert choice["logprobs"]["text_offset"][0] == 0
    assert r["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": len(ids),
        "total_tokens": 3 + len(ids),
        "prompt_tokens_details": {"cached_tokens": 2},
    }


def test_chat_stream_chunks(tok):
    req = _parse(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        ChatCompletionRequest,
    )
    fmt = ChatFormat("chatcmpl-1", "m", tok, req)
    first = fmt.chunks(_out([5], "a"))
    assert [c["choices"][0]["delta"] for c in first] == [
        {"role": "assistant", "content": ""},
        {"content": "a"},
    ]
    assert fmt.chunks(_out([6], "")) == []  # no text yet: nothing to send
    last = fmt.chunks(_out([7], "b", True, "stop"))
    assert last[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all(c["usage"] is None for c in first + last)
    assert fmt.usage_chunk()["choices"] == []
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
