from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskSpec(_message.Message):
    __slots__ = ("family", "params_json", "seed", "index", "style")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    family: str
    params_json: str
    seed: int
    index: int
    style: str
    def __init__(self, family: _Optional[str] = ..., params_json: _Optional[str] = ..., seed: _Optional[int] = ..., index: _Optional[int] = ..., style: _Optional[str] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("text", "num_tokens", "reward", "logprob_sum", "has_logprob")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_SUM_FIELD_NUMBER: _ClassVar[int]
    HAS_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    text: str
    num_tokens: int
    reward: float
    logprob_sum: float
    has_logprob: bool
    def __init__(self, text: _Optional[str] = ..., num_tokens: _Optional[int] = ..., reward: _Optional[float] = ..., logprob_sum: _Optional[float] = ..., has_logprob: _Optional[bool] = ...) -> None: ...

class RolloutGroup(_message.Message):
    __slots__ = ("task", "completions", "policy_id", "round", "created_at_ms", "origin")
    TASK_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    task: TaskSpec
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    policy_id: str
    round: int
    created_at_ms: int
    origin: str
    def __init__(self, task: _Optional[_Union[TaskSpec, _Mapping]] = ..., completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., policy_id: _Optional[str] = ..., round: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., origin: _Optional[str] = ...) -> None: ...
