"""How an engine's failed request reaches clients through the Frontend (no Ray): a degraded
expert pool ("unavailable") is a 503 / UNAVAILABLE with its reason; other engine failures
stay a plain 500 "internal error"."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from deploy.frontend import Frontend
from deploy.grpc_api import GRPC_CODES
from deploy.openai_api import error_body
from router.faults import ExpertsUnavailableError
from workers.make_checkpoint import make_checkpoint
from workers.requests import RequestError, RequestOutput
from workers.sampler import SamplingParams


class _Response:
    def __init__(self, items) -> None:
        self.items = items

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for item in self.items:
            yield item

    def cancel(self) -> None:
        pass


class _Dense:
    """A dense handle whose replica answers one failed output."""

    def __init__(self, output: RequestOutput) -> None:
        self.output = output
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, *_):
        return _Response([self.output])


def _failed(error: str, kind: str) -> RequestOutput:
    return RequestOutput("r", [], [], "", True, "error", error=error, error_kind=kind)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("m"), preset="tiny")


async def _run(frontend: Frontend) -> RequestError:
    with pytest.raises(RequestError) as info:
        async for _ in frontend.stream([1, 2, 3], SamplingParams(max_tokens=4), "req-1"):
            pass
    return info.value


def test_degraded_expert_pool_is_503_unavailable_with_its_reason(model_dir) -> None:
    reason = str(ExpertsUnavailableError(3, [17], 30.0))
    frontend = Frontend(_Dense(_failed(reason, "unavailable")), model_dir, "m")
    err = asyncio.run(_run(frontend))
    assert err.kind == "unavailable" and err.http_status == 503
    assert GRPC_CODES[err.kind] == grpc.StatusCode.UNAVAILABLE
    assert "expert pool degraded: no live shard holds (layer 3, expert 17)" in err.message
    assert "req-1" in err.message and "retry" in err.message
    assert error_body(err)["error"]["type"] == "service_unavailable"


def test_other_engine_failures_stay_internal_500(model_dir) -> None:
    frontend = Frontend(_Dense(_failed("boom at /secret/path", "internal")), model_dir, "m")
    err = asyncio.run(_run(frontend))
    assert err.kind == "internal" and err.http_status == 500
    assert "secret" not in err.message and "req-1" in err.message
