"""Assembly of the server: settings -> database -> store -> service layer -> servicers -> grpc.aio."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agentsessions.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    agent_service_pb2,
    agent_service_pb2_grpc,
    message_service_pb2,
    message_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    turn_service_pb2,
    turn_service_pb2_grpc,
)

from . import affinity, tls
from .agents_file import apply_agents, load_agents
from .api import reflection
from .api.errors import guard_decoding
from .api.events import encode_event, latest_event_id, load_events
from .api.servicers import (
    AdminServicer,
    AgentRegistryServicer,
    MessageServicer,
    SessionServicer,
)
from .api.turns import TurnServicer
from .config import Settings, StartupError
from .domain.agents import builtin_echo
from .domain.clock import Clock, SystemClock
from .domain.errors import DomainError
from .events.bus import InProcessEventBus
from .events.pgbus import PostgresEventBus
from .events.sweeper import Sweeper
from .metrics import Metrics, ServerState
from .service_layer import SessionsService
from .store import migrate
from .store.database import Database
from .store.repository import Store
from .store.turns import TurnStore
from .tracing import NO_TRACER, Tracing, from_settings
from .turns.backends import Backends
from .turns.runner import TurnRunner

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (session_service_pb2, "SessionService"),
        (message_service_pb2, "MessageService"),
        (turn_service_pb2, "TurnService"),
        (agent_service_pb2, "AgentRegistryService"),
        (admin_service_pb2, "AdminService"),
    )
)
HEALTH_PROBE_SECONDS = 5.0


@dataclass
class RunningServer:
    """A started server; `stop()` drains it (health NOT_SERVING first) and closes the database."""

    server: grpc.aio.Server
    port: int
    db: Database
    service: SessionsService
    health: health.aio.HealthServicer
    sweeper: Sweeper
    bus: InProcessEventBus
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    turns: TurnRunner | None = None
    turn_api: TurnServicer | None = None
    # The Prometheus endpoint, when SESSIOND_METRICS_LISTEN is set.
    metrics_port: int | None = None
    _metrics_http: Any = None
    _tracing: Tracing | None = None  # built from the settings: flushed and shut down at the end
    _pinned: affinity.Pinned | None = None  # threads kept on one CPU (sessiond.affinity), given back at stop

    async def stop(self, grace: float | None = None) -> None:
        """Drains: health turns NOT_SERVING and no new call is taken. Streams that would otherwise run
        on to the end of `grace` end at once: watches and Connect streams with UNAVAILABLE /
        SERVER_SHUTTING_DOWN (the clients resume elsewhere, or here once back), running turns stop, store
        their partial output and relay their end to their callers. What still runs after `grace` is
        cancelled."""
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        stopping = asyncio.ensure_future(self.server.stop(grace))
        await asyncio.sleep(0)  # grpc takes no new call from here on
        self.bus.end_subscriptions()
        if self.turn_api is not None:
            self.turn_api.shut_down()
        if self.turns is not None:  # also the turns that outlived their callers keep their partial output
            await self.turns.close()
        await stopping
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.bus.close()
        await self.db.close()
        if self._pinned is not None:
            self._pinned.restore()
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.shutdown)
            self._metrics_http.server_close()
        if self._tracing is not None:
            await asyncio.to_thread(self._tracing.shutdown)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def _pin_threads(settings: Settings, db: Database) -> affinity.Pinned | None:
    """The loop's thread (this one) and the SQLite writer's on one CPU, as SESSIOND_CPU_AFFINITY says.
    Threads the loop's thread starts afterwards inherit its CPU."""
    writer = db.writer_thread_id
    cpu = affinity.choose_cpu(settings.cpu_affinity, writer=writer is not None)
    if cpu is None:
        return None
    threads = [threading.get_native_id(), *([writer] if writer is not None else [])]
    pinned = affinity.pin(threads, cpu)
    log.info("the event loop%s kept on CPU %d", " and the SQLite writer" if writer else "", cpu)
    return pinned


def _event_bus(settings: Settings, db: Database) -> InProcessEventBus:
    kind = settings.event_bus
    if kind == "auto":
        kind = "postgres" if db.dialect == "postgresql" else "local"
    if kind == "local":
        return InProcessEventBus()
    if db.dialect != "postgresql":
        raise StartupError("SESSIOND_EVENT_BUS=postgres needs a PostgreSQL database")
    return PostgresEventBus(db.asyncpg_dsn(), schema=settings.database_schema)


