"""The agent-facing API end to end, with the real `openai` client against the served demo-format
model (random weights: whatever it writes, grammars make it valid): a multi-turn tool loop with
tool_choice required and named, json_schema outputs, streamed tool calls, n, logprobs and
penalties against a reference, /v1/responses, /tokenize, model cards, gRPC. One app."""

from __future__ import annotations

import json

import grpc
import httpx
import jsonschema
import pytest
import ray
import torch
from openai import OpenAI
from ray import serve

from cluster.config import ClusterConfig
from cluster.launcher import init_ray
from deploy.app import build_app
from router.rpc import generate_pb2 as pb
from router.rpc import generate_pb2_grpc
from tests.deploy.helpers import free_port, wait_until
from workers.dense_worker import DenseWorker
from workers.make_checkpoint import make_checkpoint
from workers.requests import EngineConfig
from workers.runner import ModelRunner
from workers.sampler import SamplingParams

APP, MODEL = "agent", "tiny-agent"
CITY = {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": CITY, "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "detailed": {"type": "boolean"}}, "required": ["city", "days"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "maxLength": 12}}, "required": ["path"]}}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ANSWER = {
    "type": "object",
    "properties": {
        "city": CITY,
        "temperature": {"type": "integer", "minimum": -50, "maximum": 60},
        "rain": {"type": "boolean"},
    },
    "required": ["city", "temperature", "rain"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = str(make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=1))
    http_port, grpc_port = free_port(), free_port()
    config = ClusterConfig.from_dict({
        "model": model_dir,
        "experts": {"shards": 0},
        "dense": {"num_cpus": 1, "max_num_seqs": 8},
        "server": {"http_port": http_port, "grpc_port": grpc_port, "model_name": MODEL},
    })  # fmt: skip
    init_ray(None, min_cpus=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(config, model_dir), name=APP, blocking=False)
        base = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: _ready(f"{base}/health/ready"), 90, "readiness")
        yield model_dir, base, f"127.0.0.1:{grpc_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def client(served) -> OpenAI:
    return OpenAI(base_url=f"{served[1]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def worker(served):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield DenseWorker(served[0], "float32", EngineConfig(max_num_seqs=2))
    torch.set_num_threads(threads)


def check_call(call) -> dict:
    """A tool call that names one of the tools and whose arguments validate."""
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


# ------------------------------------------------------------------------------ tools
def test_multi_turn_agent_loop_with_required_and_named_tools(client, served):
    messages = [
        {"role": "system", "content": "You are a weather agent."},
        {"role": "user", "content": "What is the weather in Oslo this week?"},
    ]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
        max_tokens=120, temperature=0.8, seed=3,
    )  # fmt: skip
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and all(check_call(c) is not None for c in calls)
    messages.append(choice.message.model_dump(exclude_none=True))
    for c in calls:
        messages.append({"role": "tool", "tool_call_id": c.id, "content": "sunny, 21 C"})

    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=80, temperature=0.5, seed=4,
        tool_choice={"type": "function", "function": {"name": "read_file"}},
    )  # fmt: skip
    named = second.choices[0].message.tool_calls
    assert len(named) == 1 and named[0].function.name == "read_file"
    assert second.choices[0].finish_reason == "tool_calls"
    check_call(named[0])
    messages.append(second.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": named[0].id, "content": "print('hi')"})

    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason in ("stop", "length")
    # the history went into the prompt through the template: /tokenize renders the same
    rendered = httpx.post(f"{served[1]}/tokenize", json={
        "model": MODEL, "messages": messages, "return_token_strs": True}).json()  # fmt: skip
    assert rendered["count"] == final.usage.prompt_tokens  # tool_choice none: no tool list
    text = "".join(rendered["token_strs"])
    assert text.count("<tool_response>") == len(calls) + 1
    assert f"<function={named[0].function.name}>" in text and "sunny, 21 C" in text


def test_streamed_tool_call_deltas_reassemble_to_the_same_call(client):
    kwargs = dict(
        model=MODEL, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0.9,
        seed=11, messages=[{"role": "user", "content": "Read the config file."}],
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish, order = None, []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            for d in c.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"id": None, "name": None, "args": ""})
                if d.id:
                    assert entry["id"] is None and entry["args"] == ""  # id and name first
                    entry["id"], entry["name"] = d.id, d.function.name
                    order.append("name")
                if d.function and d.function.arguments:
                    entry["args"] += d.function.arguments
                    order.append("args")
            finish = c.finish_reason or finish
    assert finish == "tool_calls" == whole.finish_reason
    got = [(c["name"], c["args"]) for _, c in sorted(calls.items())]
    want = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert got == want and order[0] == "name" and order.count("name") == len(want)


