"""Scoped state, as Google ADK has it: besides a session's own variables, variables shared by every session of
the same user of an agent (`user:` keys) and by every session of an agent (`app:` keys).

The one rule: **a key's prefix names its scope.** `user:k` is key `k` of the user scope (agent id, user id),
`app:k` is key `k` of the agent scope (agent id), `temp:k` lives for one call and is never stored, and any
other key is the session's own. Reads merge the three into one object, each shared key under its prefix;
since prefixes partition the keys, nothing shadows anything. Writes go to the scope the prefix names.
Shared keys are only ever written key by key: a write never removes a shared key it does not name, because
other sessions see it too.

Plain functions of their inputs: the store applies them inside the write's transaction.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument
from .validation import Limits, check_variables

TEMP_PREFIX = "temp:"


class Scope(enum.IntEnum):
    """Stored in scoped_variables.scope."""

    APP = 1  # every session of an agent
    USER = 2  # every session of one user of an agent

    @property
    def prefix(self) -> str:
        return "app:" if self is Scope.APP else "user:"


@dataclass(frozen=True)
class ScopedChanges:
    """What a write does to the shared scopes: keys to set and keys to remove, per scope (keys unprefixed),
    and the limits a scope's variables must stay within."""

    sets: Mapping[Scope, Mapping[str, Any]] = field(default_factory=dict)
    removals: Mapping[Scope, frozenset[str]] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)

    def __bool__(self) -> bool:
        return any(self.sets.values()) or any(self.removals.values())

    def scopes(self) -> list[Scope]:
        return sorted({s for s, v in self.sets.items() if v} | {s for s, v in self.removals.items() if v})

    def apply(self, scope: Scope, current: Mapping[str, Any]) -> dict[str, Any]:
        """One scope's variables after these changes, within the size limit of a variables object."""
        updated = {k: v for k, v in current.items() if k not in self.removals.get(scope, frozenset())}
        updated.update(self.sets.get(scope, {}))
        check_variables(updated, self.limits, f"session.variables ({scope.prefix} keys)")
        return updated


def scope_of(key: str) -> tuple[Scope | None, str]:
    """(the scope a key names, the key within it); (None, key) for a session's own key."""
    for scope in Scope:
        if key.startswith(scope.prefix):
            return scope, key[len(scope.prefix) :]
    return None, key


def split(variables: Mapping[str, Any], limits: Limits | None = None) -> tuple[dict[str, Any], ScopedChanges]:
    """A session's own variables and the shared keys set (within `limits`, the defaults if None), from a
    variables object as callers write it (a create, or an update of the whole `variables`). `temp:`
    keys are dropped."""
    own: dict[str, Any] = {}
    sets: dict[Scope, dict[str, Any]] = {}
    for key, value in variables.items():
        if key.startswith(TEMP_PREFIX):
            continue
        scope, name = scope_of(key)
        if scope is None:
            own[key] = value
        else:
            sets.setdefault(scope, {})[name] = value
    return own, ScopedChanges(sets=sets) if limits is None else ScopedChanges(sets=sets, limits=limits)


def patch(
    own: Mapping[str, Any], keys: frozenset[str], values: Mapping[str, Any]
) -> tuple[dict[str, Any], ScopedChanges]:
    """Key-by-key update (`variables.<key>` mask paths): each named key takes its value in `values`, or is
    removed when `values` lacks it, in the scope its prefix names. Returns the new own variables too."""
    patched = dict(own)
    sets: dict[Scope, dict[str, Any]] = {}
    removals: dict[Scope, set[str]] = {}
    for key in sorted(keys):
        if key.startswith(TEMP_PREFIX):
            continue
        scope, name = scope_of(key)
        if scope is None:
            if key in values:
                patched[key] = values[key]
            else:
                patched.pop(key, None)
        elif key in values:
            sets.setdefault(scope, {})[name] = values[key]
        else:
            removals.setdefault(scope, set()).add(name)
    return patched, ScopedChanges(sets=sets, removals={s: frozenset(k) for s, k in removals.items()})


def merged(own: Mapping[str, Any], shared: Mapping[Scope, Mapping[str, Any]]) -> dict[str, Any]:
    """A session's variables as read: its own keys, then each shared key under its scope's prefix."""
    view = dict(own)
    for scope in Scope:
        for key, value in shared.get(scope, {}).items():
            view[scope.prefix + key] = value
    return view


def key_from_path(path: str) -> str:
    """The variable a `variables.<key>` mask path names. Keys that are not identifiers (`user:theme`) may
    be quoted in backticks, as AIP-161 has it for map keys."""
    key = path[len("variables.") :]
    if len(key) >= 2 and key[0] == key[-1] == "`":
        key = key[1:-1]
    if not key:
        raise InvalidArgument.field("update_mask", f"{path!r} names no variable")
    return key
