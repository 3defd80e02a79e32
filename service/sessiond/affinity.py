"""One CPU for the Python threads that hand the GIL to each other (Linux).

With SQLite, a write goes from the event loop's thread to the writer thread and back, and within a group
the writer gives up the GIL around every SQLite call it makes. On two CPUs each hand-over wakes the other
CPU, and the objects both threads touch (the requests, the sessions, their reference counts) move between
the two CPUs' caches: in one process without gRPC, the same group of appends took about 60% more CPU on
the writer thread than on the loop's own. Kept on one CPU, the two threads trade the GIL as a switch on
that CPU. They are pinned before grpc's server exists, so the threads the loop's thread starts afterwards
(grpc's poller and event engine, aiosqlite's) inherit the CPU. docs/design.md ("The loop and the writer
on one CPU") has the figures and the trade-offs.

`SESSIOND_CPU_AFFINITY`: ``auto`` (the default) pins the loop's thread and the SQLite writer's to the
CPU the loop runs on at start, on SQLite only and when the process may use more than one CPU; ``off``
leaves them; a CPU number pins them there (also on PostgreSQL, where only the loop's thread is pinned):
several servers on one machine each get their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import StartupError

log = logging.getLogger(__name__)


@dataclass
class Pinned:
    """Threads moved to one CPU, with the CPUs each could use before (restored by `restore`)."""

    before: dict[int, set[int]] = field(default_factory=dict)

    def restore(self) -> None:
        """Gives every pinned thread still alive its CPUs back (a server run inside another program,
        such as a test process, leaves the program's threads as it found them). Threads the loop's thread
        started while pinned (grpc's own, shared by every channel and server of the process) keep the
        CPU they inherited."""
        for thread_id, cpus in self.before.items():
            with contextlib.suppress(OSError):  # the thread ended (the SQLite writer stops with the database)
                os.sched_setaffinity(thread_id, cpus)
        self.before.clear()


def _supported() -> bool:
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def current_cpu() -> int | None:
    """The CPU the calling thread last ran on (Linux), or None if this cannot be known."""
    try:
        with open("/proc/thread-self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[36])  # field 39 of proc(5), counted from the state, field 3
    except (OSError, IndexError, ValueError):
        return None


def choose_cpu(setting: str, *, writer: bool) -> int | None:
    """The CPU `setting` (SESSIOND_CPU_AFFINITY) asks for, or None for no pinning. Raises StartupError for
    a CPU this process may not use."""
    if setting == "off":
        return None
    if not _supported():
        if setting == "auto":
            return None
        raise StartupError("SESSIOND_CPU_AFFINITY: setting a CPU needs Linux; use auto or off")
    allowed = os.sched_getaffinity(0)
    if setting == "auto":
        if not writer or len(allowed) < 2:  # nothing shares the GIL with the loop, or nothing to choose
            return None
        cpu = current_cpu()
        return cpu if cpu in allowed else min(allowed)
    cpu = int(setting)
    if cpu not in allowed:
        raise StartupError(
            f"SESSIOND_CPU_AFFINITY: CPU {cpu} is not one this process may run on "
            f"({', '.join(str(c) for c in sorted(allowed))})"
        )
    return cpu


def pin(thread_ids: Sequence[int], cpu: int) -> Pinned:
    """Moves the threads (native ids) to `cpu`. A thread that cannot be moved is logged and left: the
    server runs all the same, only slower."""
    pinned = Pinned()
    for thread_id in thread_ids:
        try:
            before = os.sched_getaffinity(thread_id)
            os.sched_setaffinity(thread_id, {cpu})
        except OSError as exc:
            log.warning("could not keep thread %d on CPU %d: %s", thread_id, cpu, exc)
            continue
        pinned.before[thread_id] = before
    return pinned
