from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PerfRecord(_message.Message):
    __slots__ = ("schema", "method", "status", "features_json", "tokens_per_s", "latency_s", "peak_mem_mb", "measured_at_ms", "lossless")
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEM_MB_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    schema: int
    method: str
    status: str
    features_json: str
    tokens_per_s: float
    latency_s: float
    peak_mem_mb: float
    measured_at_ms: int
    lossless: bool
    def __init__(self, schema: _Optional[int] = ..., method: _Optional[str] = ..., status: _Optional[str] = ..., features_json: _Optional[str] = ..., tokens_per_s: _Optional[float] = ..., latency_s: _Optional[float] = ..., peak_mem_mb: _Optional[float] = ..., measured_at_ms: _Optional[int] = ..., lossless: _Optional[bool] = ...) -> None: ...

class PerfBatch(_message.Message):
    __slots__ = ("origin", "created_at_ms", "seq", "records")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    origin: str
    created_at_ms: int
    seq: int
    records: _containers.RepeatedCompositeFieldContainer[PerfRecord]
    def __init__(self, origin: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., seq: _Optional[int] = ..., records: _Optional[_Iterable[_Union[PerfRecord, _Mapping]]] = ...) -> None: ...

class SignedPerfBatch(_message.Message):
    __slots__ = ("batch", "signature", "public_key")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    batch: bytes
    signature: bytes
    public_key: bytes
    def __init__(self, batch: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., public_key: _Optional[bytes] = ...) -> None: ...
