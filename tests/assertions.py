"""Assertions shared by the test modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from agentsessions import errors

DOMAIN = "agentsessions.v1"


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
