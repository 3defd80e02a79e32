"""Timeout policy: the three tiers, their ranges, and the expiry arithmetic.

Effective policy = the session tier over the agent tier over the global defaults, field by field. A value
outside the configured range is rejected (never clamped), naming the field and the allowed range.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from datetime import datetime, timedelta

from .errors import FieldViolation, InvalidArgument

POLICY_FIELDS = ("timeout_minutes", "auto_renew", "max_duration_minutes", "warning_threshold_minutes")


class Source(enum.IntEnum):
    """Values match agentsessions.v1.PolicySource."""

    SESSION = 1
    AGENT = 2
    GLOBAL = 3


@dataclass(frozen=True)
class TimeoutPolicy:
    """One tier of the policy. None means "not set here: fall through to the next tier"."""

    timeout_minutes: int | None = None
    auto_renew: bool | None = None
    max_duration_minutes: int | None = None
    warning_threshold_minutes: int | None = None

    def as_dict(self) -> dict[str, int | bool]:
        return {name: v for name in POLICY_FIELDS if (v := getattr(self, name)) is not None}

    @classmethod
    def from_dict(cls, data: dict[str, int | bool] | None) -> TimeoutPolicy:
        data = data or {}
        return cls(**{k: data[k] for k in POLICY_FIELDS if data.get(k) is not None})  # type: ignore[arg-type]


@dataclass(frozen=True)
class TimeoutLimits:
    """The global tier and the allowed ranges (ElizaOS's model and defaults, in minutes)."""

    default_timeout_minutes: int = 30
    min_timeout_minutes: int = 5
    max_timeout_minutes: int = 1440
    max_duration_minutes: int = 720
    warning_threshold_minutes: int = 5
    auto_renew: bool = True

    def global_tier(self) -> TimeoutPolicy:
        return TimeoutPolicy(
            timeout_minutes=self.default_timeout_minutes,
            auto_renew=self.auto_renew,
            max_duration_minutes=self.max_duration_minutes,
            warning_threshold_minutes=self.warning_threshold_minutes,
        )

    def ranges(self) -> dict[str, tuple[int, int]]:
        return {
            "timeout_minutes": (self.min_timeout_minutes, self.max_timeout_minutes),
            "max_duration_minutes": (self.min_timeout_minutes, self.max_duration_minutes),
            "warning_threshold_minutes": (1, self.max_timeout_minutes),
        }

    def check(self) -> None:
        """Refuse a global configuration that is inconsistent with itself."""
        self.validate(self.global_tier(), "SESSION")

    def validate(self, tier: TimeoutPolicy, prefix: str) -> None:
        """Raise InvalidArgument listing every field of `tier` outside its range."""
        violations = []
        bounds: dict[str, str] = {}
        for name, (low, high) in self.ranges().items():
            value = getattr(tier, name)
            if value is not None and not low <= value <= high:
                field = f"{prefix}.{name}"
                violations.append(
                    FieldViolation(field, f"must be between {low} and {high} minutes, got {value}")
                )
                bounds = bounds or {"field": field, "min": str(low), "max": str(high), "value": str(value)}
        if violations:
            raise InvalidArgument(
                "; ".join(f"{v.field} {v.description}" for v in violations),
                reason="TIMEOUT_OUT_OF_RANGE",
                metadata=bounds,
                violations=violations,
            )


@dataclass(frozen=True)
class EffectivePolicy:
    timeout_minutes: int
    auto_renew: bool
    max_duration_minutes: int
    warning_threshold_minutes: int
    sources: tuple[Source, Source, Source, Source]

    @functools.cached_property
    def timeout(self) -> timedelta:
        return timedelta(minutes=self.timeout_minutes)

    @functools.cached_property
    def max_duration(self) -> timedelta:
        return timedelta(minutes=self.max_duration_minutes)

    @functools.cached_property
    def warning_threshold(self) -> timedelta:
        return timedelta(minutes=self.warning_threshold_minutes)

    def source_of(self, name: str) -> Source:
        return self.sources[POLICY_FIELDS.index(name)]


@functools.lru_cache(maxsize=1024)
def resolve(session: TimeoutPolicy, agent: TimeoutPolicy, limits: TimeoutLimits) -> EffectivePolicy:
    """Each field from the first tier that sets it: session, then agent, then global. Cached (all three
    are frozen, and few combinations are in use): sessions of the same policy share one object, and with
    it the durations it computed once."""
    glob = limits.global_tier()
    values: list[int | bool] = []
    sources: list[Source] = []
    for name in POLICY_FIELDS:
        for tier, source in ((session, Source.SESSION), (agent, Source.AGENT), (glob, Source.GLOBAL)):
            value = getattr(tier, name)
            if value is not None:
                values.append(value)
                sources.append(source)
                break
    timeout, auto_renew, max_duration, warning = values
    return EffectivePolicy(
        timeout_minutes=int(timeout),
        auto_renew=bool(auto_renew),
        max_duration_minutes=int(max_duration),
        warning_threshold_minutes=int(warning),
        sources=(sources[0], sources[1], sources[2], sources[3]),
    )


def next_expiry(anchor: datetime, policy: EffectivePolicy, cap: datetime) -> datetime:
    """When a session renewed (or started) at `anchor` expires: anchor + timeout, never past the cap."""
    return min(anchor + policy.timeout, cap)
