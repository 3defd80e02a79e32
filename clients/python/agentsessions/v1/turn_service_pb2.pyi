from agentsessions.v1 import events_pb2 as _events_pb2
from agentsessions.v1 import message_pb2 as _message_pb2
from agentsessions.v1 import session_pb2 as _session_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MultitaskStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MULTITASK_STRATEGY_UNSPECIFIED: _ClassVar[MultitaskStrategy]
    MULTITASK_STRATEGY_REJECT: _ClassVar[MultitaskStrategy]
    MULTITASK_STRATEGY_INTERRUPT: _ClassVar[MultitaskStrategy]
    MULTITASK_STRATEGY_ROLLBACK: _ClassVar[MultitaskStrategy]
    MULTITASK_STRATEGY_ENQUEUE: _ClassVar[MultitaskStrategy]

class DisconnectBehavior(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISCONNECT_BEHAVIOR_UNSPECIFIED: _ClassVar[DisconnectBehavior]
    DISCONNECT_BEHAVIOR_CANCEL: _ClassVar[DisconnectBehavior]
    DISCONNECT_BEHAVIOR_CONTINUE: _ClassVar[DisconnectBehavior]
MULTITASK_STRATEGY_UNSPECIFIED: MultitaskStrategy
MULTITASK_STRATEGY_REJECT: MultitaskStrategy
MULTITASK_STRATEGY_INTERRUPT: MultitaskStrategy
MULTITASK_STRATEGY_ROLLBACK: MultitaskStrategy
MULTITASK_STRATEGY_ENQUEUE: MultitaskStrategy
DISCONNECT_BEHAVIOR_UNSPECIFIED: DisconnectBehavior
DISCONNECT_BEHAVIOR_CANCEL: DisconnectBehavior
DISCONNECT_BEHAVIOR_CONTINUE: DisconnectBehavior

class Trigger(_message.Message):
    __slots__ = ("name", "input")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    input: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ContinueTurn(_message.Message):
    __slots__ = ("turn_id", "tool_results")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULTS_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    tool_results: _containers.RepeatedCompositeFieldContainer[_message_pb2.ToolResultPart]
    def __init__(self, turn_id: _Optional[str] = ..., tool_results: _Optional[_Iterable[_Union[_message_pb2.ToolResultPart, _Mapping]]] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "message", "trigger", "continue_turn", "multitask_strategy", "on_disconnect")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_TURN_FIELD_NUMBER: _ClassVar[int]
    MULTITASK_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    message: _message_pb2.Message
    trigger: Trigger
    continue_turn: ContinueTurn
    multitask_strategy: MultitaskStrategy
    on_disconnect: DisconnectBehavior
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., message: _Optional[_Union[_message_pb2.Message, _Mapping]] = ..., trigger: _Optional[_Union[Trigger, _Mapping]] = ..., continue_turn: _Optional[_Union[ContinueTurn, _Mapping]] = ..., multitask_strategy: _Optional[_Union[MultitaskStrategy, str]] = ..., on_disconnect: _Optional[_Union[DisconnectBehavior, str]] = ...) -> None: ...

class StopTurnRequest(_message.Message):
    __slots__ = ("session_id", "turn_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turn_id: str
    def __init__(self, session_id: _Optional[str] = ..., turn_id: _Optional[str] = ...) -> None: ...

class StopTurnResponse(_message.Message):
    __slots__ = ("stopped", "turn_id")
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    stopped: bool
    turn_id: str
    def __init__(self, stopped: _Optional[bool] = ..., turn_id: _Optional[str] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("execute", "stop", "heartbeat")
    EXECUTE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    execute: ExecuteRequest
    stop: StopTurnRequest
    heartbeat: HeartbeatFrame
    def __init__(self, execute: _Optional[_Union[ExecuteRequest, _Mapping]] = ..., stop: _Optional[_Union[StopTurnRequest, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatFrame, _Mapping]] = ...) -> None: ...

class HeartbeatFrame(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ConnectError(_message.Message):
    __slots__ = ("code", "reason", "message", "status_details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    status_details: bytes
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., status_details: _Optional[bytes] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("turn_event", "session_event", "session", "error")
    TURN_EVENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_EVENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    turn_event: _events_pb2.TurnEvent
    session_event: _events_pb2.SessionEvent
    session: _session_pb2.Session
    error: ConnectError
    def __init__(self, turn_event: _Optional[_Union[_events_pb2.TurnEvent, _Mapping]] = ..., session_event: _Optional[_Union[_events_pb2.SessionEvent, _Mapping]] = ..., session: _Optional[_Union[_session_pb2.Session, _Mapping]] = ..., error: _Optional[_Union[ConnectError, _Mapping]] = ...) -> None: ...
