import datetime

from agentsessions.v1 import session_pb2 as _session_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentOrigin(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_ORIGIN_UNSPECIFIED: _ClassVar[AgentOrigin]
    AGENT_ORIGIN_BUILT_IN: _ClassVar[AgentOrigin]
    AGENT_ORIGIN_CONFIG: _ClassVar[AgentOrigin]
    AGENT_ORIGIN_API: _ClassVar[AgentOrigin]
AGENT_ORIGIN_UNSPECIFIED: AgentOrigin
AGENT_ORIGIN_BUILT_IN: AgentOrigin
AGENT_ORIGIN_CONFIG: AgentOrigin
AGENT_ORIGIN_API: AgentOrigin

class EchoBackend(_message.Message):
    __slots__ = ("word_delay_ms",)
    WORD_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    word_delay_ms: int
    def __init__(self, word_delay_ms: _Optional[int] = ...) -> None: ...

class RemoteBackend(_message.Message):
    __slots__ = ("target", "tls", "timeout_seconds")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    target: str
    tls: bool
    timeout_seconds: int
    def __init__(self, target: _Optional[str] = ..., tls: _Optional[bool] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class OpenAIChatBackend(_message.Message):
    __slots__ = ("base_url", "model", "api_key_env", "system_prompt", "max_tokens", "timeout_seconds", "tools")
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ENV_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    base_url: str
    model: str
    api_key_env: str
    system_prompt: str
    max_tokens: int
    timeout_seconds: int
    tools: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    def __init__(self, base_url: _Optional[str] = ..., model: _Optional[str] = ..., api_key_env: _Optional[str] = ..., system_prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., timeout_seconds: _Optional[int] = ..., tools: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ...) -> None: ...

class Agent(_message.Message):
    __slots__ = ("agent_id", "display_name", "echo", "remote", "openai_chat", "timeout_defaults", "history_window", "origin", "create_time", "update_time", "etag")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    OPENAI_CHAT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    display_name: str
    echo: EchoBackend
    remote: RemoteBackend
    openai_chat: OpenAIChatBackend
    timeout_defaults: _session_pb2.TimeoutPolicy
    history_window: int
    origin: AgentOrigin
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    etag: str
    def __init__(self, agent_id: _Optional[str] = ..., display_name: _Optional[str] = ..., echo: _Optional[_Union[EchoBackend, _Mapping]] = ..., remote: _Optional[_Union[RemoteBackend, _Mapping]] = ..., openai_chat: _Optional[_Union[OpenAIChatBackend, _Mapping]] = ..., timeout_defaults: _Optional[_Union[_session_pb2.TimeoutPolicy, _Mapping]] = ..., history_window: _Optional[int] = ..., origin: _Optional[_Union[AgentOrigin, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...
