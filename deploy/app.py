"""Ray Serve application: data-parallel dense replicas (one engine + cache each; experts local
or on the expert-shard pool), an OpenAI-compatible HTTP ingress and a gRPC ingress.

    serve run deploy/serve.yaml            # app_builder({"config": "deploy/configs/demo.yaml"})
    expertmesh serve [--config ...]        # cluster/serve_cli.py
"""

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from cluster.config import ClusterConfig, ExpertsConfig, ServerConfig
from deploy import experts_admin
from deploy.auth import UNAUTHENTICATED_MESSAGE, bearer_token, key_matches, resolve_api_key
from deploy.bootstrap import (
    attach_app_to_pool,
    ensure_expert_pool,
    load_config,
    resolve_model,
    served_model_name,
)
from deploy.frontend import Frontend
from deploy.health import ReadinessMonitor
from deploy.metrics import Metrics
from deploy.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    engine_inputs,
    error_body,
)
from deploy.openai_format import warning_headers
from deploy.openai_serving import ENDPOINTS
from deploy.params import ModelInfo, StreamError
from deploy.prefix_router import router_config
from deploy.responses_api import ResponsesRequest
from deploy.tokenize_api import (
    DetokenizeRequest,
    TokenizeRequest,
    detokenize,
    model_card,
    parse_detokenize,
    parse_tokenize,
    tokenize,
)
from workers.requests import RequestError, RequestOutput, ResumeState
from workers.sampler import SamplingParams

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 10.0
INGRESS_ACTOR = {"num_cpus": 0.1}
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed on a worker thread
api = FastAPI(
    title="expertmesh",
    description="OpenAI-compatible API of an expertmesh cluster (gRPC: expertmesh.v1.Generation)",
    docs_url="/docs",
    redoc_url=None,
)


@serve.deployment(name="DenseReplica")
class DenseReplica:
    """One dense model + continuous-batching engine; streams RequestOutput deltas."""

    def __init__(self, model_dir: str, config: ClusterConfig, model_name: str) -> None:
        from cluster.launcher import connect_expert_backend
        from workers.async_engine import AsyncEngine
        from workers.dense_worker import DenseWorker
        from workers.resources import step_threads

        d = config.dense
        threads = step_threads(d.torch_threads, d.wide_step_threads, d.wide_step_tokens)
        threads.apply(0)  # narrow until a wide step comes
        experts = connect_expert_backend(config)  # None: experts local (experts.shards == 0)
        self.worker = DenseWorker(
            model_dir,
            config.dtype,
            config.dense.engine_config(),
            experts,
            micro_batches=config.dense.micro_batches,
            expert_dtype=config.experts.dtype,
            cache_config=config.dense.cache_config(),
            step_threads=threads,
        )
        self.engine = AsyncEngine(self.worker.engine, d.stream_interval)
        self.model_name = model_name
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        resume: ResumeState | None = None,
    ) -> AsyncIterator[RequestOutput | StreamError]:
        """Call with handle.options(stream=True). Rejections come as one StreamError; closing
        or cancelling the call aborts the request and frees its cache slot. `resume` continues
        a request after the output its client already has (another replica's, before it died)."""
        stream = self.engine.generate(prompt_ids, params, request_id, resume)
        try:
            async for out in stream:
                yield out
        except RequestError as exc:
            yield StreamError(exc.kind, exc.message)
        except ValueError as exc:  # e.g. a duplicate request id
            yield StreamError("invalid", str(exc))
        finally:
            await stream.aclose()

    def stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return stats | {
            "replica": self.replica,
            "max_num_seqs": self.worker.engine_config.max_num_seqs,
        }

    def model_info(self) -> dict[str, Any]:
        cfg, tok = self.worker.config, self.worker.tokenizer
        info = ModelInfo(
            name=self.model_name,
            max_model_len=min(self.worker.engine_config.max_model_len, cfg.max_position_embeddings),
            vocab_size=cfg.vocab_size,
            has_tokenizer=tok is not None,
            has_chat_template=bool(tok is not None and tok.chat_template),
        )
        return dataclasses.asdict(info)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


