from rollshare.proto import rollout_pb2 as _rollout_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnvelopeHeader(_message.Message):
    __slots__ = ("origin", "policy_id", "round", "created_at_ms", "group_ids", "seq")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    origin: str
    policy_id: str
    round: int
    created_at_ms: int
    group_ids: _containers.RepeatedScalarFieldContainer[bytes]
    seq: int
    def __init__(self, origin: _Optional[str] = ..., policy_id: _Optional[str] = ..., round: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., group_ids: _Optional[_Iterable[bytes]] = ..., seq: _Optional[int] = ...) -> None: ...

class SignedEnvelope(_message.Message):
    __slots__ = ("header", "signature", "public_key", "groups")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    signature: bytes
    public_key: bytes
    groups: _containers.RepeatedCompositeFieldContainer[_rollout_pb2.RolloutGroup]
    def __init__(self, header: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., public_key: _Optional[bytes] = ..., groups: _Optional[_Iterable[_Union[_rollout_pb2.RolloutGroup, _Mapping]]] = ...) -> None: ...

class Announcement(_message.Message):
    __slots__ = ("origin", "envelope_id", "group_ids", "sizes", "grpc_endpoint", "round", "created_at_ms")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    GRPC_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    origin: str
    envelope_id: bytes
    group_ids: _containers.RepeatedScalarFieldContainer[bytes]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    grpc_endpoint: str
    round: int
    created_at_ms: int
    def __init__(self, origin: _Optional[str] = ..., envelope_id: _Optional[bytes] = ..., group_ids: _Optional[_Iterable[bytes]] = ..., sizes: _Optional[_Iterable[int]] = ..., grpc_endpoint: _Optional[str] = ..., round: _Optional[int] = ..., created_at_ms: _Optional[int] = ...) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("peer_id", "multiaddrs", "grpc_endpoint", "model", "hardware", "round", "version")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MULTIADDRS_FIELD_NUMBER: _ClassVar[int]
    GRPC_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    multiaddrs: _containers.RepeatedScalarFieldContainer[str]
    grpc_endpoint: str
    model: str
    hardware: str
    round: int
    version: str
    def __init__(self, peer_id: _Optional[str] = ..., multiaddrs: _Optional[_Iterable[str]] = ..., grpc_endpoint: _Optional[str] = ..., model: _Optional[str] = ..., hardware: _Optional[str] = ..., round: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("group_ids",)
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    group_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, group_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class BucketDigest(_message.Message):
    __slots__ = ("start_ms", "count", "xor")
    START_MS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    XOR_FIELD_NUMBER: _ClassVar[int]
    start_ms: int
    count: int
    xor: int
    def __init__(self, start_ms: _Optional[int] = ..., count: _Optional[int] = ..., xor: _Optional[int] = ...) -> None: ...

class ReconcileRequest(_message.Message):
    __slots__ = ("since_ms", "bucket_ms", "buckets", "have_ids", "detail_starts")
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_MS_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    HAVE_IDS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_STARTS_FIELD_NUMBER: _ClassVar[int]
    since_ms: int
    bucket_ms: int
    buckets: _containers.RepeatedCompositeFieldContainer[BucketDigest]
    have_ids: _containers.RepeatedScalarFieldContainer[bytes]
    detail_starts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, since_ms: _Optional[int] = ..., bucket_ms: _Optional[int] = ..., buckets: _Optional[_Iterable[_Union[BucketDigest, _Mapping]]] = ..., have_ids: _Optional[_Iterable[bytes]] = ..., detail_starts: _Optional[_Iterable[int]] = ...) -> None: ...

class ReconcileResponse(_message.Message):
    __slots__ = ("differing_starts", "missing_ids")
    DIFFERING_STARTS_FIELD_NUMBER: _ClassVar[int]
    MISSING_IDS_FIELD_NUMBER: _ClassVar[int]
    differing_starts: _containers.RepeatedScalarFieldContainer[int]
    missing_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, differing_starts: _Optional[_Iterable[int]] = ..., missing_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("info", "peers", "groups_stored", "groups_out", "groups_in", "reward_ma", "tokens_per_s", "step_s", "method", "rejected")
    class RejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    INFO_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_STORED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_OUT_FIELD_NUMBER: _ClassVar[int]
    GROUPS_IN_FIELD_NUMBER: _ClassVar[int]
    REWARD_MA_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    STEP_S_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    info: PeerInfo
    peers: int
    groups_stored: int
    groups_out: int
    groups_in: int
    reward_ma: float
    tokens_per_s: float
    step_s: float
    method: str
    rejected: _containers.ScalarMap[str, int]
    def __init__(self, info: _Optional[_Union[PeerInfo, _Mapping]] = ..., peers: _Optional[int] = ..., groups_stored: _Optional[int] = ..., groups_out: _Optional[int] = ..., groups_in: _Optional[int] = ..., reward_ma: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., step_s: _Optional[float] = ..., method: _Optional[str] = ..., rejected: _Optional[_Mapping[str, int]] = ...) -> None: ...