# ------------------------------------------------------------------- structured outputs
def test_json_schema_outputs_validate(client):
    for stream in (False, True):
        kwargs = dict(
            model=MODEL, messages=[{"role": "user", "content": "Weather as JSON."}],
            max_tokens=150, temperature=1.0, seed=5, n=2,
            response_format={"type": "json_schema", "json_schema": {
                "name": "weather", "schema": ANSWER, "strict": True}},
        )  # fmt: skip
        if stream:
            texts = {0: "", 1: ""}
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for c in chunk.choices:
                    texts[c.index] += c.delta.content or ""
        else:
            r = client.chat.completions.create(**kwargs)
            assert [c.finish_reason for c in r.choices] == ["stop", "stop"]
            texts = {c.index: c.message.content for c in r.choices}
        for text in texts.values():
            jsonschema.validate(json.loads(text), ANSWER)


def test_guided_choice_regex_and_bad_schema(client, served):
    r = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=10,
                                  extra_body={"guided_choice": ["alpha", "beta"]})  # fmt: skip
    assert r.choices[0].text in ("alpha", "beta")
    r = client.completions.create(
        model=MODEL, prompt="Date:", max_tokens=20, temperature=0.7, seed=2,
        extra_body={"structured_outputs": {"regex": "20[0-9]{2}-[01][0-9]-[0-3][0-9]"}},
    )  # fmt: skip
    assert len(r.choices[0].text) == 10 and r.choices[0].text.startswith("20")
    bad = httpx.post(f"{served[1]}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                            "schema": {"type": "object", "minProperties": "two"}}}})  # fmt: skip
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "response_format.json_schema.schema"


# ----------------------------------------------------------------- sampling, logprobs
def _reference_logprobs(worker: DenseWorker, prompt: list[int], out: list[int]) -> torch.Tensor:
    """Raw log-softmax of the model at each output position, one full forward."""
    runner = ModelRunner(worker.engine.runner.lm, worker.experts, 1)
    logits = runner.step([(runner.allocate(), prompt + out)], all_logits=True)[0]
    return torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)


def test_top_logprobs_match_a_reference_forward(client, served, worker):
    messages = [{"role": "user", "content": "Say something."}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0.9, seed=8, logprobs=True,
        top_logprobs=4, frequency_penalty=1.5, extra_body={"return_token_ids": True},
    )  # fmt: skip
    choice = r.choices[0]
    out = choice.model_extra["token_ids"]
    prompt = httpx.post(f"{served[1]}/tokenize", json={"messages": messages}).json()["tokens"]
    ref = _reference_logprobs(worker, prompt, out)
    tok = worker.tokenizer
    for i, entry in enumerate(choice.logprobs.content):
        assert entry.logprob == pytest.approx(float(ref[i, out[i]]), abs=1e-3)
        vals, ids = torch.topk(ref[i], 4)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([j]) for j in ids.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-3)


def test_echo_with_prompt_logprobs_and_completion_top_logprobs(client, served, worker):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                  echo=True, logprobs=2)  # fmt: skip
    c = r.choices[0]
    ids = worker.tokenizer.encode(prompt)
    assert c.text.startswith(prompt) and len(c.logprobs.tokens) == len(ids) + 3
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    ref = _reference_logprobs(worker, ids[:1], ids[1:])  # prompt positions 1..
    for i in range(1, len(ids)):
        assert c.logprobs.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-3)
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs[1:])
    assert c.logprobs.text_offset[len(ids)] == len(prompt)


def test_n_choices_are_the_seeded_single_requests(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0)
    many = client.completions.create(n=3, seed=40, **kwargs)
    assert [c.index for c in many.choices] == [0, 1, 2]
    singles = [client.completions.create(seed=40 + i, **kwargs).choices[0].text for i in range(3)]
    assert [c.text for c in many.choices] == singles
    assert many.usage.completion_tokens == 24 and many.usage.prompt_tokens > 0
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(n=3, seed=40, stream=True, **kwargs):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert list(streamed.values()) == singles


