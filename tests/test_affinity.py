"""SESSIOND_CPU_AFFINITY: the event loop's thread and the SQLite writer's kept on one CPU (Linux).

The suite's servers run with it off (they share the test process); here a server runs with it on, and
the test process gets its threads' CPUs back when the server stops."""

from __future__ import annotations

import os
import threading

import pytest
from conftest import DatabaseTarget, make_settings

from agentsessions import AsyncSessionsClient, Message, Part, Role, TextPart
from sessiond import affinity
from sessiond.config import StartupError
from sessiond.domain.clock import ManualClock
from sessiond.server import start_server

linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="this process may use one CPU only: there is nothing to choose",
)


def test_off_and_nothing_to_share_pin_nothing() -> None:
    assert affinity.choose_cpu("off", writer=True) is None
    assert affinity.choose_cpu("auto", writer=False) is None  # PostgreSQL: no writer thread


@linux
@two_cpus
def test_auto_chooses_a_cpu_the_process_may_use_and_a_number_is_checked() -> None:
    allowed = os.sched_getaffinity(0)
    assert affinity.choose_cpu("auto", writer=True) in allowed
    cpu = max(allowed)
    assert affinity.choose_cpu(str(cpu), writer=False) == cpu  # a number pins the loop on any backend
    with pytest.raises(StartupError, match=r"SESSIOND_CPU_AFFINITY: CPU 4096 is not one this process may"):
        affinity.choose_cpu("4096", writer=True)


@linux
def test_the_cpu_a_thread_runs_on_is_known() -> None:
    cpu = affinity.current_cpu()
    assert cpu is not None and cpu in os.sched_getaffinity(0)


@linux
@two_cpus
async def test_a_server_keeps_its_loop_and_sqlite_writer_on_one_cpu_and_gives_them_back(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    loop_thread = threading.get_native_id()
    before = os.sched_getaffinity(loop_thread)
    running = await start_server(make_settings(database, cpu_affinity="auto"), clock=clock)
    try:
        writer = running.db.writer_thread_id
        if database.backend == "sqlite":
            assert writer is not None
            cpu = os.sched_getaffinity(loop_thread)
            assert len(cpu) == 1 and cpu <= before
            assert os.sched_getaffinity(writer) == cpu
        else:  # no writer thread: auto leaves the loop where it was
            assert writer is None
            assert os.sched_getaffinity(loop_thread) == before
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            await client.create_session(agent_id="echo", session_id=f"{unique}/pinned")
            hello = Message(role=Role.ROLE_USER, parts=[Part(text=TextPart(text="hello"))])
            response = await client.append_messages(session_id=f"{unique}/pinned", messages=[hello])
            assert [m.sequence for m in response.messages] == [1]
    finally:
        await running.stop(0)
    assert os.sched_getaffinity(loop_thread) == before