@serve.deployment(
    name="GrpcIngress", num_replicas=1, max_ongoing_requests=64, ray_actor_options=INGRESS_ACTOR
)
class GrpcIngress:
    """grpc.aio server (Generation + health + reflection) in front of the dense replicas."""

    async def __init__(
        self,
        dense: Any,
        model_dir: str,
        model_name: str,
        server: ServerConfig,
        experts: ExpertsConfig,
    ) -> None:
        from deploy.grpc_api import start_server

        self.frontend = Frontend(
            dense, model_dir, model_name, replica_loss_timeout_s=server.replica_loss_timeout_s
        )
        self.server, self.port, health = await start_server(
            self.frontend,
            server.host,
            server.grpc_port,
            api_key=server.api_key,
            max_message_mb=server.max_body_mb,
        )
        self.address = f"{server.host}:{self.port}"
        self.monitor = ReadinessMonitor(
            self.frontend.gate, dense.stats.remote, experts.shards, None,
            tls=experts.tls_files(), on_change=health.update,
        )  # fmt: skip
        self.monitor.start()

    def get_address(self) -> str:
        return self.address

    async def drain(self, grace_s: float) -> dict[str, int]:
        return await _drain(self.frontend, self.monitor, grace_s)

    def events(self, since: int = 0) -> list[tuple[int, float, str]]:
        return self.frontend.events.since(since)

    async def __del__(self) -> None:
        await self.monitor.stop()
        await self.server.stop(grace=1.0)


async def _drain(frontend: Frontend, monitor: ReadinessMonitor, grace_s: float) -> dict[str, int]:
    """Readiness NOT_SERVING, refuse new requests, give those in flight `grace_s`, cut the rest."""
    inflight = frontend.gate.inflight
    frontend.gate.draining = True
    await monitor.refresh()
    left = await frontend.gate.drain(grace_s)
    cut = frontend.cut_all() if left else 0
    return {"inflight": inflight, "finished": inflight - left, "cut": cut}


