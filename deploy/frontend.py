"""What the HTTP and gRPC front ends share: the served model's identity and tokenizer (one per
process), and streaming a request through the DenseReplica deployment handle with errors
turned back into RequestError and cancellation propagated (so the engine frees the slot)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from deploy.params import InvalidParam, ModelInfo, StreamError
from workers.dense_worker import load_tokenizer
from workers.requests import RequestError, RequestOutput
from workers.sampler import SamplingParams

log = logging.getLogger(__name__)
_UNAVAILABLE = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)


class Frontend:
    def __init__(self, dense: serve.handle.DeploymentHandle, model_dir: str, model_name: str):
        self.dense = dense
        self.model_name = model_name
        self.tokenizer = load_tokenizer(model_dir)
        self._info: ModelInfo | None = None
        self._info_lock = asyncio.Lock()

    async def info(self) -> ModelInfo:
        """The replicas' model_info(), fetched once."""
        async with self._info_lock:
            if self._info is None:
                self._info = ModelInfo(**await self.dense.model_info.remote())
        return self._info

    def check_model(self, name: str) -> None:
        if name and name != self.model_name:
            raise InvalidParam(
                "model",
                f"The model `{name}` does not exist (serving `{self.model_name}`)",
                kind="not_found",
            )

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    async def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """RequestOutput deltas of one request; raises RequestError (before or mid-stream).
        Closing or cancelling this iterator cancels the replica call, which aborts the request."""
        call = self.dense.options(stream=True).generate
        response = call.remote(list(prompt_ids), params, request_id)
        try:
            async for item in response:
                if isinstance(item, StreamError):
                    raise item.to_exception()
                if item.error:
                    raise RequestError("internal", f"generation failed: {item.error}")
                yield item
                if item.finished:
                    return
        except RequestError:
            raise
        except BackPressureError as exc:
            raise RequestError("queue_full", f"server is overloaded: {exc}") from exc
        except _UNAVAILABLE as exc:
            raise RequestError("unavailable", f"model replica unavailable: {exc}") from exc
        except Exception as exc:
            log.exception("request %s failed", request_id)
            raise RequestError("internal", f"internal error: {type(exc).__name__}") from exc
        finally:
            response.cancel()

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> RequestOutput:
        """The whole result (deltas merged)."""
        merged: RequestOutput | None = None
        async for out in self.stream(prompt_ids, params, request_id):
            merged = out if merged is None else merged.merge(out)
        assert merged is not None and merged.finished
        return merged

    async def replica_stats(self, calls: int) -> list[dict[str, Any]]:
        """stats() of the replicas `calls` concurrent calls reach (deduplicated by replica)."""
        results = await asyncio.gather(
            *(self.dense.stats.remote() for _ in range(max(1, calls))), return_exceptions=True
        )
        by_replica = {r["replica"]: r for r in results if isinstance(r, dict)}
        return list(by_replica.values())
