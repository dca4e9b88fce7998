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

from cluster.config import ClusterConfig
from deploy.bootstrap import ensure_expert_pool, load_config, resolve_model, served_model_name
from deploy.frontend import Frontend
from deploy.metrics import Metrics
from deploy.openai_api import ChatCompletionRequest, CompletionRequest, error_body, parse_request
from deploy.openai_format import SSE_DONE, ChatFormat, CompletionFormat, sse
from deploy.params import InvalidParam, ModelInfo, StreamError, prompt_ids, sampling_params
from deploy.prefix_router import router_config
from workers.requests import RequestError, RequestOutput, ResumeState
from workers.sampler import SamplingParams

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 10.0
api = FastAPI(title="expertmesh", docs_url=None, redoc_url=None)


@serve.deployment(name="DenseReplica")
class DenseReplica:
    """One dense model + continuous-batching engine; streams RequestOutput deltas."""

    def __init__(self, model_dir: str, config: ClusterConfig, model_name: str) -> None:
        from cluster.launcher import connect_expert_backend
        from workers.async_engine import AsyncEngine
        from workers.dense_worker import DenseWorker
        from workers.resources import pin_torch_threads

        pin_torch_threads(reserve=1)  # one core for the replica's event loop
        experts = connect_expert_backend(config)  # None: experts local (experts.shards == 0)
        self.worker = DenseWorker(
            model_dir,
            config.dtype,
            config.dense.engine_config(),
            experts,
            micro_batches=config.dense.micro_batches,
            expert_dtype=config.experts.dtype,
            cache_config=config.dense.cache_config(),
        )
        self.engine = AsyncEngine(self.worker.engine)
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
    name="GrpcIngress", num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1}
)
class GrpcIngress:
    """grpc.aio server (Generation + health + reflection) in front of the dense replicas."""

    async def __init__(
        self, dense: Any, model_dir: str, model_name: str, host: str, port: int
    ) -> None:
        from deploy.grpc_api import start_server

        self.frontend = Frontend(dense, model_dir, model_name)
        self.server, self.port = await start_server(self.frontend, host, port)
        self.address = f"{host}:{self.port}"

    def get_address(self) -> str:
        return self.address

    async def __del__(self) -> None:
        await self.server.stop(grace=1.0)


# Registered before @serve.ingress, which freezes (pickles) the FastAPI app.
@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    err = RequestError("not_found" if exc.status_code == 404 else "invalid", str(exc.detail))
    body = error_body(err)
    body["error"]["code"] = None
    return JSONResponse(body, status_code=exc.status_code)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    body = error_body(RequestError("internal", f"internal error: {type(exc).__name__}"))
    return JSONResponse(body, status_code=500)