# Registered (and defined) before @serve.ingress, which freezes (pickles) the FastAPI app.
async def _off_loop(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn on a worker thread when the input is large (keeps the event loop answering)."""
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    err = RequestError("not_found" if exc.status_code == 404 else "invalid", str(exc.detail))
    body = error_body(err)
    body["error"]["code"] = None
    return JSONResponse(body, status_code=exc.status_code)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    rid = Frontend.new_id("err")
    log.exception("unhandled error on %s (request id %s)", request.url.path, rid)
    body = error_body(RequestError("internal", f"internal error (request id {rid})"))
    return JSONResponse(body, status_code=500)


def _openapi() -> dict[str, Any]:
    """FastAPI's schema plus the request bodies, which the handlers parse themselves (to answer
    with OpenAI-shaped errors)."""
    if api.openapi_schema:
        return api.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=api.title, version=api.version, routes=api.routes,
                         description=api.description)  # fmt: skip
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in REQUEST_SCHEMAS.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        content = {"application/json": {"schema": ref}}
        schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": content}
    api.openapi_schema = schema
    return schema


REQUEST_SCHEMAS: dict[str, type] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
api.openapi = _openapi


@serve.deployment(
    name="OpenAIIngress",
    num_replicas=1,
    max_ongoing_requests=1024,
    ray_actor_options=INGRESS_ACTOR,
)
@serve.ingress(api)
class OpenAIIngress:
    async def __init__(
        self,
        dense: Any,
        grpc_ingress: Any,
        model_dir: str,
        model_name: str,
        server: ServerConfig,
        experts: ExpertsConfig,
        pool_owned_by_app: bool = False,
    ) -> None:
        self.frontend = Frontend(
            dense, model_dir, model_name, replica_loss_timeout_s=server.replica_loss_timeout_s
        )
        self.grpc = grpc_ingress
        self.metrics = Metrics()
        self.model_dir = model_dir
        self.created = int(time.time())
        self.api_key = server.api_key
        self.max_body = int(server.max_body_mb * 2**20)
        self.monitor = ReadinessMonitor(
            self.frontend.gate, dense.stats.remote, experts.shards, self.frontend.events,
            tls=experts.tls_files(),
        )  # fmt: skip
        self.monitor.start()
        if pool_owned_by_app:  # `serve run`: the expert pool lives as long as this app
            attached = attach_app_to_pool(serve.get_replica_context().app_name)
            if attached is not None:
                await attached

    @api.post("/v1/completions", summary="OpenAI text completion (streams with stream=true)")
    async def completions(self, request: Request) -> Response:
        return await self._serve("completions", request)

    @api.post("/v1/chat/completions", summary="OpenAI chat completion (streams with stream=true)")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat_completions", request)

    @api.post("/v1/responses", summary="OpenAI Responses API, stateless (streams with stream=true)")
    async def responses(self, request: Request) -> Response:
        return await self._serve("responses", request)

    @api.get("/v1/models", summary="The served model")
    async def models(self, request: Request) -> Response:
        return await self._model_card(request, None)

    @api.get("/v1/models/{model_id:path}", summary="The served model's card")
    async def model(self, request: Request, model_id: str) -> Response:
        return await self._model_card(request, model_id)

    @api.post("/tokenize", summary="vLLM's tokenize: a prompt or chat messages -> token ids")
    async def tokenize(self, request: Request) -> Response:
        return await self._text("tokenize", request, parse_tokenize, tokenize)

    @api.post("/detokenize", summary="vLLM's detokenize: token ids -> text")
    async def detokenize(self, request: Request) -> Response:
        return await self._text("detokenize", request, parse_detokenize, detokenize)

    @api.get("/health", summary="Liveness: 200 while this process answers")
    async def health(self) -> Response:
        return await self.live()

    @api.get("/health/live", summary="Liveness: 200 while this process answers")
    async def live(self) -> Response:
        ready = self.monitor.current
        body = {"status": "ok", "ready": ready.ready, "grpc": await self._grpc_address()}
        return JSONResponse(body)

    @api.get("/health/ready", summary="Readiness: 200 when serving, 503 with the reason if not")
    async def ready(self) -> Response:
        ready = await self.monitor.get()
        return JSONResponse(ready.to_dict(), status_code=200 if ready.ready else 503)

    @api.get("/metrics", summary="Prometheus metrics")
    async def metrics(self) -> Response:
        stats = await self.frontend.replica_stats(self.metrics.known_replicas + 1)
        self.metrics.update_engine(stats)
        body = self.metrics.render() + await experts_admin.pool_metrics_text()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @api.get("/admin/experts", summary="Expert pool: load per layer and shard (JSON)")
    async def admin_experts(self, request: Request, top: int = 5) -> Response:
        if (denied := self._check_key(request, "admin_experts")) is not None:
            return denied
        return await experts_admin.experts_response(top)

    async def drain(self, grace_s: float) -> dict[str, int]:
        return await _drain(self.frontend, self.monitor, grace_s)

    def events(self, since: int = 0) -> list[tuple[int, float, str]]:
        return self.frontend.events.since(since)

    async def readiness(self) -> dict[str, Any]:
        return (await self.monitor.get()).to_dict()

    async def __del__(self) -> None:
        await self.monitor.stop()

    async def _grpc_address(self) -> str | None:
        try:
            return await asyncio.wait_for(self.grpc.get_address.remote(), HEALTH_TIMEOUT_S)
        except Exception:
            return None

    async def _model_card(self, request: Request, model_id: str | None) -> Response:
        if (denied := self._check_key(request, "models")) is not None:
            return denied
        try:
            info = await self.frontend.info()
        except Exception:
            log.exception("model_info failed")
            return self._error("models", RequestError("unavailable", "the model is not ready"))
        card = model_card(info, self.created, self.model_dir)
        if model_id is None:
            self.metrics.request_done("models", 200)
            return JSONResponse({"object": "list", "data": [card]})
        try:
            self.frontend.check_model(model_id)
        except RequestError as exc:
            return self._error("models", exc)
        self.metrics.request_done("models", 200)
        return JSONResponse(card)

    async def _text(self, endpoint: str, request: Request, parse: Any, answer: Any) -> Response:
        """/tokenize and /detokenize: auth, body cap, parse, answer off the event loop."""
        raw = await self._admit(endpoint, request)
        if isinstance(raw, Response):
            return raw
        try:
            req = parse(raw)
            if req.model:
                self.frontend.check_model(req.model)
            info = await self.frontend.info()
            body = await asyncio.to_thread(answer, req, self.frontend.tokenizer, info)
        except RequestError as exc:
            return self._error(endpoint, exc)
        self.metrics.request_done(endpoint, 200)
        return JSONResponse(body)

    # ------------------------------------------------------------------ generation
    async def _serve(self, endpoint: str, request: Request) -> Response:
        start = time.perf_counter()
        spec = ENDPOINTS[endpoint]
        raw = await self._admit(endpoint, request)
        if isinstance(raw, Response):
            return raw
        stream = None
        try:
            self.frontend.gate.check()  # refuses while draining
            req = await _off_loop(len(raw), spec.parse, raw)
            self.frontend.check_model(req.model)
            ids, params = await self._inputs(req)
            rid = self.frontend.new_id(spec.id_prefix)
            fmt = spec.make_format(rid, self.frontend.model_name, self.frontend.tokenizer, req, ids)
            stream = self.frontend.stream(ids, params, fmt.rid)
            first = await anext(stream)
        except RequestError as exc:
            if stream is not None:
                await stream.aclose()
            return self._error(endpoint, exc)
        self.metrics.first_token(endpoint, start)
        done = self._done_callback(endpoint, start)
        headers = {"X-Request-Id": fmt.rid} | warning_headers(req)
        if req.stream:
            events = self._events(stream, first, fmt, done)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        response = await self._collect(endpoint, stream, first, fmt, done)
        response.headers.update(headers)
        return response

    async def _inputs(self, req: Any) -> tuple[list[int], SamplingParams]:
        info = await self.frontend.info()
        self.frontend.precheck_prompt(info.max_model_len, **req.prompt_kwargs())
        tok = self.frontend.tokenizer
        ids, params = await asyncio.to_thread(engine_inputs, req, tok, info.max_model_len)
        self.frontend.check_params(params, info)
        return ids, params

    async def _admit(self, endpoint: str, request: Request) -> bytes | Response:
        """The request's body once its API key and size pass; else the 401 / 413 answer."""
        if (denied := self._check_key(request, endpoint)) is not None:
            return denied
        raw = await self._read_body(request)
        if raw is None:
            limit = self.max_body / 2**20
            return self._plain_error(
                endpoint, 413, f"request body is larger than {limit:g} MiB", "request_too_large"
            )
        return raw

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None when it is larger than server.max_body_mb (checked on the
        declared length first, then while reading)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_key(self, request: Request, endpoint: str) -> Response | None:
        if key_matches(bearer_token(request.headers.get("authorization")), self.api_key):
            return None
        response = self._plain_error(endpoint, 401, UNAUTHENTICATED_MESSAGE, "invalid_api_key")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    async def _collect(self, endpoint, stream, first, fmt, done) -> Response:
        fmt.add(first)
        try:
            async for out in stream:
                fmt.add(out)
        except RequestError as exc:
            return self._error(endpoint, exc)
        finally:
            await stream.aclose()
        done(200, fmt)
        return JSONResponse(fmt.response())

    async def _events(self, stream, first, fmt, done) -> AsyncIterator[bytes]:
        """The format's server-sent events (OpenAI chunks + [DONE], or Responses events)."""
        status = 499  # the client went away mid-stream
        tail: list[bytes] = []
        try:
            for event in fmt.sse_start() + fmt.sse(first):
                yield event
            async for out in stream:
                for event in fmt.sse(out):
                    yield event
            tail = fmt.sse_end()
            status = 200
        except RequestError as exc:
            status = exc.http_status
            tail = fmt.sse_error(exc)
        finally:
            await stream.aclose()
            done(status, fmt)
        for event in tail:
            yield event

    def _done_callback(self, endpoint: str, start: float) -> Callable[[int, Any], None]:
        def done(status: int, fmt: Any) -> None:
            self.metrics.request_done(endpoint, status)
            self.metrics.finished(endpoint, start, *fmt.totals())

        return done

    def _error(self, endpoint: str, exc: RequestError) -> JSONResponse:
        self.metrics.request_done(endpoint, exc.http_status)
        return JSONResponse(error_body(exc), status_code=exc.http_status)

    def _plain_error(self, endpoint: str, status: int, message: str, code: str) -> JSONResponse:
        self.metrics.request_done(endpoint, status)
        body = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        return JSONResponse({"error": body}, status_code=status)


