import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATUS_UNSPECIFIED: _ClassVar[SessionStatus]
    SESSION_STATUS_ACTIVE: _ClassVar[SessionStatus]
    SESSION_STATUS_EXPIRED: _ClassVar[SessionStatus]
    SESSION_STATUS_ENDED: _ClassVar[SessionStatus]

class PolicySource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_SOURCE_UNSPECIFIED: _ClassVar[PolicySource]
    POLICY_SOURCE_SESSION: _ClassVar[PolicySource]
    POLICY_SOURCE_AGENT: _ClassVar[PolicySource]
    POLICY_SOURCE_GLOBAL: _ClassVar[PolicySource]
SESSION_STATUS_UNSPECIFIED: SessionStatus
SESSION_STATUS_ACTIVE: SessionStatus
SESSION_STATUS_EXPIRED: SessionStatus
SESSION_STATUS_ENDED: SessionStatus
POLICY_SOURCE_UNSPECIFIED: PolicySource
POLICY_SOURCE_SESSION: PolicySource
POLICY_SOURCE_AGENT: PolicySource
POLICY_SOURCE_GLOBAL: PolicySource

class TimeoutPolicy(_message.Message):
    __slots__ = ("timeout_minutes", "auto_renew", "max_duration_minutes", "warning_threshold_minutes")
    TIMEOUT_MINUTES_FIELD_NUMBER: _ClassVar[int]
    AUTO_RENEW_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_MINUTES_FIELD_NUMBER: _ClassVar[int]
    WARNING_THRESHOLD_MINUTES_FIELD_NUMBER: _ClassVar[int]
    timeout_minutes: int
    auto_renew: bool
    max_duration_minutes: int
    warning_threshold_minutes: int
    def __init__(self, timeout_minutes: _Optional[int] = ..., auto_renew: _Optional[bool] = ..., max_duration_minutes: _Optional[int] = ..., warning_threshold_minutes: _Optional[int] = ...) -> None: ...

class EffectiveTimeoutPolicy(_message.Message):
    __slots__ = ("timeout_minutes", "auto_renew", "max_duration_minutes", "warning_threshold_minutes", "timeout_minutes_source", "auto_renew_source", "max_duration_minutes_source", "warning_threshold_minutes_source")
    TIMEOUT_MINUTES_FIELD_NUMBER: _ClassVar[int]
    AUTO_RENEW_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_MINUTES_FIELD_NUMBER: _ClassVar[int]
    WARNING_THRESHOLD_MINUTES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MINUTES_SOURCE_FIELD_NUMBER: _ClassVar[int]
    AUTO_RENEW_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_MINUTES_SOURCE_FIELD_NUMBER: _ClassVar[int]
    WARNING_THRESHOLD_MINUTES_SOURCE_FIELD_NUMBER: _ClassVar[int]
    timeout_minutes: int
    auto_renew: bool
    max_duration_minutes: int
    warning_threshold_minutes: int
    timeout_minutes_source: PolicySource
    auto_renew_source: PolicySource
    max_duration_minutes_source: PolicySource
    warning_threshold_minutes_source: PolicySource
    def __init__(self, timeout_minutes: _Optional[int] = ..., auto_renew: _Optional[bool] = ..., max_duration_minutes: _Optional[int] = ..., warning_threshold_minutes: _Optional[int] = ..., timeout_minutes_source: _Optional[_Union[PolicySource, str]] = ..., auto_renew_source: _Optional[_Union[PolicySource, str]] = ..., max_duration_minutes_source: _Optional[_Union[PolicySource, str]] = ..., warning_threshold_minutes_source: _Optional[_Union[PolicySource, str]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "agent_id", "user_id", "metadata", "variables", "status", "near_expiration", "timeout_policy", "effective_timeout_policy", "create_time", "update_time", "last_activity_time", "expire_time", "max_expire_time", "end_time", "renewal_count", "message_count", "last_sequence", "etag", "time_remaining", "last_event_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NEAR_EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_POLICY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_TIMEOUT_POLICY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVITY_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    MAX_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    TIME_REMAINING_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    agent_id: str
    user_id: str
    metadata: _containers.ScalarMap[str, str]
    variables: _struct_pb2.Struct
    status: SessionStatus
    near_expiration: bool
    timeout_policy: TimeoutPolicy
    effective_timeout_policy: EffectiveTimeoutPolicy
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    last_activity_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    max_expire_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    renewal_count: int
    message_count: int
    last_sequence: int
    etag: str
    time_remaining: _duration_pb2.Duration
    last_event_id: int
    def __init__(self, session_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., user_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., variables: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., status: _Optional[_Union[SessionStatus, str]] = ..., near_expiration: _Optional[bool] = ..., timeout_policy: _Optional[_Union[TimeoutPolicy, _Mapping]] = ..., effective_timeout_policy: _Optional[_Union[EffectiveTimeoutPolicy, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_activity_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., max_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., renewal_count: _Optional[int] = ..., message_count: _Optional[int] = ..., last_sequence: _Optional[int] = ..., etag: _Optional[str] = ..., time_remaining: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., last_event_id: _Optional[int] = ...) -> None: ...
