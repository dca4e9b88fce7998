"""The one place where expert RPC messages become typed Python objects and back.

Tensors travel as `expertmesh.v1.Tensor`: a dtype name, a shape, and the raw little-endian
element bytes in one `bytes` field (no repeated float). Encoding is one copy
(`tensor.numpy().tobytes()`); decoding is zero copy over the received bytes
(`torch.frombuffer`), so decoded tensors are READ-ONLY views: never write into them
(`.clone()` first if you must).

Every decode validates: unknown dtype, byte size vs shape, ids rows vs hidden rows, weights
shape vs ids shape, dtypes, and non-finite values all raise `WireError` with a message that
the shard sends back verbatim as INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from router.rpc import expert_pb2 as pb

# torch.frombuffer over immutable `bytes` warns "The given buffer is not writable" (once per
# process, TORCH_WARN_ONCE). Our decoded tensors are read-only by contract (module docstring),
# so we spend that one warning here, silenced, at import; the filter covers torch versions that
# would warn on every call.
_NOT_WRITABLE = "The given buffer is not writable"
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
    torch.frombuffer(b"\0\0\0\0", dtype=torch.uint8)
warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning, module=__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {v: torch.empty((), dtype=v).element_size() for v in DTYPES.values()}


class WireError(ValueError):
    """A message or tensor does not satisfy the wire contract; the message says why."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32"; raises WireError for dtypes the wire does not carry."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot be sent (known: {', '.join(DTYPES)})") from None


def parse_dtype(name: str, what: str = "tensor") -> torch.dtype:
    """Dtype name ("float32") -> torch dtype; WireError naming `what` if unknown."""
    try:
        return DTYPES[name]
    except KeyError:
        known = ", ".join(DTYPES)
        raise WireError(f"{what}: unknown dtype {name!r} (known: {known})") from None


def message_options(max_message_mb: float) -> list[tuple[str, int]]:
    """gRPC send/receive size limits; set explicitly on both server and client."""
    limit = int(max_message_mb * 1024 * 1024)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def encode_tensor(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """A CPU tensor -> Tensor message; fills `out` in place when given (a field of a larger
    message: no second copy of the bytes into the parent)."""
    t = t.detach().cpu().contiguous()
    out = pb.Tensor() if out is None else out
    out.dtype = dtype_name(t.dtype)
    out.shape[:] = list(t.shape)
    out.data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return out


def decode_tensor(msg: pb.Tensor, what: str = "tensor") -> torch.Tensor:
    """Tensor message -> read-only tensor viewing the message bytes (no copy)."""
    dtype = parse_dtype(msg.dtype, what)
    shape = tuple(msg.shape)
    if any(s < 0 for s in shape):
        raise WireError(f"{what}: negative dimension in shape {list(shape)}")
    data = msg.data
    expected = math.prod(shape) * _ITEMSIZE[dtype]
    if len(data) != expected:
        raise WireError(
            f"{what}: {len(data)} bytes do not match shape {list(shape)} of {msg.dtype} "
            f"({expected} bytes)"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).view(shape)


@dataclass(frozen=True)
class ExpertRequest:
    """One shard's share of a layer-step: each routed token once, with its experts.

    hidden [T, H] floating; expert_ids [T, K] integer GLOBAL expert ids of `layer` (-1 =
    padding); weights [T, K] float32 (0 where padded); `placement_version` and `shard_id` say
    which table and which shard the call was planned for. Validated on construction.
    """

    layer: int
    hidden: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    request_id: str = ""
    placement_version: int = 0
    shard_id: str = ""

    def __post_init__(self) -> None:
        _check_request(self)

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[0])


@dataclass(frozen=True)
class ExpertResponse:
    """output [T, H]: per token, the weighted sum over the experts this shard computed."""

    output: torch.Tensor
    request_id: str = ""
    shard_id: str = ""

    def __post_init__(self) -> None:
        _check_2d_float(self.output, "output")


@dataclass(frozen=True)
class ShardInfo:
    """What a shard holds: `experts[layer]` global ids (layers holding any, ascending)."""

    shard_id: str
    experts: dict[int, tuple[int, ...]]
    dtype: str
    hidden_size: int
    version: str
    ready: bool
    placement_version: int = 0


def _check_2d_float(t: torch.Tensor, what: str) -> None:
    if t.dim() != 2:
        raise WireError(f"{what} must be 2-D [T, H], got shape {list(t.shape)}")
    if not t.dtype.is_floating_point:
        raise WireError(f"{what} dtype {dtype_name(t.dtype)} is not floating point")


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.numel() == 0 or math.isfinite(float(t.sum())):
        return  # fast path: a finite sum has no NaN/inf term (an overflow checks each value)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise WireError(f"{what} contains non-finite values (NaN/inf), first at token {row}")