class _Health(health.aio.HealthServicer):  # type: ignore[misc]  # the library ships no types
    """grpc's health service, whose Watch streams end once the server drains, after they sent NOT_SERVING
    (the client's health checking opens another, elsewhere). grpc's never end, and a client that watches
    health, as grpc's client-side health checking does on every channel, held each SIGTERM for the whole
    grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._draining = asyncio.Event()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._draining.set()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        watching = asyncio.ensure_future(super().Watch(request, context))
        draining = asyncio.ensure_future(self._draining.wait())
        try:
            await asyncio.wait([watching, draining], return_when=asyncio.FIRST_COMPLETED)
            if not watching.done():  # let it send NOT_SERVING, which the drain notified it of
                await asyncio.wait([watching], timeout=0.2)
        finally:
            for task in (watching, draining):
                task.cancel()
        if watching.done() and not watching.cancelled():
            watching.result()  # its own failure, if any


async def _set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, status)


async def _watch_database(db: Database, servicer: health.aio.HealthServicer) -> None:
    """SERVING only while the database answers."""
    serving = True
    while True:
        await asyncio.sleep(HEALTH_PROBE_SECONDS)
        try:  # a database that holds its connections open but answers nothing is down too
            ok = await asyncio.wait_for(db.ping(), HEALTH_PROBE_SECONDS)
        except TimeoutError:
            ok = False
        if ok != serving:
            log.warning(
                "database %s; health is now %s",
                "is back" if ok else "does not answer",
                "SERVING" if ok else "NOT_SERVING",
            )
            serving = ok
            await _set_health(servicer, ok)


async def start_server(
    settings: Settings,
    *,
    clock: Clock | None = None,
    listen: str | None = None,
    tracing: Tracing | None = None,
) -> RunningServer:
    """Opens the database (migrating it unless told not to), then starts serving on `listen`. `tracing`:
    where spans go, instead of what SESSIOND_TRACING says (the caller then shuts it down)."""
    clock = clock or SystemClock()
    own_tracing = tracing is None
    if tracing is None:
        tracing = from_settings(settings.tracing)
    tls_files = settings.tls_files()
    credentials = tls.server_credentials(tls_files) if tls_files is not None else None
    # The SQLite writer thread and the event loop share the GIL. At the default 5 ms switch interval a
    # long write group (a sweep batch) can keep the loop, and every call it serves, waiting that long
    # per hand-over; 1 ms bounds that wait (measured on GetSession p99 during a sweep).
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
    try:
        timeouts = settings.timeout_limits()
    except DomainError as exc:
        raise StartupError(f"the SESSION_*_MINUTES settings disagree: {exc.message}") from None
    declared = (
        load_agents(settings.config_file, now=clock.now(), timeouts=timeouts, limits=settings.limits())
        if settings.config_file
        else []
    )
    try:
        db = Database(
            settings.database_url,
            schema=settings.database_schema,
            pool_size=settings.database_pool_size,
            write_linger=settings.database_write_linger_ms / 1000,
            lock_timeout=settings.database_lock_timeout_seconds,
            statement_timeout=settings.database_statement_timeout_seconds,
        )
    except ValueError as exc:  # a URL of another database, or not a URL
        raise StartupError(f"SESSIOND_DATABASE_URL: {exc}") from None
    await db.open()
    bus: InProcessEventBus | None = None
    pinned: affinity.Pinned | None = None
    metrics_http: Any = None
    metrics_port: int | None = None
    try:
        # Before grpc's server exists: the threads the loop's thread starts from here on (grpc's poller,
        # the read connections' threads) share its CPU too.
        pinned = _pin_threads(settings, db)
        if settings.migrate_on_start:
            await migrate.upgrade(db)
        bus = _event_bus(settings, db)
        store = Store(db, encode_event=encode_event, publish=bus.publish)
        await store.ensure_agent(builtin_echo(clock.now()))
        await apply_agents(store, declared, now=clock.now())
        service = SessionsService(
            store,
            clock=clock,
            timeouts=timeouts,
            limits=settings.limits(),
            bus=bus,
            allowed_key_vars=settings.allowed_key_vars(),
        )
        await bus.start(functools.partial(load_events, service), functools.partial(latest_event_id, service))
        sweeper = Sweeper(
            store,
            clock,
            retention=timedelta(minutes=settings.retention_minutes) if settings.retention_minutes else None,
            notify_interval=settings.notify_interval_seconds,
            cleanup_interval=settings.cleanup_interval_minutes * 60,
        )

        metrics = Metrics() if settings.metrics_listen else None
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if tracing is not None:
            interceptors.append(tracing.server_interceptor())
        if metrics is not None:
            interceptors.append(metrics.interceptor())
        server = grpc.aio.server(
            interceptors=interceptors or None,
            options=[
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        # Undecodable requests get INVALID_ARGUMENT with an ErrorInfo, not UNKNOWN.
        guarded = cast(grpc.aio.Server, guard_decoding(server))
        session_service_pb2_grpc.add_SessionServiceServicer_to_server(
            SessionServicer(service, watch_buffer=settings.watch_buffer), guarded
        )
        message_service_pb2_grpc.add_MessageServiceServicer_to_server(
            MessageServicer(service, count_entries=metrics.count_entries if metrics is not None else None),
            guarded,
        )
        runner = TurnRunner(
            service,
            TurnStore(store),
            Backends(
                http_timeout_seconds=settings.agent_http_timeout_seconds,
                allowed_key_vars=settings.allowed_key_vars(),
                tracing=tracing,
            ),
            lease_seconds=settings.turn_lease_seconds,
            tracer=tracing.tracer if tracing is not None else NO_TRACER,
        )
        turn_api = TurnServicer(service, runner, watch_buffer=settings.watch_buffer)
        turn_service_pb2_grpc.add_TurnServiceServicer_to_server(turn_api, guarded)
        agent_service_pb2_grpc.add_AgentRegistryServiceServicer_to_server(
            AgentRegistryServicer(service), guarded
        )
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(service, database=db.dialect, running_turns=runner.running_count), guarded
        )
        health_servicer = _Health()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable(server, (*SERVICE_NAMES, health.SERVICE_NAME))

        address = listen or settings.listen
        try:
            if credentials is not None:
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's "Failed to bind": taken, or not an address
            raise StartupError(f"cannot listen on {address!r} (SESSIOND_LISTEN): {exc}") from None
        if port == 0:
            raise StartupError(f"cannot listen on {address!r} (SESSIOND_LISTEN)")
        if metrics is not None:
            metrics.registry.register(
                ServerState(
                    session_counts=service.session_counts,
                    running_turns=runner.running_count,
                    watchers=bus.subscriber_count,
                    loop=asyncio.get_running_loop(),
                )
            )
            try:
                metrics_http, metrics_port = metrics.serve(settings.metrics_listen)
            except (ValueError, OSError) as exc:  # not host:port, or the port is taken
                raise StartupError(
                    f"cannot serve metrics on {settings.metrics_listen!r} (SESSIOND_METRICS_LISTEN): {exc}"
                ) from None
        await server.start()
        await _set_health(health_servicer, True)
    except BaseException:
        if pinned is not None:
            pinned.restore()
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()
        if bus is not None:
            await bus.close()
        await db.close()
        if own_tracing and tracing is not None:
            tracing.shutdown()
        raise
    running = RunningServer(
        server=server, port=port, db=db, service=service, health=health_servicer, sweeper=sweeper, bus=bus
    )
    running.turns, running.turn_api = runner, turn_api
    running.metrics_port, running._metrics_http = metrics_port, metrics_http
    running._pinned = pinned
    running._tracing = tracing if own_tracing else None
    running._tasks.append(asyncio.create_task(_watch_database(db, health_servicer), name="health-probe"))
    if settings.sweeper_enabled:
        running._tasks.append(asyncio.create_task(sweeper.run(), name="sweeper"))
    return running


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then stops gracefully."""
    running = await start_server(settings)
    # What start-up allocated (modules, descriptors, the schema) lives as long as the process: out of the
    # collector's sight. Serving allocates many short-lived objects per call; collecting the youngest
    # generation every 5,000 allocations instead of 700 measured 5% more appends and creates per second.
    gc.freeze()
    gc.set_threshold(5_000, 20, 100)
    transport = "plaintext"
    if settings.tls_cert_file:
        transport = "mutual TLS" if settings.tls_client_ca_file else "TLS"
    log.info(
        "sessiond %s listening on %s (%s; database: %s)",
        _version(),
        settings.listen,
        transport,
        running.db.dialect,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining for up to %.1fs", settings.grace_seconds)
    await running.stop(settings.grace_seconds)


def _version() -> str:
    from . import __version__

    return __version__
