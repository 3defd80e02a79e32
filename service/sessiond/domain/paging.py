"""Opaque page tokens and the rule that keeps a tool call and its results on one page."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .errors import InvalidArgument
from .model import StoredMessage

P = TypeVar("P", int, str)
T = TypeVar("T")

# A page of messages stops short of this many bytes of content and metadata, so that it stays under the
# 4 MiB a gRPC client receives by default (grpcurl, Node, Go, a Python channel with default options) with
# room for the session (`include_session`) beside it; the next page starts where it stopped.
MAX_PAGE_BYTES = 3 * 1024 * 1024


def fingerprint(*parts: Any) -> str:
    """Ties a token to the request it continues: a token reused with other filters is refused."""
    return hashlib.blake2s(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()


def encode_token(position: int | str, request_fingerprint: str) -> str:
    raw = json.dumps({"p": position, "f": request_fingerprint}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(
    token: str,
    request_fingerprint: str,
    kind: type[P] = int,  # type: ignore[assignment]
    valid: Callable[[P], object] | None = None,
) -> P:
    """The position a token continues from (a keyset value); 0 for no token. Tokens are not signed: anyone
    can build one, so a text position must pass `valid` (the rule for the keys it stands for) before it
    reaches a query."""
    if not token:
        return kind()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        position, fp = data["p"], data["f"]
        if type(position) is not kind or not position:
            raise ValueError
        if isinstance(position, int) and not 0 < position < 2**63:  # keys are positive BIGINTs
            raise ValueError
        if valid is not None and not valid(position):
            raise ValueError
    # RecursionError: JSON nested deeper than the parser goes (a forged token of 5,000 `[`), which was
    # INTERNAL before (test_fuzz_requests.py found it).
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise InvalidArgument.field("page_token", "is not a token this service issued") from None
    if fp != request_fingerprint:
        raise InvalidArgument.field(
            "page_token", "belongs to a request with other parameters; repeat the first request's parameters"
        ) from None
    return position


def message_size(m: StoredMessage) -> int:
    """About what a message takes on the wire: content, metadata, and 64 for its fixed fields (ids,
    sequence, times)."""
    return len(m.content) + sum(len(k) + len(v) for k, v in m.metadata.items()) + 64


def fitting(page: Sequence[T], max_bytes: int, size: Callable[[T], int]) -> int:
    """How many items from the start of `page` fit in `max_bytes` as `size` measures them (at least one:
    an item is never split, and one is at most its own configured size)."""
    total = 0
    for i, item in enumerate(page):
        total += size(item)
        if total > max_bytes and i > 0:
            return i
    return len(page)


def _spilling(page: Sequence[StoredMessage], boundary: int, *, descending: bool) -> list[StoredMessage]:
    """The messages of `page` whose group reaches `boundary`, a message left out of the page."""
    if descending:
        return [m for m in page if m.group_start <= boundary]
    return [m for m in page if m.group_end >= boundary]


def keep_tool_groups(
    page: Sequence[StoredMessage], following: StoredMessage, *, descending: bool
) -> tuple[list[StoredMessage], int | None]:
    """Trims the far end of a full page so that no tool call is separated from its results. `following` is
    the first message after the page in the same view and order: the next page starts there.

    A group is cut when it reaches the first message left out (the view may skip hidden members of a
    group, so the group's end in the full history is compared with that message, not with the page's last
    one). Returns the page kept and None; or, for a page that is all one group larger than the page, the
    page as it is and the far edge (a sequence) the page must grow to for the group to be whole.
    """
    kept = list(page)
    boundary = following.sequence
    while True:
        spilling = _spilling(kept, boundary, descending=descending)
        if not spilling:
            return kept, None
        if descending:
            boundary = max(m.sequence for m in spilling)
            trimmed = [m for m in kept if m.sequence > boundary]
        else:
            boundary = min(m.sequence for m in spilling)
            trimmed = [m for m in kept if m.sequence < boundary]
        if not trimmed:
            spilled = _spilling(page, following.sequence, descending=descending)
            if descending:
                return list(page), min(m.group_start for m in spilled)
            return list(page), max(m.group_end for m in spilled)
        kept = trimmed
