"""The Serve app end to end on a tiny checkpoint (experts local): the OpenAI API through the real
`openai` client, the gRPC API through the generated stubs, metrics, errors and disconnects.
One app serves the whole module."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass

import grpc
import httpx
import pytest
import ray
import torch
import yaml
from openai import AsyncOpenAI, OpenAI
from ray import serve

from cluster.config import ClusterConfig
from cluster.launcher import init_ray
from deploy.app import app_builder, build_app
from deploy.bootstrap import pool_owner_running, pool_running, stop_detached_pool
from router.rpc import generate_pb2, generate_pb2_grpc
from tests.deploy.helpers import free_port, wait_until
from workers.dense_worker import DenseWorker
from workers.make_checkpoint import make_checkpoint
from workers.requests import EngineConfig
from workers.sampler import SamplingParams

APP, MODEL = "test", "tiny"
MAX_SEQS, MAX_QUEUE = 8, 32
PROMPTS = [[5, 17, 300, 42, 9], list(range(100, 170)), [1000, 3]]


@dataclass
class Served:
    model_dir: str
    base_url: str
    grpc_address: str


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = str(make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0))
    http_port, grpc_port = free_port(), free_port()
    config = ClusterConfig.from_dict(
        {
            "model": model_dir,
            "experts": {"shards": 0},
            "dense": {"num_cpus": 1, "max_num_seqs": MAX_SEQS, "max_queue": MAX_QUEUE},
            "server": {"http_port": http_port, "grpc_port": grpc_port, "model_name": MODEL},
        }
    )
    init_ray(None, min_cpus=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(config, model_dir), name=APP, blocking=False)
        base = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: _status(f"{base}/health/ready") == 200, 60, "readiness")
        yield Served(model_dir, base, f"127.0.0.1:{grpc_port}")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(served) -> OpenAI:
    return OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def worker(served):
    """The in-process reference. One torch thread: the tiny model is far slower with two on a
    2-core machine that also runs the Ray replicas."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield DenseWorker(served.model_dir, "float32", EngineConfig(max_num_seqs=2))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.grpc_address) as channel:
        yield generate_pb2_grpc.GenerationStub(channel), channel


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return 0


def replica_stats() -> dict:
    return serve.get_deployment_handle("DenseReplica", APP).stats.remote().result(timeout_s=10)


def wait_idle() -> None:
    def idle() -> bool:
        s = replica_stats()
        return s["free_slots"] == MAX_SEQS and s["running"] == 0 and s["waiting"] == 0

    wait_until(idle, 20, "all cache slots to be free again")


def greedy(worker: DenseWorker, ids: list[int], n: int):
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=True)
    return worker.generate([ids], params)[0]


# ------------------------------------------------------------------------------ OpenAI HTTP
def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    for path in ("/health", "/health/live"):
        r = httpx.get(f"{served.base_url}{path}")
        assert r.status_code == 200 and r.json()["grpc"] == served.grpc_address
        assert r.json()["ready"] is True
    r = httpx.get(f"{served.base_url}/health/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready", "reason": ""}


def test_docs_and_openapi_list_every_route(served):
    assert httpx.get(f"{served.base_url}/docs").status_code == 200
    schema = httpx.get(f"{served.base_url}/openapi.json").json()
    paths = set(schema["paths"])
    expected = {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models",
                "/v1/models/{model_id}", "/tokenize", "/detokenize", "/health", "/health/live",
                "/health/ready", "/metrics", "/admin/experts"}  # fmt: skip
    assert expected <= paths, expected - paths
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert "messages" in schema["components"]["schemas"][ref]["properties"]


def test_completion(client, worker):
    r = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert isinstance(r.choices[0].text, str)
    prompt_len = len(worker.tokenizer.encode("The quick brown fox"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_len, 8)
    assert r.usage.total_tokens == prompt_len + 8


def test_chat_completion(client, worker):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=6, extra_body={"ignore_eos": True}
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    prompt = worker.tokenizer.encode(worker.tokenizer.apply_chat_template(messages))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 6)