def test_penalties_and_bias_match_the_engine_and_change_the_output(client, served, worker):
    prompt = [11, 12, 13, 14]
    body = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                logit_bias={"100": 8.0}, presence_penalty=0.5, frequency_penalty=2.0,
                extra_body={"repetition_penalty": 1.3, "return_token_ids": True})  # fmt: skip
    got = client.completions.create(**body).choices[0].model_extra["token_ids"]
    params = SamplingParams(
        max_tokens=10,
        temperature=0,
        logit_bias=((100, 8.0),),
        presence_penalty=0.5,
        frequency_penalty=2.0,
        repetition_penalty=1.3,
    )
    assert got == worker.generate([prompt], params)[0].token_ids
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                      logit_bias={"100": 8.0},
                                      extra_body={"return_token_ids": True})  # fmt: skip
    assert plain.choices[0].model_extra["token_ids"].count(100) > got.count(100)


# ------------------------------------------------------------------ the rest of the surface
def test_responses_api_tool_loop_and_stream(client):
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    r = client.responses.create(model=MODEL, input="Weather in Lima?", tools=tools,
                                tool_choice="required", max_output_tokens=120,
                                instructions="Use tools.", temperature=0.8)  # fmt: skip
    calls = [i for i in r.output if i.type == "function_call"]
    assert r.status == "completed" and calls
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
    follow = [{"role": "user", "content": "Weather in Lima?"}]
    follow += [c.model_dump(exclude_none=True) for c in calls]
    follow += [{"type": "function_call_output", "call_id": c.call_id, "output": "warm"}
               for c in calls]  # fmt: skip
    answer = client.responses.create(model=MODEL, input=follow, tools=tools, tool_choice="none",
                                     max_output_tokens=6)  # fmt: skip
    assert answer.output[0].type == "message" and answer.output_text
    assert answer.status == "incomplete" or answer.usage.output_tokens < 6
    kinds, text, last = [], "", None
    for e in client.responses.create(model=MODEL, input="Hello", max_output_tokens=5,
                                     stream=True):  # fmt: skip
        kinds.append(e.type)
        text += e.delta if e.type == "response.output_text.delta" else ""
        last = e
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_item.added" in kinds and "response.output_text.done" in kinds
    assert last.type == "response.incomplete"  # 5 tokens: cut by max_output_tokens
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output[0].content[0].text == text
    closing = ["response.output_text.done", "response.content_part.done",
               "response.output_item.done", "response.incomplete"]  # fmt: skip
    assert kinds[-4:] == closing


def test_models_tokenize_detokenize_and_extras(client, served):
    base = served[1]
    assert client.models.retrieve(MODEL).id == MODEL
    missing = httpx.get(f"{base}/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    tok = httpx.post(f"{base}/tokenize", json={"model": MODEL, "prompt": "hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0
    back = httpx.post(f"{base}/detokenize", json={"model": MODEL, "tokens": tok["tokens"]})
    assert back.json() == {"prompt": "hello world"}
    bad = httpx.post(f"{base}/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    r = httpx.post(f"{base}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False},
        "prompt_cache_key": "agent-1"})  # fmt: skip
    assert r.status_code == 200 and "reasoning_effort is ignored" in r.headers["warning"]
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"


def test_grpc_tools_structured_outputs_and_n(served):
    with grpc.insecure_channel(served[2]) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        tools = [pb.Tool(name=t["function"]["name"],
                         parameters_json=json.dumps(t["function"]["parameters"]))
                 for t in TOOLS]  # fmt: skip
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="weather?")])
        r = stub.Generate(pb.GenerateRequest(chat=chat, tools=tools, tool_choice="get_weather",
                                             max_tokens=100, temperature=0.7, seed=1),
                          timeout=120)  # fmt: skip
        assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1
        jsonschema.validate(json.loads(r.tool_calls[0].arguments), SCHEMAS["get_weather"])
        stream = list(stub.GenerateStream(pb.GenerateRequest(
            chat=chat, tools=tools, tool_choice="get_weather", max_tokens=100,
            temperature=0.7, seed=1), timeout=120))  # fmt: skip
        deltas = [c for m in stream for c in m.tool_calls]
        assert deltas[0].name == "get_weather"
        assert "".join(d.arguments for d in deltas) == r.tool_calls[0].arguments
        so = pb.StructuredOutput(json_schema=json.dumps(ANSWER))
        r = stub.Generate(pb.GenerateRequest(text="JSON:", structured_output=so, n=2,
                                             max_tokens=150, seed=9, logprobs=True,
                                             top_logprobs=3), timeout=120)  # fmt: skip
        assert [c.index for c in r.choices] == [0, 1]
        for c in r.choices:
            jsonschema.validate(json.loads(c.text), ANSWER)
            assert len(c.top_logprobs) == len(c.token_ids) and len(c.top_logprobs[0].logprobs) == 3
        assert r.usage.completion_tokens == sum(len(c.token_ids) for c in r.choices)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(text="x", tools=tools), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