# ----------------------------------------------------------------------------- building
def build_app(
    config: ClusterConfig, model_dir: str, pool_owned_by_app: bool = False
) -> Application:
    """The application graph for a resolved config (the expert pool must already run).
    `pool_owned_by_app`: the pool was started for this app (`serve run`) and is shut down
    when the app is deleted."""
    d, s = config.dense, config.server
    s = dataclasses.replace(s, api_key=resolve_api_key(s.api_key))  # env var read here
    name = served_model_name(config, model_dir)
    actor = {"num_cpus": d.num_cpus} | ({"num_gpus": d.num_gpus} if d.num_gpus else {})
    actor |= {"resources": dict(d.resources)} if d.resources else {}
    a = d.autoscaling
    autoscaling = {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "initial_replicas": a.min_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
    }
    routing = {"request_router_config": router_config(d.prefix_routing_imbalance)}
    dense = DenseReplica.options(
        ray_actor_options=actor,
        autoscaling_config=autoscaling,
        max_ongoing_requests=d.max_num_seqs + d.max_queue + 16,  # engine queues; +16 for stats
        **(routing if d.prefix_routing else {}),
        graceful_shutdown_timeout_s=s.drain_grace_s + 5,
    ).bind(model_dir, config, name)
    experts = config.experts
    front = {
        "ray_actor_options": INGRESS_ACTOR | ({"resources": s.resources} if s.resources else {})
    }
    grpc_ingress = GrpcIngress.options(**front).bind(dense, model_dir, name, s, experts)
    return OpenAIIngress.options(**front).bind(
        dense, grpc_ingress, model_dir, name, s, experts, pool_owned_by_app
    )


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point of `serve run deploy/serve.yaml` (import_path deploy.app:app_builder)."""
    config = resolve_model(load_config(args))
    owned = False
    if config.experts.shards > 0:
        owned = ensure_expert_pool(config.model, config)
    return build_app(config, config.model, pool_owned_by_app=owned)
