"""Turns: what a caller asks for, what a turn ends with, and the rules of one turn per session.

A turn is one run of the session's agent: from the input (a user message, a trigger, or the results of
client tools a paused turn asked for) to the stored answer. Only one runs per session at a time; the
database records which process owns it through a lease (see `sessiond.store.turns`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from .model import NewMessage

#: Messages an agent receives when its history_window is 0.
DEFAULT_HISTORY_WINDOW = 100
#: The largest history window: one page of the message store.
MAX_HISTORY_WINDOW = 1000


class TurnKind(enum.IntEnum):
    MESSAGE = 1
    TRIGGER = 2
    CONTINUE = 3


class TurnState(enum.IntEnum):
    RUNNING = 1
    FINISHED = 2


class FinishReason(enum.IntEnum):
    """Values match agentsessions.v1.FinishReason."""

    STOP = 1
    CLIENT_TOOL_CALLS = 2
    CANCELLED = 3
    LENGTH = 4
    ERROR = 5


class MultitaskStrategy(enum.IntEnum):
    """Values match agentsessions.v1.MultitaskStrategy (UNSPECIFIED means INTERRUPT)."""

    REJECT = 1
    INTERRUPT = 2
    ROLLBACK = 3
    ENQUEUE = 4


class DisconnectBehavior(enum.IntEnum):
    """Values match agentsessions.v1.DisconnectBehavior (UNSPECIFIED means CANCEL)."""

    CANCEL = 1
    CONTINUE = 2


class StopMode(enum.IntEnum):
    """What a stop asks of a running turn (stored, so that a stop reaches a turn on another replica)."""

    NONE = 0
    # Stop and keep the partial output as an interrupted message.
    CANCEL = 1
    # Stop and keep nothing: the turn that asked for it deletes the stopped turn's messages.
    ROLLBACK = 2


@dataclass(frozen=True)
class TurnRequest:
    """A validated Execute request. Exactly one of the inputs is set, matching `kind`.

    `trigger` and `continue_turn` stay in their wire form (the agent receives them as they came);
    `message` and `tool_results` are the messages the turn stores before it calls the agent.
    """

    session_id: str
    kind: TurnKind
    request_id: str = ""
    message: NewMessage | None = None
    trigger_name: str = ""
    trigger: Any = None
    continue_turn_id: str = ""
    continue_turn: Any = None
    tool_results: NewMessage | None = None
    result_call_ids: tuple[str, ...] = ()
    strategy: MultitaskStrategy = MultitaskStrategy.INTERRUPT
    on_disconnect: DisconnectBehavior = DisconnectBehavior.CANCEL


@dataclass(frozen=True)
class TurnRecord:
    """A turn as the database holds it."""

    turn_id: str
    session_id: str
    session_pk: int
    kind: TurnKind
    state: TurnState
    owner: str
    lease_expire_time: datetime
    request_id: str | None
    # Every message of the turn has a sequence above this (the session's last sequence at the start).
    start_sequence: int
    create_time: datetime
    finish_reason: FinishReason | None = None
    stop_mode: StopMode = StopMode.NONE
    continues_turn_id: str | None = None
    # Set on a turn paused for client tools once a later turn continued or superseded it.
    closed_by_turn_id: str | None = None
    # Client tool calls awaiting results (a turn that finished with CLIENT_TOOL_CALLS).
    pending_calls: dict[str, str] = field(default_factory=dict)  # call_id -> tool name
    # The turn's events for replays (deltas coalesced), serialized; None while running.
    events: bytes | None = None
    finish_time: datetime | None = None

    def leased(self, lease_now: datetime) -> bool:
        return self.state is TurnState.RUNNING and self.lease_expire_time > lease_now


def turn_in_progress(session_id: str, turn_id: str, retry_after_seconds: float) -> Aborted:
    return Aborted(
        f"a turn is running in session {session_id!r}; retry after it finishes, or choose another "
        "multitask strategy (interrupt, rollback, enqueue)",
        reason="TURN_IN_PROGRESS",
        metadata={"session_id": session_id, "turn_id": turn_id},
        retry_after_seconds=retry_after_seconds,
    )


def turn_not_found(session_id: str, turn_id: str) -> NotFound:
    return NotFound(
        f"turn {turn_id!r} does not exist in session {session_id!r}",
        reason="TURN_NOT_FOUND",
        metadata={"session_id": session_id, "turn_id": turn_id},
    )


def check_continuable(paused: TurnRecord, request: TurnRequest) -> None:
    """A continue resumes a turn that paused for client tools, once, with a result for every call."""
    meta = {"session_id": request.session_id, "turn_id": paused.turn_id}
    if paused.state is not TurnState.FINISHED or paused.finish_reason is not FinishReason.CLIENT_TOOL_CALLS:
        raise FailedPrecondition(
            f"turn {paused.turn_id!r} is not waiting for client tool results",
            reason="TURN_NOT_PAUSED",
            metadata=meta,
        )
    if paused.closed_by_turn_id == "":
        raise FailedPrecondition(
            f"turn {paused.turn_id!r} paused before its session was cleared or restored: the calls it asked "
            "for went with that history",
            reason="TURN_NOT_PAUSED",
            metadata=meta,
        )
    if paused.closed_by_turn_id is not None:
        raise FailedPrecondition(
            f"turn {paused.turn_id!r} was already continued or superseded by turn "
            f"{paused.closed_by_turn_id!r}",
            reason="TURN_NOT_PAUSED",
            metadata={**meta, "closed_by_turn_id": paused.closed_by_turn_id},
        )
    unknown = sorted(set(request.result_call_ids) - paused.pending_calls.keys())
    if unknown:
        raise InvalidArgument.field(
            "continue_turn.tool_results",
            f"turn {paused.turn_id!r} did not request calls {', '.join(unknown)}; it requested "
            f"{', '.join(sorted(paused.pending_calls))}",
        )
    missing = sorted(paused.pending_calls.keys() - set(request.result_call_ids))
    if missing:
        raise InvalidArgument.field(
            "continue_turn.tool_results", f"results are missing for calls {', '.join(missing)}"
        )


def history_window(configured: int) -> int:
    """How many recent messages the agent receives: the agent's window, or the server default for 0."""
    return min(configured or DEFAULT_HISTORY_WINDOW, MAX_HISTORY_WINDOW)