@pytest.mark.parametrize("ids", PROMPTS)
def test_greedy_matches_dense_worker(client, worker, ids):
    r = client.completions.create(
        model=MODEL,
        prompt=ids,
        max_tokens=12,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    ref = greedy(worker, ids, 12)
    choice = r.choices[0]
    assert choice.token_ids == ref.token_ids
    assert choice.text == ref.text
    assert choice.logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert len(choice.logprobs.tokens) == 12 and r.usage.prompt_tokens == len(ids)


def test_chat_greedy_matches_dense_worker_and_logprobs(client, worker):
    messages = [{"role": "user", "content": "Tell me about experts."}]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    tok = worker.tokenizer
    ref = greedy(worker, tok.encode(tok.apply_chat_template(messages)), 10)
    assert r.choices[0].token_ids == ref.token_ids
    assert r.choices[0].message.content == ref.text
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(ref.logprobs, abs=1e-4)


def test_stream_chunks_arrive_before_the_end(client, worker):
    """The first chunk arrives while the engine is still generating the request."""
    text, reasons, running_at_first = "", [], None
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[1],
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if running_at_first is None:
            running_at_first = replica_stats()["running"]
        text += chunk.choices[0].text
        reasons.append(chunk.choices[0].finish_reason)
    assert running_at_first == 1, "the first chunk should arrive before generation ends"
    assert len(reasons) > 8 and reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert text == greedy(worker, PROMPTS[1], 200).text


def test_chat_stream_role_finish_and_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_32_concurrent_streams(served):
    async def one(client: AsyncOpenAI, i: int) -> tuple[int, int, int]:
        n = 4 + i % 7
        stream = await client.completions.create(
            model=MODEL,
            prompt=PROMPTS[i % 3],
            max_tokens=n,
            stream=True,
            seed=i,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return n, usage.completion_tokens, usage.prompt_tokens

    async def main():
        async with AsyncOpenAI(base_url=f"{served.base_url}/v1", api_key="x") as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    assert [r[0] for r in results] == [r[1] for r in results]
    assert [r[2] for r in results] == [len(PROMPTS[i % 3]) for i in range(32)]
    wait_idle()


def test_stop_strings_and_stop_token_ids(client, worker):
    ref = greedy(worker, PROMPTS[1], 24)
    full = ref.text
    cut = next(i for i in range(3, len(full) - 2) if full.find(full[i : i + 2]) == i)
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[1],
        max_tokens=24,
        temperature=0,
        stop=[full[cut : cut + 2]],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    stop_id = ref.token_ids[3]
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[1],
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]},
    )
    assert r.usage.completion_tokens == ref.token_ids.index(stop_id) + 1
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def run(seed: int):
        return (
            client.completions.create(
                model=MODEL,
                prompt=PROMPTS[0],
                max_tokens=12,
                temperature=1.0,
                top_p=0.9,
                seed=seed,
                extra_body={"top_k": 50, "ignore_eos": True, "return_token_ids": True},
            )
            .choices[0]
            .token_ids
        )

    assert run(7) == run(7)


GOOD = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
BAD_REQUESTS = [  # (path, body, status, param, message fragment)
    ("completions", b"{not json", 400, None, "not valid JSON"),
    ("completions", b"[1, 2]", 400, None, "request body"),
    ("completions", GOOD | {"max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ("completions", GOOD | {"temperature": "hot"}, 400, "temperature", "valid number"),
    ("completions", GOOD | {"model": "gpt-4"}, 404, "model", "does not exist"),
    ("completions", GOOD | {"max_tokens": 0}, 400, "max_tokens", "> 0"),
    ("completions", GOOD | {"max_tokens": -3}, 400, "max_tokens", "> 0"),
    ("completions", GOOD | {"temperature": -0.5}, 400, "temperature", ">= 0"),
    (
        "completions",
        b'{"model": "tiny", "prompt": "hi", "temperature": 1e999}',
        400,
        "temperature",
        "finite",
    ),
    ("completions", GOOD | {"stop_token_ids": [-1]}, 400, "stop_token_ids", "outside"),
    ("completions", GOOD | {"stop_token_ids": [10**12]}, 400, "stop_token_ids", "outside"),
    ("completions", GOOD | {"prompt": "word " * 100000}, 400, None, "cannot fit"),
    ("completions", GOOD | {"top_p": 0}, 400, "top_p", "top_p"),
    ("completions", GOOD | {"n": 9}, 400, None, "exceeds the 8 concurrent sequences"),
    ("completions", GOOD | {"presence_penalty": 2.5}, 400, "presence_penalty", "in [-2, 2]"),
    ("completions", GOOD | {"logit_bias": {"99999": 1}}, 400, "logit_bias", "outside the"),
    ("completions", GOOD | {"frobnicate": True}, 400, "frobnicate", "Unrecognized"),
    ("completions", GOOD | {"prompt": [5] * 5000}, 400, None, "exceeds the model length"),
    ("completions", GOOD | {"max_tokens": 5000}, 400, None, "exceeds the model length"),
    ("completions", GOOD | {"prompt": [1, 99999]}, 400, None, "outside"),
    ("completions", GOOD | {"prompt": []}, 400, "prompt", "empty"),
    ("completions", GOOD | {"prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("completions", GOOD | {"stop": [""]}, 400, "stop", "non-empty"),
    ("completions", {"prompt": "hi"}, 400, "model", "Field required"),
    ("chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages", "valid array"),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user"}]},
        400,
        "messages.0.content",
        "needs content",
    ),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "system", "content": None}]},
        400,
        "messages.0.content",
        "needs content",
    ),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
        "expected one of",
    ),
    (
        "chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 0,
        },
        400,
        "max_completion_tokens",
        "> 0",
    ),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3},
        400,
        "top_logprobs",
        "requires logprobs",
    ),
]


