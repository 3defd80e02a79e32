from agentsessions.v1 import agent_pb2 as _agent_pb2
from agentsessions.v1 import events_pb2 as _events_pb2
from agentsessions.v1 import message_pb2 as _message_pb2
from agentsessions.v1 import session_pb2 as _session_pb2
from agentsessions.v1 import turn_service_pb2 as _turn_service_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateAgentRequest(_message.Message):
    __slots__ = ("agent", "agent_id")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent: _agent_pb2.Agent
    agent_id: str
    def __init__(self, agent: _Optional[_Union[_agent_pb2.Agent, _Mapping]] = ..., agent_id: _Optional[str] = ...) -> None: ...

class GetAgentRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "next_page_token")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[_agent_pb2.Agent]
    next_page_token: str
    def __init__(self, agents: _Optional[_Iterable[_Union[_agent_pb2.Agent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateAgentRequest(_message.Message):
    __slots__ = ("agent", "update_mask")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    agent: _agent_pb2.Agent
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, agent: _Optional[_Union[_agent_pb2.Agent, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class DeleteAgentRequest(_message.Message):
    __slots__ = ("agent_id", "allow_missing")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    allow_missing: bool
    def __init__(self, agent_id: _Optional[str] = ..., allow_missing: _Optional[bool] = ...) -> None: ...

class RespondRequest(_message.Message):
    __slots__ = ("session", "turn_id", "history", "message", "trigger", "continue_turn")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_TURN_FIELD_NUMBER: _ClassVar[int]
    session: _session_pb2.Session
    turn_id: str
    history: _containers.RepeatedCompositeFieldContainer[_message_pb2.Message]
    message: _message_pb2.Message
    trigger: _turn_service_pb2.Trigger
    continue_turn: _turn_service_pb2.ContinueTurn
    def __init__(self, session: _Optional[_Union[_session_pb2.Session, _Mapping]] = ..., turn_id: _Optional[str] = ..., history: _Optional[_Iterable[_Union[_message_pb2.Message, _Mapping]]] = ..., message: _Optional[_Union[_message_pb2.Message, _Mapping]] = ..., trigger: _Optional[_Union[_turn_service_pb2.Trigger, _Mapping]] = ..., continue_turn: _Optional[_Union[_turn_service_pb2.ContinueTurn, _Mapping]] = ...) -> None: ...

class RespondResponse(_message.Message):
    __slots__ = ("text_delta", "reasoning_delta", "tool_call", "client_tool_request", "usage", "finished", "error")
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    REASONING_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOOL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    text_delta: _events_pb2.TextDelta
    reasoning_delta: _events_pb2.ReasoningDelta
    tool_call: _events_pb2.ToolCallEvent
    client_tool_request: _events_pb2.ClientToolRequest
    usage: _events_pb2.Usage
    finished: _events_pb2.TurnFinished
    error: _events_pb2.TurnError
    def __init__(self, text_delta: _Optional[_Union[_events_pb2.TextDelta, _Mapping]] = ..., reasoning_delta: _Optional[_Union[_events_pb2.ReasoningDelta, _Mapping]] = ..., tool_call: _Optional[_Union[_events_pb2.ToolCallEvent, _Mapping]] = ..., client_tool_request: _Optional[_Union[_events_pb2.ClientToolRequest, _Mapping]] = ..., usage: _Optional[_Union[_events_pb2.Usage, _Mapping]] = ..., finished: _Optional[_Union[_events_pb2.TurnFinished, _Mapping]] = ..., error: _Optional[_Union[_events_pb2.TurnError, _Mapping]] = ...) -> None: ...
