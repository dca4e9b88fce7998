from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("layer", "hidden", "weights", "request_id", "expert_ids", "placement_version", "shard_id")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    weights: Tensor
    request_id: str
    expert_ids: Tensor
    placement_version: int
    shard_id: str
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., expert_ids: _Optional[_Union[Tensor, _Mapping]] = ..., placement_version: _Optional[int] = ..., shard_id: _Optional[str] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("output", "request_id", "shard_id")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    request_id: str
    shard_id: str
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., shard_id: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "expert_ids")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("dtype", "hidden_size", "version", "ready", "shard_id", "experts", "placement_version")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    hidden_size: int
    version: str
    ready: bool
    shard_id: str
    experts: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    placement_version: int
    def __init__(self, dtype: _Optional[str] = ..., hidden_size: _Optional[int] = ..., version: _Optional[str] = ..., ready: _Optional[bool] = ..., shard_id: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., placement_version: _Optional[int] = ...) -> None: ...
