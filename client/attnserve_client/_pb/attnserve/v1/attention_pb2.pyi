from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FP32: _ClassVar[DataType]
    FP16: _ClassVar[DataType]
    INT32: _ClassVar[DataType]
DATA_TYPE_UNSPECIFIED: DataType
FP32: DataType
FP16: DataType
INT32: DataType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class WeightsRequest(_message.Message):
    __slots__ = ("positions", "average_heads", "top_k")
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_HEADS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    average_heads: bool
    top_k: int
    def __init__(self, positions: _Optional[_Iterable[int]] = ..., average_heads: _Optional[bool] = ..., top_k: _Optional[int] = ...) -> None: ...

class AttendRequest(_message.Message):
    __slots__ = ("id", "hidden_states", "lengths", "weights")
    ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    hidden_states: Tensor
    lengths: _containers.RepeatedScalarFieldContainer[int]
    weights: WeightsRequest
    def __init__(self, id: _Optional[str] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., lengths: _Optional[_Iterable[int]] = ..., weights: _Optional[_Union[WeightsRequest, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_us", "compute_us", "total_us")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    compute_us: int
    total_us: int
    def __init__(self, queue_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., total_us: _Optional[int] = ...) -> None: ...

class AttentionWeights(_message.Message):
    __slots__ = ("positions", "averaged", "values", "indices")
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    AVERAGED_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    averaged: bool
    values: Tensor
    indices: Tensor
    def __init__(self, positions: _Optional[_Iterable[int]] = ..., averaged: _Optional[bool] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AttendResponse(_message.Message):
    __slots__ = ("id", "output", "weights", "timing", "graph")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    id: str
    output: Tensor
    weights: AttentionWeights
    timing: Timing
    graph: str
    def __init__(self, id: _Optional[str] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[AttentionWeights, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., graph: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class AttendStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: AttendResponse
    error: Error
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[AttendResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Route(_message.Message):
    __slots__ = ("masked", "up_to", "graph", "form")
    MASKED_FIELD_NUMBER: _ClassVar[int]
    UP_TO_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    masked: bool
    up_to: int
    graph: str
    form: str
    def __init__(self, masked: _Optional[bool] = ..., up_to: _Optional[int] = ..., graph: _Optional[str] = ..., form: _Optional[str] = ...) -> None: ...

class WeightsSource(_message.Message):
    __slots__ = ("kind", "sha256", "detail")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    sha256: str
    detail: str
    def __init__(self, kind: _Optional[str] = ..., sha256: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "d_model", "num_heads", "head_dim", "causal", "input_dtypes", "max_seq_len", "max_batch_size", "max_weights_seq_len", "max_message_bytes", "provider", "routes", "weights", "server_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    CAUSAL_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHTS_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    d_model: int
    num_heads: int
    head_dim: int
    causal: bool
    input_dtypes: _containers.RepeatedScalarFieldContainer[DataType]
    max_seq_len: int
    max_batch_size: int
    max_weights_seq_len: int
    max_message_bytes: int
    provider: str
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    weights: WeightsSource
    server_version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., d_model: _Optional[int] = ..., num_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., causal: _Optional[bool] = ..., input_dtypes: _Optional[_Iterable[_Union[DataType, str]]] = ..., max_seq_len: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_weights_seq_len: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., provider: _Optional[str] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., weights: _Optional[_Union[WeightsSource, _Mapping]] = ..., server_version: _Optional[str] = ...) -> None: ...
