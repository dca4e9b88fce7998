"""router.wire: tensor encoding, request/response validation, info round trip."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from router import wire
from router.rpc import expert_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def _request(T: int = 5, H: int = 8, K: int = 3) -> wire.ExpertRequest:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (T, K), generator=g, dtype=torch.int32)
    ids[0, -1] = -1
    return wire.ExpertRequest(
        2, torch.randn(T, H, generator=g), ids, torch.rand(T, K), "r1", 7, "shard-3"
    )


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()))
def test_tensor_round_trip_every_dtype(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 5) * 50).to(dtype)
    msg = wire.encode_tensor(t)
    assert msg.dtype == wire.dtype_name(dtype) and list(msg.shape) == [3, 5]
    assert len(msg.data) == t.numel() * t.element_size()
    back = wire.decode_tensor(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)


def test_tensor_empty_and_non_contiguous() -> None:
    empty = wire.decode_tensor(wire.encode_tensor(torch.empty(0, 7)))
    assert empty.shape == (0, 7)
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(wire.decode_tensor(wire.encode_tensor(t)), t)


def test_request_and_response_round_trip() -> None:
    req = _request()
    back = wire.decode_request(
        pb.ComputeRequest.FromString(wire.encode_request(req).SerializeToString())
    )
    assert back.layer == 2 and back.request_id == "r1" and back.num_tokens == 5
    assert (back.placement_version, back.shard_id) == (7, "shard-3")
    for name in ("hidden", "expert_ids", "weights"):
        assert torch.equal(getattr(back, name), getattr(req, name))
    out = torch.randn(5, 8, dtype=torch.bfloat16)
    msg = wire.encode_response(wire.ExpertResponse(out, "r1", "shard-3"))
    resp = wire.decode_response(msg, (5, 8), torch.bfloat16)
    assert torch.equal(resp.output, out) and (resp.request_id, resp.shard_id) == ("r1", "shard-3")


@pytest.mark.parametrize(
    ("output", "shape", "dtype", "pattern"),
    [
        (torch.ones(5, 8), (4, 8), None, r"output shape \[5, 8\] != expected \[4, 8\]"),
        (torch.ones(5, 8), (5, 8), torch.bfloat16, r"output dtype float32 != expected bfloat16"),
        (torch.ones(5, 8, dtype=torch.int32), None, None, r"output dtype int32 is not floating"),
        (torch.ones(40), None, None, r"output must be 2-D"),
        (torch.ones(5, 8).index_fill_(0, torch.tensor([3]), float("nan")), None, None,
         r"output contains non-finite values \(NaN/inf\), first at token 3"),
        (torch.full((5, 8), float("-inf")), None, None, r"output contains non-finite"),
    ],
)  # fmt: skip
def test_bad_responses_are_rejected(output, shape, dtype, pattern) -> None:
    """A shard's answer that is wrong-shaped, wrongly typed or non-finite is never merged."""
    msg = pb.ComputeResponse(output=wire.encode_tensor(output), request_id="r")
    with pytest.raises(wire.WireError, match=pattern):
        wire.decode_response(msg, shape, dtype)


def test_info_round_trip() -> None:
    info = wire.ShardInfo("shard-2", {0: (3, 4, 9), 5: (1,)}, "bfloat16", 2048, "v1", True, 12)
    assert wire.decode_info(wire.encode_info(info)) == info


def test_decode_rejects_unknown_dtype_and_size_mismatch() -> None:
    msg = wire.encode_tensor(torch.ones(2, 3))
    msg.dtype = "float8"
    with pytest.raises(wire.WireError, match=r"hidden: unknown dtype 'float8'"):
        wire.decode_tensor(msg, "hidden")
    msg = wire.encode_tensor(torch.ones(2, 3))
    msg.data = msg.data[:-4]
    with pytest.raises(
        wire.WireError, match=r"20 bytes do not match shape \[2, 3\] of float32 \(24"
    ):
        wire.decode_tensor(msg)
    msg.shape[:] = [-2, -3]
    with pytest.raises(wire.WireError, match="negative dimension"):
        wire.decode_tensor(msg)
    with pytest.raises(wire.WireError, match="cannot be sent"):
        wire.encode_tensor(torch.ones(2, dtype=torch.complex64))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"hidden": torch.ones(5)}, r"hidden must be 2-D"),
        ({"hidden": torch.ones(5, 8, dtype=torch.int64)}, r"hidden dtype int64 is not floating"),
        (
            {"expert_ids": torch.zeros(4, 3, dtype=torch.int32)},
            r"expert_ids has 4 rows but hidden has 5",
        ),
        ({"expert_ids": torch.zeros(5, 3)}, r"expert_ids must be a 2-D integer"),
        ({"weights": torch.ones(5, 2)}, r"weights shape \[5, 2\] != expert_ids shape \[5, 3\]"),
        ({"weights": torch.ones(5, 3, dtype=torch.float16)}, r"weights dtype torch.float16"),
        ({"expert_ids": torch.full((5, 3), -2)}, r"expert_ids contains -2"),
        ({"layer": -1}, r"layer must be >= 0"),
        ({"placement_version": -1}, r"placement_version must be >= 0"),
    ],
)
def test_request_validation(change: dict, pattern: str) -> None:
    req = _request()
    fields = {k: getattr(req, k) for k in ("layer", "hidden", "expert_ids", "weights")}
    with pytest.raises(wire.WireError, match=pattern):
        wire.ExpertRequest(**{**fields, **change})


def test_non_finite_values_are_rejected_on_decode() -> None:
    req = _request()
    for name, bad in (("hidden", float("nan")), ("weights", float("inf"))):
        msg = wire.encode_request(req)
        t = getattr(req, name).clone()
        t[3, 1] = bad
        getattr(msg, name).CopyFrom(wire.encode_tensor(t))
        with pytest.raises(wire.WireError, match=rf"{name} contains non-finite .* token 3"):
            wire.decode_request(msg)


def test_decode_is_warning_free_even_with_warnings_as_errors() -> None:
    code = (
        "import torch; from router import wire; "
        "m = wire.encode_tensor(torch.ones(4, 4)); t = wire.decode_tensor(m); "
        "assert t.sum() == 16"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, check=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wire.decode_tensor(wire.encode_tensor(torch.ones(2, 2)))
    assert not caught