@serve.deployment(
    name="OpenAIIngress",
    num_replicas=1,
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 0.1},
)
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, dense: Any, grpc_ingress: Any, model_dir: str, model_name: str) -> None:
        self.frontend = Frontend(dense, model_dir, model_name)
        self.grpc = grpc_ingress
        self.metrics = Metrics()
        self.model_dir = model_dir
        self.created = int(time.time())

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve("completions", await request.body(), chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat_completions", await request.body(), chat=True)

    @api.get("/v1/models")
    async def models(self) -> Response:
        try:
            info = await self.frontend.info()
        except Exception as exc:
            return self._error("models", RequestError("unavailable", f"model not ready: {exc}"))
        card = {
            "id": info.name,
            "object": "model",
            "created": self.created,
            "owned_by": "expertmesh",
            "root": self.model_dir,
            "max_model_len": info.max_model_len,
        }
        self.metrics.request_done("models", 200)
        return JSONResponse({"object": "list", "data": [card]})

    @api.get("/health")
    async def health(self) -> Response:
        async def probe() -> dict[str, Any]:
            return {
                "stats": await self.frontend.dense.stats.remote(),
                "grpc": await self.grpc.get_address.remote(),
            }

        try:
            result = await asyncio.wait_for(probe(), HEALTH_TIMEOUT_S)
        except Exception as exc:
            return self._error("health", RequestError("unavailable", f"not healthy: {exc!r}"))
        return JSONResponse({"status": "ok", "grpc": result["grpc"]})

    @api.get("/metrics")
    async def metrics(self) -> Response:
        stats = await self.frontend.replica_stats(self.metrics.known_replicas + 1)
        self.metrics.update_engine(stats)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ generation
    async def _serve(self, endpoint: str, raw: bytes, chat: bool) -> Response:
        start = time.perf_counter()
        stream = None
        try:
            req = parse_request(raw, ChatCompletionRequest if chat else CompletionRequest)
            self.frontend.check_model(req.model)
            ids, params = await self._inputs(req)
            fmt_cls, prefix = (ChatFormat, "chatcmpl") if chat else (CompletionFormat, "cmpl")
            fmt = fmt_cls(
                self.frontend.new_id(prefix), self.frontend.model_name, self.frontend.tokenizer, req
            )
            stream = self.frontend.stream(ids, params, fmt.rid)
            first = await anext(stream)
        except RequestError as exc:
            if stream is not None:
                await stream.aclose()
            return self._error(endpoint, exc)
        self.metrics.first_token(endpoint, start)
        done = self._done_callback(endpoint, start)
        if req.stream:
            events = self._events(stream, first, fmt, req.include_usage, done)
            return StreamingResponse(events, media_type="text/event-stream")
        return await self._collect(endpoint, stream, first, fmt, done)

    async def _inputs(self, req: Any) -> tuple[list[int], SamplingParams]:
        info = await self.frontend.info()
        ids = prompt_ids(self.frontend.tokenizer, **req.prompt_kwargs())
        name, limit = req.output_limit()
        if limit is not None and limit <= 0:
            raise InvalidParam(name, f"{name} must be > 0, got {limit}")
        params = sampling_params(
            prompt_len=len(ids),
            max_model_len=info.max_model_len,
            max_tokens=limit,
            default_max_tokens=req.default_max_tokens,
            logprobs=req.wants_logprobs,
            **req.sampling_fields(),
        )
        return ids, params

    async def _collect(self, endpoint, stream, first, fmt, done) -> Response:
        merged = first
        try:
            async for out in stream:
                merged = merged.merge(out)
        except RequestError as exc:
            return self._error(endpoint, exc)
        finally:
            await stream.aclose()
        done(200, merged)
        return JSONResponse(fmt.response(merged))

    async def _events(self, stream, first, fmt, include_usage, done) -> AsyncIterator[bytes]:
        last, status = first, 499  # 499: the client went away mid-stream
        try:
            for chunk in fmt.chunks(first, first=True):
                yield sse(chunk)
            async for out in stream:
                last = out
                for chunk in fmt.chunks(out, first=False):
                    yield sse(chunk)
            if include_usage:
                yield sse(fmt.usage_chunk(last))
            status = 200
        except RequestError as exc:
            status = exc.http_status
            yield sse(error_body(exc))
        finally:
            await stream.aclose()
            done(status, last)
        yield SSE_DONE

    def _done_callback(self, endpoint: str, start: float) -> Callable[[int, RequestOutput], None]:
        def done(status: int, out: RequestOutput) -> None:
            self.metrics.request_done(endpoint, status)
            self.metrics.finished(endpoint, start, out.prompt_tokens, out.completion_tokens)

        return done

    def _error(self, endpoint: str, exc: RequestError) -> JSONResponse:
        self.metrics.request_done(endpoint, exc.http_status)
        return JSONResponse(error_body(exc), status_code=exc.http_status)


# ----------------------------------------------------------------------------- building
def build_app(config: ClusterConfig, model_dir: str) -> Application:
    """The application graph for a resolved config (the expert pool must already run)."""
    d, s = config.dense, config.server
    name = served_model_name(config, model_dir)
    actor = {"num_cpus": d.num_cpus} | ({"num_gpus": d.num_gpus} if d.num_gpus else {})
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
    ).bind(model_dir, config, name)
    grpc_ingress = GrpcIngress.bind(dense, model_dir, name, s.host, s.grpc_port)
    return OpenAIIngress.bind(dense, grpc_ingress, model_dir, name)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point of `serve run deploy/serve.yaml` (import_path deploy.app:app_builder)."""
    config = resolve_model(load_config(args))
    if config.experts.shards > 0:
        ensure_expert_pool(config.model, config)
    return build_app(config, config.model)
