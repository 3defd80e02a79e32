import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetServerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerStats(_message.Message):
    __slots__ = ("active_sessions", "expiring_soon_sessions", "expired_sessions", "ended_sessions", "running_turns", "uptime", "start_time", "version", "database")
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    EXPIRING_SOON_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ENDED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TURNS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    active_sessions: int
    expiring_soon_sessions: int
    expired_sessions: int
    ended_sessions: int
    running_turns: int
    uptime: _duration_pb2.Duration
    start_time: _timestamp_pb2.Timestamp
    version: str
    database: str
    def __init__(self, active_sessions: _Optional[int] = ..., expiring_soon_sessions: _Optional[int] = ..., expired_sessions: _Optional[int] = ..., ended_sessions: _Optional[int] = ..., running_turns: _Optional[int] = ..., uptime: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[str] = ..., database: _Optional[str] = ...) -> None: ...
