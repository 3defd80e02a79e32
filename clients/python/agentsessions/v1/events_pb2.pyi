import datetime

from agentsessions.v1 import message_pb2 as _message_pb2
from agentsessions.v1 import session_pb2 as _session_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CLIENT_TOOL_CALLS: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CLIENT_TOOL_CALLS: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ERROR: FinishReason

class TurnStarted(_message.Message):
    __slots__ = ("user_message", "continued_turn_id", "trigger_name")
    USER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTINUED_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_NAME_FIELD_NUMBER: _ClassVar[int]
    user_message: _message_pb2.Message
    continued_turn_id: str
    trigger_name: str
    def __init__(self, user_message: _Optional[_Union[_message_pb2.Message, _Mapping]] = ..., continued_turn_id: _Optional[str] = ..., trigger_name: _Optional[str] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("message_id", "text")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    text: str
    def __init__(self, message_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class ReasoningDelta(_message.Message):
    __slots__ = ("message_id", "text")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    text: str
    def __init__(self, message_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class ToolCallEvent(_message.Message):
    __slots__ = ("call", "result")
    CALL_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    call: _message_pb2.ToolCallPart
    result: _message_pb2.ToolResultPart
    def __init__(self, call: _Optional[_Union[_message_pb2.ToolCallPart, _Mapping]] = ..., result: _Optional[_Union[_message_pb2.ToolResultPart, _Mapping]] = ...) -> None: ...

class ClientToolRequest(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[_message_pb2.ToolCallPart]
    def __init__(self, calls: _Optional[_Iterable[_Union[_message_pb2.ToolCallPart, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "reasoning_tokens", "total_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class MessageCompleted(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _message_pb2.Message
    def __init__(self, message: _Optional[_Union[_message_pb2.Message, _Mapping]] = ...) -> None: ...

class TurnFinished(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: FinishReason
    def __init__(self, reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class TurnError(_message.Message):
    __slots__ = ("reason", "message", "retryable")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    retryable: bool
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class TurnEvent(_message.Message):
    __slots__ = ("session_id", "turn_id", "index", "time", "turn_started", "text_delta", "reasoning_delta", "tool_call", "client_tool_request", "usage", "message_completed", "turn_finished", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TURN_STARTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    REASONING_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOOL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TURN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turn_id: str
    index: int
    time: _timestamp_pb2.Timestamp
    turn_started: TurnStarted
    text_delta: TextDelta
    reasoning_delta: ReasoningDelta
    tool_call: ToolCallEvent
    client_tool_request: ClientToolRequest
    usage: Usage
    message_completed: MessageCompleted
    turn_finished: TurnFinished
    error: TurnError
    def __init__(self, session_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., index: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., turn_started: _Optional[_Union[TurnStarted, _Mapping]] = ..., text_delta: _Optional[_Union[TextDelta, _Mapping]] = ..., reasoning_delta: _Optional[_Union[ReasoningDelta, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCallEvent, _Mapping]] = ..., client_tool_request: _Optional[_Union[ClientToolRequest, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., message_completed: _Optional[_Union[MessageCompleted, _Mapping]] = ..., turn_finished: _Optional[_Union[TurnFinished, _Mapping]] = ..., error: _Optional[_Union[TurnError, _Mapping]] = ...) -> None: ...

class MessagesAppended(_message.Message):
    __slots__ = ("messages", "first_sequence", "last_sequence")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_message_pb2.Message]
    first_sequence: int
    last_sequence: int
    def __init__(self, messages: _Optional[_Iterable[_Union[_message_pb2.Message, _Mapping]]] = ..., first_sequence: _Optional[int] = ..., last_sequence: _Optional[int] = ...) -> None: ...

class MessagesDeleted(_message.Message):
    __slots__ = ("message_ids", "after_sequence")
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    message_ids: _containers.RepeatedScalarFieldContainer[str]
    after_sequence: int
    def __init__(self, message_ids: _Optional[_Iterable[str]] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class ExpiringSoon(_message.Message):
    __slots__ = ("expire_time",)
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SessionExpired(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionRenewed(_message.Message):
    __slots__ = ("expire_time", "manual")
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    MANUAL_FIELD_NUMBER: _ClassVar[int]
    expire_time: _timestamp_pb2.Timestamp
    manual: bool
    def __init__(self, expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., manual: _Optional[bool] = ...) -> None: ...

class TimeoutChanged(_message.Message):
    __slots__ = ("effective_timeout_policy",)
    EFFECTIVE_TIMEOUT_POLICY_FIELD_NUMBER: _ClassVar[int]
    effective_timeout_policy: _session_pb2.EffectiveTimeoutPolicy
    def __init__(self, effective_timeout_policy: _Optional[_Union[_session_pb2.EffectiveTimeoutPolicy, _Mapping]] = ...) -> None: ...

class SessionUpdated(_message.Message):
    __slots__ = ("paths",)
    PATHS_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, paths: _Optional[_Iterable[str]] = ...) -> None: ...

class SessionEnded(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionCleared(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionRestored(_message.Message):
    __slots__ = ("message_count",)
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    message_count: int
    def __init__(self, message_count: _Optional[int] = ...) -> None: ...

class SessionDeleted(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("session_id", "event_id", "time", "session", "messages_appended", "messages_deleted", "turn", "expiring_soon", "expired", "renewed", "timeout_changed", "updated", "ended", "cleared", "restored", "deleted")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_APPENDED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_DELETED_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    EXPIRING_SOON_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    RENEWED_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_CHANGED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    event_id: int
    time: _timestamp_pb2.Timestamp
    session: _session_pb2.Session
    messages_appended: MessagesAppended
    messages_deleted: MessagesDeleted
    turn: TurnEvent
    expiring_soon: ExpiringSoon
    expired: SessionExpired
    renewed: SessionRenewed
    timeout_changed: TimeoutChanged
    updated: SessionUpdated
    ended: SessionEnded
    cleared: SessionCleared
    restored: SessionRestored
    deleted: SessionDeleted
    def __init__(self, session_id: _Optional[str] = ..., event_id: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., session: _Optional[_Union[_session_pb2.Session, _Mapping]] = ..., messages_appended: _Optional[_Union[MessagesAppended, _Mapping]] = ..., messages_deleted: _Optional[_Union[MessagesDeleted, _Mapping]] = ..., turn: _Optional[_Union[TurnEvent, _Mapping]] = ..., expiring_soon: _Optional[_Union[ExpiringSoon, _Mapping]] = ..., expired: _Optional[_Union[SessionExpired, _Mapping]] = ..., renewed: _Optional[_Union[SessionRenewed, _Mapping]] = ..., timeout_changed: _Optional[_Union[TimeoutChanged, _Mapping]] = ..., updated: _Optional[_Union[SessionUpdated, _Mapping]] = ..., ended: _Optional[_Union[SessionEnded, _Mapping]] = ..., cleared: _Optional[_Union[SessionCleared, _Mapping]] = ..., restored: _Optional[_Union[SessionRestored, _Mapping]] = ..., deleted: _Optional[_Union[SessionDeleted, _Mapping]] = ...) -> None: ...