def _check_request(req: ExpertRequest) -> None:
    if req.layer < 0:
        raise WireError(f"layer must be >= 0, got {req.layer}")
    if req.placement_version < 0:
        raise WireError(f"placement_version must be >= 0, got {req.placement_version}")
    _check_2d_float(req.hidden, "hidden")
    ids, w = req.expert_ids, req.weights
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise WireError(
            f"expert_ids must be a 2-D integer tensor [T, K], got {list(ids.shape)} {ids.dtype}"
        )
    if ids.shape[0] != req.hidden.shape[0]:
        raise WireError(
            f"expert_ids has {ids.shape[0]} rows but hidden has {req.hidden.shape[0]} "
            "(one row of expert ids per token)"
        )
    if w.dtype != torch.float32:
        raise WireError(f"weights dtype {w.dtype} does not match the wire's float32")
    if tuple(w.shape) != tuple(ids.shape):
        raise WireError(f"weights shape {list(w.shape)} != expert_ids shape {list(ids.shape)}")
    if ids.numel() and int(ids.min()) < -1:
        raise WireError(f"expert_ids contains {int(ids.min())}; ids must be >= 0 or -1 (padding)")
    _check_finite(req.hidden, "hidden")
    _check_finite(req.weights, "weights")


def encode_request(req: ExpertRequest) -> pb.ComputeRequest:
    msg = pb.ComputeRequest(
        layer=req.layer,
        request_id=req.request_id,
        placement_version=req.placement_version,
        shard_id=req.shard_id,
    )
    encode_tensor(req.hidden, msg.hidden)
    encode_tensor(req.expert_ids, msg.expert_ids)
    encode_tensor(req.weights, msg.weights)
    return msg


def tensor_array(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A CPU tensor as a numpy array over its bytes (copied only if not contiguous) and its
    wire dtype name; dtypes numpy lacks (bfloat16) are viewed as ints of the same size."""
    name = dtype_name(t.dtype)
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy(), name


def _fill(out: pb.Tensor, dtype: str, array: np.ndarray) -> None:
    out.dtype = dtype
    out.shape[:] = array.shape
    out.data = array.tobytes()


def build_request(
    layer: int, hidden: np.ndarray, hidden_dtype: str, expert_ids: np.ndarray,
    weights: np.ndarray, request_id: str, placement_version: int, shard_id: str,
) -> pb.ComputeRequest:  # fmt: skip
    """A ComputeRequest from numpy arrays (`tensor_array` of the step's tensors, sliced):
    hidden [T, H] of `hidden_dtype`, expert_ids [T, K] int32, weights [T, K] float32. No
    ExpertRequest is built or validated: the router checks a step once (`check_step`) and
    slices it into one request per shard."""
    msg = pb.ComputeRequest(
        layer=layer, request_id=request_id, placement_version=placement_version,
        shard_id=shard_id,
    )  # fmt: skip
    _fill(msg.hidden, hidden_dtype, hidden)
    _fill(msg.expert_ids, "int32", expert_ids)
    _fill(msg.weights, "float32", weights)
    return msg


def check_step(hidden: torch.Tensor, weights: torch.Tensor) -> None:
    """What every request sliced from a layer step would be checked for: [T, H] floating
    hidden of a dtype the wire carries, finite hidden and weights (WireError otherwise)."""
    _check_2d_float(hidden, "hidden")
    dtype_name(hidden.dtype)
    _check_finite(hidden, "hidden")
    _check_finite(weights, "weights")


def decode_request(msg: pb.ComputeRequest) -> ExpertRequest:
    """ComputeRequest -> validated ExpertRequest (tensors view the message bytes)."""
    return ExpertRequest(
        layer=int(msg.layer),
        hidden=decode_tensor(msg.hidden, "hidden"),
        expert_ids=decode_tensor(msg.expert_ids, "expert_ids"),
        weights=decode_tensor(msg.weights, "weights"),
        request_id=msg.request_id,
        placement_version=int(msg.placement_version),
        shard_id=msg.shard_id,
    )


def encode_response(resp: ExpertResponse) -> pb.ComputeResponse:
    msg = pb.ComputeResponse(request_id=resp.request_id, shard_id=resp.shard_id)
    encode_tensor(resp.output, msg.output)
    return msg


def decode_response(
    msg: pb.ComputeResponse,
    expect_shape: tuple[int, int] | None = None,
    expect_dtype: torch.dtype | None = None,
) -> ExpertResponse:
    """ComputeResponse -> ExpertResponse. Checks the [T, H] shape and dtype when given, and
    that every value is finite: a reply failing any check must never be merged."""
    resp = ExpertResponse(decode_tensor(msg.output, "output"), msg.request_id, msg.shard_id)
    if expect_shape is not None and tuple(resp.output.shape) != tuple(expect_shape):
        raise WireError(f"output shape {list(resp.output.shape)} != expected {list(expect_shape)}")
    if expect_dtype is not None and resp.output.dtype != expect_dtype:
        raise WireError(
            f"output dtype {dtype_name(resp.output.dtype)} != expected {dtype_name(expect_dtype)}"
        )
    _check_finite(resp.output, "output")
    return resp


def encode_info(info: ShardInfo) -> pb.InfoResponse:
    return pb.InfoResponse(
        shard_id=info.shard_id,
        experts=[
            pb.LayerExperts(layer=layer, expert_ids=list(ids))
            for layer, ids in sorted(info.experts.items())
        ],
        dtype=info.dtype,
        hidden_size=info.hidden_size,
        version=info.version,
        ready=info.ready,
        placement_version=info.placement_version,
    )


def decode_info(msg: pb.InfoResponse) -> ShardInfo:
    return ShardInfo(
        shard_id=msg.shard_id,
        experts={int(x.layer): tuple(int(e) for e in x.expert_ids) for x in msg.experts},
        dtype=msg.dtype,
        hidden_size=int(msg.hidden_size),
        version=msg.version,
        ready=bool(msg.ready),
        placement_version=int(msg.placement_version),
    )
