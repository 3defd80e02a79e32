"""Assertions and values shared by the test modules."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from agentsessions import errors

DOMAIN = "agentsessions.v1"
# What an ErrorInfo reason looks like (UPPER_SNAKE_CASE), and the services sessiond serves (AgentService
# is the one a remote agent implements).
REASON = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
SERVED = {
    "agentsessions.v1.SessionService",
    "agentsessions.v1.MessageService",
    "agentsessions.v1.TurnService",
    "agentsessions.v1.AgentRegistryService",
    "agentsessions.v1.AdminService",
}


def ts(value: Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


@contextlib.contextmanager
def raises(
    cls: type[errors.AgentSessionsError], reason: str, **metadata: str
) -> Iterator[pytest.ExceptionInfo[errors.AgentSessionsError]]:
    """Expects `cls` with an ErrorInfo of our domain, `reason`, and at least the `metadata` pairs given."""
    with pytest.raises(cls) as info:
        yield info
    err = info.value
    assert err.domain == DOMAIN, err
    assert err.reason == reason, err
    for key, value in metadata.items():
        assert err.metadata.get(key) == value, (key, err.metadata)


def nested_json(levels: int) -> struct_pb2.Value:
    """A JSON value of lists nested `levels` deep around a string (the server accepts 32)."""
    value = struct_pb2.Value(string_value="bottom")
    for _ in range(levels):
        outer = struct_pb2.Value()
        outer.list_value.values.append(value)
        value = outer
    return value