@pytest.mark.parametrize("path,body,status,param,fragment", BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_server_recovers(
    served, path, body, status, param, fragment
):
    url = f"{served.base_url}/v1/{path}"
    r = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}
    ok = httpx.post(f"{served.base_url}/v1/completions", json=GOOD)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_body_over_the_limit_is_413_without_freezing_the_ingress(served):
    """server.max_body_mb (8 MiB by default): refused on the declared length, and the ingress
    keeps answering."""
    big = b'{"model": "tiny", "prompt": "' + b"x" * (9 * 2**20) + b'"}'
    r = httpx.post(f"{served.base_url}/v1/completions", content=big, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{served.base_url}/health/live").status_code == 200


def test_assistant_message_with_tool_calls_may_omit_content(served):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "user", "content": "thanks"},
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}
    r = httpx.post(f"{served.base_url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    messages[1].pop("tool_calls")
    r = httpx.post(f"{served.base_url}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.1.content"


def test_documented_params_at_noop_values_are_accepted(served):
    body = GOOD | {
        "user": "u1",
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "n": 1,
        "stream_options": None,
        "logit_bias": {},
    }
    r = httpx.post(f"{served.base_url}/v1/completions", json=body)
    assert r.status_code == 200, r.text


def test_unknown_route_is_openai_shaped_404(served):
    r = httpx.get(f"{served.base_url}/v1/engines")
    assert r.status_code == 404 and "message" in r.json()["error"]


LONG = {
    "model": MODEL,
    "prompt": PROMPTS[0],
    "max_tokens": 4000,
    "ignore_eos": True,
    "stream": True,
}


def test_client_disconnect_mid_stream_frees_the_slot(served):
    with httpx.Client(base_url=served.base_url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=LONG) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # keep a reference: collecting it closes the connection
            data = [line for line in (next(lines) for _ in range(6)) if line]
            assert data and all(line.startswith("data: {") for line in data)
            assert replica_stats()["running"] == 1
    wait_idle()  # the engine aborted the request and freed its cache slot
    metrics = httpx.get(f"{served.base_url}/metrics").text
    assert (
        f'expertmesh_engine_free_slots{{replica="{replica_stats()["replica"]}"}} {MAX_SEQS}.0'
        in metrics
    )
    assert 'expertmesh_requests_total{endpoint="completions",status="499"}' in metrics


def test_queue_full_is_429_and_recovers(served):
    """Fill every cache slot, then the engine queue; the next request is 429."""

    async def reach(running: int, waiting: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            s = await asyncio.to_thread(replica_stats)
            if (s["running"], s["waiting"]) == (running, waiting):
                return
            assert time.monotonic() < deadline, f"stuck at {s}"
            await asyncio.sleep(0.1)

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(base_url=served.base_url, timeout=60) as http:

            async def hold() -> int:
                async with http.stream("POST", "/v1/completions", json=LONG) as r:
                    async for _ in r.aiter_lines():
                        pass
                    return r.status_code

            tasks = [asyncio.create_task(hold()) for _ in range(MAX_SEQS)]
            await reach(MAX_SEQS, 0)
            tasks += [asyncio.create_task(hold()) for _ in range(MAX_QUEUE)]
            await reach(MAX_SEQS, MAX_QUEUE)
            try:
                return await http.post("/v1/completions", json=GOOD)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    r = asyncio.run(main())
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    wait_idle()
    assert httpx.post(f"{served.base_url}/v1/completions", json=GOOD).status_code == 200


def test_metrics(served, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3)
    text = httpx.get(f"{served.base_url}/metrics").text
    for name in (
        "expertmesh_requests_total",
        "expertmesh_prompt_tokens_total",
        "expertmesh_generation_tokens_total",
        "expertmesh_time_to_first_token_seconds_bucket",
        "expertmesh_e2e_request_latency_seconds_count",
        "expertmesh_engine_running",
        "expertmesh_engine_waiting",
        "expertmesh_engine_max_num_seqs",
    ):
        assert name in text, name
    assert 'expertmesh_requests_total{endpoint="completions",status="200"}' in text
    assert 'expertmesh_requests_total{endpoint="completions",status="400"}' in text


# ------------------------------------------------------------------------------------- gRPC
def _grpc_request(**kw) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(model=MODEL, **kw)


def test_grpc_generate_matches_dense_worker(stub, worker):
    gen, _ = stub
    req = _grpc_request(
        token_ids=generate_pb2.TokenIds(ids=PROMPTS[1]),
        max_tokens=10,
        temperature=0,
        ignore_eos=True,
        logprobs=True,
        request_id="abc",
    )
    r = gen.Generate(req, timeout=30)
    ref = greedy(worker, PROMPTS[1], 10)
    assert list(r.token_ids) == ref.token_ids and r.text == ref.text
    assert list(r.logprobs) == pytest.approx(ref.logprobs, abs=1e-4)
    assert r.finish_reason == "length" and r.request_id == "abc"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (70, 10, 80)


def test_grpc_stream_and_chat(stub, worker):
    gen, _ = stub
    msgs = [generate_pb2.ChatMessage(role="user", content="hello there")]
    req = _grpc_request(
        chat=generate_pb2.ChatMessages(messages=msgs), max_tokens=12, temperature=0, ignore_eos=True
    )
    parts = list(gen.GenerateStream(req, timeout=30))
    assert len(parts) > 1 and all(p.finish_reason == "" for p in parts[:-1])
    assert parts[-1].finish_reason == "length" and parts[-1].usage.completion_tokens == 12
    tok = worker.tokenizer
    ref = greedy(
        worker,
        tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello there"}])),
        12,
    )
    assert [t for p in parts for t in p.token_ids] == ref.token_ids
    assert "".join(p.text for p in parts) == ref.text


def test_grpc_health_and_reflection(stub):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, channel = stub
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "expertmesh.v1.Generation"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(
        refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {"expertmesh.v1.Generation", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    "kw,code,fragment",
    [
        ({"model": "nope", "text": "hi"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
        ({"text": "hi", "temperature": -1}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"text": "hi", "max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            {"token_ids": generate_pb2.TokenIds(ids=[5] * 5000)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "exceeds the model length",
        ),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"text": "hi", "temperature": float("inf")}, grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        ({"text": "hi", "stop_token_ids": [-1]}, grpc.StatusCode.INVALID_ARGUMENT, "outside"),
    ],
)
def test_grpc_errors(stub, kw, code, fragment):
    gen, _ = stub
    req = generate_pb2.GenerateRequest(**({"model": MODEL} | kw))
    for call in (gen.Generate, lambda r, timeout: list(gen.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(req, timeout=30)
        assert info.value.code() == code and fragment in info.value.details()
    assert gen.Generate(_grpc_request(text="ok", max_tokens=2), timeout=30).usage.total_tokens


def test_grpc_garbage_protobuf_is_invalid_argument(stub):
    _, channel = stub
    for method, kind in (("Generate", "unary_unary"), ("GenerateStream", "unary_stream")):
        call = getattr(channel, kind)(f"/expertmesh.v1.Generation/{method}")
        with pytest.raises(grpc.RpcError) as info:
            result = call(b"\xff\xff\xff\xff garbage", timeout=30)
            list(result) if kind == "unary_stream" else result
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid expertmesh.v1.GenerateRequest" in info.value.details()
    gen, _ = stub
    assert gen.Generate(_grpc_request(text="ok", max_tokens=2), timeout=30).usage.total_tokens


def test_grpc_cancel_frees_the_slot(stub):
    gen, _ = stub
    req = _grpc_request(
        token_ids=generate_pb2.TokenIds(ids=PROMPTS[0]), max_tokens=4000, ignore_eos=True
    )
    call = gen.GenerateStream(req, timeout=60)
    assert [next(call).token_ids for _ in range(3)]
    assert replica_stats()["running"] == 1
    call.cancel()
    wait_idle()


# ------------------------------------------------------------------- app_builder + shards
def test_app_builder_from_config_file_with_expert_shards(served, worker, tmp_path):
    """serve.yaml's entry point: a cluster YAML with 2 expert shards (started in a detached
    owner) shared by 2 data-parallel dense replicas; requests are spread over both replicas
    and remote experts give the same greedy tokens as the local worker."""
    config = {
        "model": served.model_dir,
        "experts": {"shards": 2, "num_cpus": 0.25},
        "dense": {"num_cpus": 0.25, "max_num_seqs": 4,
                  "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        "server": {"grpc_port": free_port(), "model_name": "tiny-sharded"},
    }  # fmt: skip
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    body = {
        "model": "tiny-sharded",
        "prompt": PROMPTS[1],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }

    async def burst(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"{served.base_url}/sharded", timeout=120) as http:
            return await asyncio.gather(
                *[http.post("/v1/completions", json=body) for _ in range(n)]
            )

    def finished_by_replica() -> dict[str, int]:
        handle = serve.get_deployment_handle("DenseReplica", "sharded")
        finished = {}
        for _ in range(40):  # Serve routes each stats call to some replica
            s = handle.stats.remote().result(timeout_s=10)
            finished[s["replica"]] = s["finished"]
        return finished

    try:
        serve.run(app_builder({"config": str(path)}), name="sharded", route_prefix="/sharded")
        assert pool_running()
        expected = greedy(worker, PROMPTS[1], 8).token_ids
        sent = 0
        for _ in range(4):  # Serve may send a whole burst to one replica: send more bursts
            for r in asyncio.run(burst(16)):
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["token_ids"] == expected
            sent += 16
            finished = finished_by_replica()
            if len(finished) == 2 and all(n > 0 for n in finished.values()):
                break
        assert len(finished) == 2, f"expected 2 dense replicas, saw {finished}"
        assert all(n > 0 for n in finished.values()), f"a replica got no requests: {finished}"
        assert sum(finished.values()) == sent
        check_pool_admin(f"{served.base_url}/sharded", routers=2)
    finally:
        serve.delete("sharded")
    # the detached pool was started for this app: it stops once the app is gone
    wait_until(lambda: not pool_running(), 60, "the app's expert pool to stop")
    wait_until(lambda: not pool_owner_running(), 30, "the pool's owner to stop itself")
    assert not stop_detached_pool()


def check_pool_admin(base_url: str, routers: int) -> None:
    """GET /admin/experts reports the pool (ready, the routed load both replicas pushed) and
    /metrics carries the pool's counters and gauges."""
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for _ in range(40):  # the replicas' watchers push their load about once a second
            report = http.get("/admin/experts").json()
            if sum(r["rows"] for r in report["layers"]) and report["metrics"]["routers"] >= routers:
                break
            time.sleep(0.5)
        assert report["ready"] and report["version"] >= 1, report["status"]
        assert sum(r["rows"] for r in report["layers"]) > 0
        assert report["metrics"]["routers"] == routers
        assert {s["state"] for s in report["shards"]} == {"up"}
        assert not re.search(r"\d+\.\d+\.\d+\.\d+", json.dumps(report))  # no addresses
        assert http.get("/admin/experts", params={"top": 0}).status_code == 400
        text = http.get("/metrics").text
    assert "# TYPE expertmesh_pool_routed_pairs_total counter" in text
    assert "# TYPE expertmesh_pool_shards_up gauge" in text
    assert 'expertmesh_pool_shard_up{shard="shard-0"} 1.0' in text
