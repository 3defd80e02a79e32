"""Retry policy of the clients: which failures of an idempotent call are retried, and when.

Only calls whose repetition has the same effect as one call are retried (each client method's docstring
says whether it is); the policy decides which status codes qualify and how long to wait in between.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

from agentsessions.errors import AgentSessionsError

__all__ = ["DEFAULT_RETRY", "CallAttempts", "RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, as in gRPC's retry design.

    Attempt ``n`` (from 1) that fails with a code in ``retry_codes`` is followed, while ``n <
    max_attempts``, by a wait drawn uniformly from ``[0, min(max_backoff, initial_backoff *
    multiplier ** (n - 1))]`` seconds, or the server's ``RetryInfo`` delay when that is longer.

    DEADLINE_EXCEEDED is not retried by default: a client's ``timeout`` is the deadline of the whole
    call, retries included, so once it has passed no attempt is left.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    retry_codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def backoff(self, attempt: int, error: AgentSessionsError) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (from 1) before the next, or None to give up."""
        if attempt >= self.max_attempts or error.code not in self.retry_codes:
            return None
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        delay = random.uniform(0.0, ceiling)
        return max(delay, error.retry_delay) if error.retry_delay is not None else delay


#: The policy the clients use unless told otherwise.
DEFAULT_RETRY = RetryPolicy()


class CallAttempts:
    """The retry bookkeeping of one call: its overall deadline and the attempts made so far.

    Shared by the async and the sync client so that both decide alike.
    """

    def __init__(self, policy: RetryPolicy | None, timeout: float | None) -> None:
        self._policy = policy
        self._attempt = 0
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def timeout(self) -> float | None:
        """The time left for the next attempt, in seconds (None: no deadline)."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def backoff(self, error: AgentSessionsError) -> float | None:
        """Records a failed attempt; returns the wait before the next one, or None to raise ``error``."""
        self._attempt += 1
        delay = self._policy.backoff(self._attempt, error) if self._policy is not None else None
        if delay is None or (self._deadline is not None and time.monotonic() + delay >= self._deadline):
            return None
        return delay
