"""Input rules shared by every entry point: identifiers, metadata, sizes."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._:@-]*"
SESSION_ID = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MESSAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]*")
METADATA_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
# C0 and C1 controls, DEL, line and paragraph separators, and the bidirectional embeddings, overrides and
# isolates (U+202E shows "user-evil\u202etxt.exe" reversed): none belongs in an id, a name or a label.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may carry. Defaults suit chat histories; all are configurable."""

    max_session_id_length: int = 256
    max_agent_id_length: int = 64
    max_user_id_length: int = 256
    max_message_id_length: int = 128
    max_request_id_length: int = 128
    max_metadata_entries: int = 64
    max_metadata_key_length: int = 128
    max_metadata_value_length: int = 1024
    max_variables_bytes: int = 64 * 1024
    max_message_bytes: int = 1024 * 1024
    max_parts_per_message: int = 256
    max_batch_messages: int = 100
    default_page_size: int = 50
    max_page_size: int = 1000


def check_id(value: str, field: str, pattern: re.Pattern[str], max_length: int, what: str) -> None:
    if not value:
        raise InvalidArgument.field(field, "is required")
    if len(value) > max_length:
        raise InvalidArgument.field(field, f"must be at most {max_length} characters, got {len(value)}")
    if not pattern.fullmatch(value):
        raise InvalidArgument.field(field, f"is not a valid {what} ({pattern.pattern})")


def check_session_id(value: str, limits: Limits, field: str = "session_id") -> None:
    check_id(value, field, SESSION_ID, limits.max_session_id_length, "session id")


def check_agent_id(value: str, limits: Limits, field: str = "agent_id") -> None:
    check_id(value, field, AGENT_ID, limits.max_agent_id_length, "agent id")


def check_message_id(value: str, limits: Limits, field: str) -> None:
    check_id(value, field, MESSAGE_ID, limits.max_message_id_length, "message id")


def check_text(value: str, field: str, max_length: int) -> None:
    if len(value) > max_length:
        raise InvalidArgument.field(field, f"must be at most {max_length} characters, got {len(value)}")
    if _CONTROL.search(value):
        raise InvalidArgument.field(field, "must not contain control characters")


# Metadata values are indexed with their key (ListSessions filters on them), and a PostgreSQL B-tree entry
# holds at most 2,704 bytes: 1,024 characters of CJK text (3 or 4 bytes each) did not fit. 2,048 bytes
# leaves room for the longest key; every ASCII or two-byte value within the character limit fits.
MAX_METADATA_VALUE_BYTES = 2048


def check_metadata(metadata: Mapping[str, str], limits: Limits, field: str) -> None:
    if len(metadata) > limits.max_metadata_entries:
        raise InvalidArgument.field(
            field, f"must have at most {limits.max_metadata_entries} entries, got {len(metadata)}"
        )
    for key, value in metadata.items():
        if len(key) > limits.max_metadata_key_length or not METADATA_KEY.fullmatch(key):
            raise InvalidArgument.field(
                f"{field}[{key[:64]!r}]",
                f"keys are 1 to {limits.max_metadata_key_length} characters of {METADATA_KEY.pattern}",
            )
        if len(value) > limits.max_metadata_value_length:
            raise InvalidArgument.field(
                f"{field}[{key!r}]", f"values are at most {limits.max_metadata_value_length} characters"
            )
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_METADATA_VALUE_BYTES:
            raise InvalidArgument.field(
                f"{field}[{key!r}]",
                f"values are at most {MAX_METADATA_VALUE_BYTES} bytes as UTF-8, got {size}",
            )
        if "\x00" in value:  # PostgreSQL text cannot hold NUL; refused on every backend alike
            raise InvalidArgument.field(f"{field}[{key!r}]", "values must not contain NUL characters")


def check_variables(variables: Mapping[str, Any], limits: Limits, field: str = "variables") -> None:
    if not variables:
        return  # "{}": within any limit
    size = len(json.dumps(variables, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limits.max_variables_bytes:
        raise InvalidArgument.field(
            field, f"must be at most {limits.max_variables_bytes} bytes as JSON, got {size}"
        )


def check_page_size(page_size: int, limits: Limits) -> int:
    if page_size < 0 or page_size > limits.max_page_size:
        raise InvalidArgument.field(
            "page_size", f"must be between 0 and {limits.max_page_size}, got {page_size}"
        )
    return page_size or limits.default_page_size


class _RandomPool:
    """`os.urandom` bytes drawn a page at a time. Each `os.urandom` call releases the GIL for its system
    call; on the event loop, with the SQLite writer thread waiting for the GIL, taking it back cost up to
    a switch interval (1 ms) per generated id. One call per 4 KiB makes that once per 400 ids. After a
    fork the child draws a fresh page, so parent and child never hand out the same bytes."""

    SIZE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._page = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._page, self._at = b"", 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._at + n > len(self._page):
                self._page, self._at = os.urandom(self.SIZE), 0
            start = self._at
            self._at = start + n
            return self._page[start : start + n]


_random = _RandomPool()


def random_bits(bits: int) -> int:
    """`bits` random bits from the operating system's generator (as `secrets.randbits`, from the pool)."""
    return int.from_bytes(_random.take((bits + 7) // 8), "big") >> (-bits % 8)


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7): generated ids sort by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = random_bits(80)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    h = f"{value:032x}"  # as str(uuid.UUID(int=value)), without building the UUID
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
