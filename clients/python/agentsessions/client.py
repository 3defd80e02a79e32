"""Typed clients of Agent Sessions: :class:`AsyncSessionsClient` (grpc.aio), :class:`SessionsClient` (sync).

Both take keyword-only arguments, return the generated ``agentsessions.v1`` messages, raise
:mod:`agentsessions.errors` exceptions, and build their requests with the same code
(``agentsessions._requests``): the two differ only in how they wait.

Retries (see :class:`agentsessions.retry.RetryPolicy`) apply to calls whose repetition has the effect of
one call; each method's docstring says whether it is retried. ``timeout`` is the deadline of a whole
unary call, retries included. Streams have no deadline unless one is given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message as ProtoMessage

from agentsessions import _requests
from agentsessions._batching import AppendBatcher, AppendBatching
from agentsessions._requests import MessageInput, Prepared, TimeoutPolicyInput, Variables
from agentsessions.errors import AgentSessionsError, client_closed, from_grpc_error
from agentsessions.pagers import AsyncPager, Page, Pager
from agentsessions.retry import DEFAULT_RETRY, CallAttempts, RetryPolicy
from agentsessions.streams import AsyncConnection, AsyncStream, Connection, Stream, WatchCursor
from agentsessions.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    events_pb2,
    message_pb2,
    message_service_pb2,
    message_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    turn_service_pb2,
    turn_service_pb2_grpc,
)

__all__ = ["DEFAULT_TARGET", "AsyncSessionsClient", "SessionsClient"]

#: Where ``sessiond serve`` listens by default.
DEFAULT_TARGET = "127.0.0.1:50051"

RequestT = TypeVar("RequestT", bound=ProtoMessage)
ResponseT = TypeVar("ResponseT")
ItemT = TypeVar("ItemT")
PageT = TypeVar("PageT", bound=Page)

Metadata = tuple[tuple[str, str | bytes], ...]
Trigger = turn_service_pb2.Trigger | Mapping[str, Any]
ContinueTurn = turn_service_pb2.ContinueTurn | Mapping[str, Any]
AgentInput = agent_pb2.Agent | Mapping[str, Any]


def _sessions(page: session_service_pb2.ListSessionsResponse) -> Iterable[session_pb2.Session]:
    return page.sessions


def _messages(page: message_service_pb2.ListMessagesResponse) -> Iterable[message_pb2.Message]:
    return page.messages


def _agents(page: agent_service_pb2.ListAgentsResponse) -> Iterable[agent_pb2.Agent]:
    return page.agents


# The server takes requests up to 16 MiB, and AppendMessages answers with what it stored: a large append's
# answer is as large as its request, past gRPC's default 4 MiB receive limit.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


def _options(channel_options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The caller's channel arguments, with a receive limit that fits every answer unless they set one."""
    options = list(channel_options)
    if not any(key == "grpc.max_receive_message_length" for key, _ in options):
        options.append(("grpc.max_receive_message_length", MAX_RESPONSE_BYTES))
    return options


class AsyncSessionsClient:
    """Async client of Agent Sessions over ``grpc.aio``.

    Args:
        target: the server's gRPC target, e.g. ``"127.0.0.1:50051"`` or ``"dns:///sessiond:443"``.
        credentials: channel credentials; the channel uses TLS when given, plaintext otherwise.
        call_credentials: credentials attached to every call (they need a secure channel: TLS or
            ``grpc.local_channel_credentials()``).
        timeout: deadline of each unary call in seconds, retries included (None: no deadline).
        metadata: metadata sent with every call.
        retry: the retry policy of idempotent calls (None: never retry).
        channel_options: gRPC channel arguments.
        channel: an existing channel to use instead of opening one; ``close()`` leaves it open.
        append_batching: how appends made while others are under way are sent together, in one
            ``BatchAppendMessages`` call, each keeping its own outcome, retries and deadline
            (:class:`agentsessions.AppendBatching`; None: one call per append).

    Create it inside the event loop that uses it: a ``grpc.aio`` channel belongs to one loop.

    Use it as an async context manager, or call ``close()``::

        async with AsyncSessionsClient() as client:
            session = await client.create_session(agent_id="echo")
            async for event in client.execute(session_id=session.session_id, text="hello"):
                ...
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        call_credentials: grpc.CallCredentials | None = None,
        timeout: float | None = 30.0,
        metadata: Sequence[tuple[str, str]] = (),
        retry: RetryPolicy | None = DEFAULT_RETRY,
        channel_options: Sequence[tuple[str, Any]] = (),
        channel: grpc.aio.Channel | None = None,
        append_batching: AppendBatching | None = AppendBatching(),  # noqa: B008 (frozen: shared safely)
    ) -> None:
        self._owns_channel = channel is None
        self._closed = False
        if channel is None:
            if credentials is not None:
                channel = grpc.aio.secure_channel(target, credentials, options=_options(channel_options))
            else:
                channel = grpc.aio.insecure_channel(target, options=_options(channel_options))
        self._channel = channel
        self._call_credentials = call_credentials
        self._timeout = timeout
        self._metadata: Metadata = tuple(metadata)
        self._retry = retry
        self._sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        self._messages = message_service_pb2_grpc.MessageServiceStub(channel)
        self._turns = turn_service_pb2_grpc.TurnServiceStub(channel)
        self._agents = agent_service_pb2_grpc.AgentRegistryServiceStub(channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        self._batcher = (
            None
            if append_batching is None
            else AppendBatcher(self._append_one, self._append_batch, append_batching)
        )

    def _append_one(
        self, request: message_service_pb2.AppendMessagesRequest, timeout: float | None
    ) -> Awaitable[message_service_pb2.AppendMessagesResponse]:
        return self._messages.AppendMessages(
            request, timeout=timeout, metadata=self._metadata, credentials=self._call_credentials
        )

    def _append_batch(
        self, request: message_service_pb2.BatchAppendMessagesRequest, timeout: float | None
    ) -> Awaitable[message_service_pb2.BatchAppendMessagesResponse]:
        return self._messages.BatchAppendMessages(
            request, timeout=timeout, metadata=self._metadata, credentials=self._call_credentials
        )

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel."""
        return self._channel

    async def close(self) -> None:
        """Closes the channel the client opened (a channel passed in stays open). Calls and streams other
        tasks still wait on, and calls made afterwards, raise ``Cancelled`` / ``CLIENT_CLOSED``."""
        self._closed = True
        if self._batcher is not None:
            self._batcher.close()
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncSessionsClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        prepared: Prepared[RequestT],
        send: Callable[[RequestT, float | None], Awaitable[ResponseT]] | None = None,
    ) -> ResponseT:
        """Calls `method` (or `send`, which makes one attempt its own way) with retries."""
        attempts = CallAttempts(self._retry if prepared.idempotent else None, self._timeout)
        while True:
            if self._closed:
                raise client_closed()
            try:
                if send is not None:
                    return await send(prepared.request, attempts.timeout())
                return await method(
                    prepared.request,
                    timeout=attempts.timeout(),
                    metadata=self._metadata,
                    credentials=self._call_credentials,
                )
            except grpc.RpcError as err:
                error = from_grpc_error(err)
                delay = attempts.backoff(error)
                if delay is None:
                    raise error from err
            except AgentSessionsError as error:  # one batched append's own failure
                delay = attempts.backoff(error)
                if delay is None:
                    raise
            except grpc.aio.UsageError as err:  # a channel passed in, closed by its owner
                raise client_closed() from err
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and task is not None and not task.cancelling():
                    raise client_closed() from None  # the channel closed under the call, not the task
                raise
            await asyncio.sleep(delay)

    async def _pager(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[RequestT, PageT],
        prepared: Prepared[RequestT],
        items: Callable[[PageT], Iterable[ItemT]],
    ) -> AsyncPager[ItemT, PageT]:
        def fetch(token: str) -> Awaitable[PageT]:
            return self._unary(
                method, prepared._replace(request=_requests.with_page_token(prepared.request, token))
            )

        return AsyncPager(await self._unary(method, prepared), fetch, items)

    # SessionService

    async def create_session(
        self,
        *,
        agent_id: str,
        session_id: str = "",
        user_id: str = "",
        metadata: Mapping[str, str] | None = None,
        variables: Variables | None = None,
        timeout_policy: TimeoutPolicyInput | None = None,
        request_id: str | None = None,
    ) -> session_pb2.Session:
        """Creates a session of agent ``agent_id``.

        ``session_id`` is generated (time-ordered) when empty; a taken one raises ``AlreadyExists``.
        ``variables`` is a JSON object (the session's state); ``timeout_policy`` is a ``TimeoutPolicy``
        or its JSON form (``{"timeoutMinutes": 60}``), and its unset fields fall through to the agent's
        and the server's defaults. A fresh ``request_id`` is generated when None, so a retried create
        returns the session the first attempt made: retried. ``request_id=""`` sends none: not retried.
        """
        prepared = _requests.create_session(
            agent_id=agent_id,
            session_id=session_id,
            user_id=user_id,
            metadata=metadata,
            variables=variables,
            timeout_policy=timeout_policy,
            request_id=request_id,
        )
        return await self._unary(self._sessions.CreateSession, prepared)

    async def get_session(self, *, session_id: str) -> session_pb2.Session:
        """Returns a session, whatever its status (expired and ended sessions stay readable). Retried."""
        return await self._unary(self._sessions.GetSession, _requests.get_session(session_id))

    async def list_sessions(
        self,
        *,
        agent_id: str = "",
        user_id: str = "",
        status: session_pb2.SessionStatus | str = session_pb2.SESSION_STATUS_UNSPECIFIED,
        metadata: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> AsyncPager[session_pb2.Session, session_service_pb2.ListSessionsResponse]:
        """Sessions, newest first, matching every filter given (``metadata``: pairs that must be present).

        ``status`` takes a ``SessionStatus`` or its name (``"active"``). Returns a pager; retried.
        """
        prepared = _requests.list_sessions(
            agent_id=agent_id,
            user_id=user_id,
            status=status,
            metadata=metadata,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._pager(self._sessions.ListSessions, prepared, _sessions)

    async def update_session(
        self,
        *,
        session_id: str,
        metadata: Mapping[str, str] | None = None,
        variables: Variables | None = None,
        timeout_policy: TimeoutPolicyInput | None = None,
        update_mask: Sequence[str] | None = None,
        etag: str = "",
    ) -> session_pb2.Session:
        """Updates a session's metadata, variables or timeout policy.

        By default the mask holds what is passed: ``metadata`` and ``variables`` are replaced whole, and
        only the ``timeout_policy`` fields that are set are changed (an empty policy resets the session
        tier to the agent's and server's defaults). Pass ``update_mask`` to choose the paths yourself.
        A non-empty ``etag`` must match the stored one (``Aborted`` otherwise). Retried without an etag.
        """
        prepared = _requests.update_session(
            session_id=session_id,
            metadata=metadata,
            variables=variables,
            timeout_policy=timeout_policy,
            update_mask=update_mask,
            etag=etag,
        )
        return await self._unary(self._sessions.UpdateSession, prepared)

    async def end_session(self, *, session_id: str) -> session_pb2.Session:
        """Ends a session: it becomes read-only. Idempotent; retried."""
        return await self._unary(self._sessions.EndSession, _requests.end_session(session_id))

    async def delete_session(
        self, *, session_id: str, force: bool = False, allow_missing: bool = False, etag: str = ""
    ) -> None:
        """Deletes a session and its history. An ACTIVE session needs ``force``.

        ``allow_missing`` makes a missing session a success; only then is the call retried.
        """
        prepared = _requests.delete_session(
            session_id=session_id, force=force, allow_missing=allow_missing, etag=etag
        )
        await self._unary(self._sessions.DeleteSession, prepared)

    async def renew_session(self, *, session_id: str) -> session_pb2.Session:
        """Pushes the expire time to now + timeout, within the hard cap (``FailedPrecondition`` /
        MAX_DURATION_REACHED when the cap leaves nothing to extend). Not retried: each renewal counts."""
        return await self._unary(self._sessions.RenewSession, _requests.renew_session(session_id))

    async def heartbeat(self, *, session_id: str) -> session_pb2.Session:
        """Marks the caller as present (activity: renews the session when auto-renew is on). Not retried:
        each renewal counts (``renewal_count``), as for :meth:`renew_session`."""
        return await self._unary(self._sessions.Heartbeat, _requests.heartbeat(session_id))

    async def clear_session(self, *, session_id: str) -> session_pb2.Session:
        """Deletes the history and expires the session. Idempotent; retried."""
        return await self._unary(self._sessions.ClearSession, _requests.clear_session(session_id))

    async def restore_session(
        self, *, session_id: str, messages: Sequence[MessageInput]
    ) -> session_service_pb2.RestoreSessionResponse:
        """Brings an expired session back with a history the caller kept (oldest first).

        A session still active is left as it is (``restored`` false). Not retried: a repeat of a restore
        that went through would report ``restored`` false.
        """
        prepared = _requests.restore_session(session_id=session_id, messages=messages)
        return await self._unary(self._sessions.RestoreSession, prepared)

    def watch_session(
        self,
        *,
        session_id: str,
        after_event_id: int | None = None,
        include_deltas: bool = False,
        resume: bool | RetryPolicy = True,
    ) -> AsyncStream[events_pb2.SessionEvent]:
        """Streams a session's events: the stored ones after ``after_event_id`` (0: the whole log; None:
        live events only), then live ones; ``include_deltas`` adds live turn deltas.

        With ``resume`` (True: :data:`agentsessions.streams.WATCH_RESUME`; or a policy of your own) the
        stream reopens itself from the last stored event seen when it drops with UNAVAILABLE or the server
        ends it with RESOURCE_EXHAUSTED / WATCH_LAGGING: no gap, no duplicate (see
        :class:`agentsessions.streams.WatchCursor`). The stream has no deadline.
        """
        request = _requests.watch_session(
            session_id=session_id, after_event_id=after_event_id, include_deltas=include_deltas
        )
        cursor = WatchCursor(request, resume)
        return AsyncStream(
            lambda: self._sessions.WatchSession(
                cursor.request(), metadata=self._metadata, credentials=self._call_credentials
            ),
            cursor,
        )

    # MessageService

    async def append_messages(
        self, *, session_id: str, messages: Sequence[MessageInput], set_variables: Variables | None = None
    ) -> message_service_pb2.AppendMessagesResponse:
        """Appends messages (``Message`` or JSON form) atomically; returns them as stored, with the session.

        Messages whose caller-chosen ``message_id`` the session already holds are returned as stored and
        not appended again, so the call is retried when every message carries a ``message_id``.
        ``set_variables`` are set key by key in the same transaction (``user:`` / ``app:`` keys in the
        shared scopes), only when the call stores messages: a retry sets nothing twice.

        Appends made while another is under way are sent together (``append_batching``).
        """
        prepared = _requests.append_messages(
            session_id=session_id, messages=messages, set_variables=set_variables
        )
        # Only appends whose messages all carry ids are batched: a batch whose answer is lost is sent
        # again entry by entry.
        send = self._batcher.append if self._batcher is not None and prepared.idempotent else None
        return await self._unary(self._messages.AppendMessages, prepared, send)

    async def append_text(
        self,
        *,
        session_id: str,
        role: message_pb2.Role | str,
        text: str,
        message_id: str = "",
        hidden: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> message_pb2.Message:
        """Appends one text message (``role``: a ``Role`` or its name, e.g. ``"user"``); returns it as stored.

        Retried when ``message_id`` is given.
        """
        message = _requests.text_message(
            role=role, text=text, message_id=message_id, hidden=hidden, metadata=metadata
        )
        response = await self.append_messages(session_id=session_id, messages=[message])
        return response.messages[0]

    async def list_messages(
        self,
        *,
        session_id: str,
        view: message_pb2.MessageView | str = message_pb2.MESSAGE_VIEW_FULL,
        order: message_pb2.MessageOrder | str = message_pb2.MESSAGE_ORDER_ASCENDING,
        page_size: int = 0,
        page_token: str = "",
        after_sequence: int = 0,
        before_sequence: int = 0,
        include_session: bool = False,
    ) -> AsyncPager[message_pb2.Message, message_service_pb2.ListMessagesResponse]:
        """Pages through the history in sequence order (``order``: ascending from the oldest, descending
        from the newest), bounded by ``after_sequence`` / ``before_sequence`` (0: no bound).

        ``view`` UI leaves out hidden messages and parts. A page never separates a tool call from its
        result, so it may hold fewer than ``page_size`` messages. ``include_session``: each page also
        carries the session (``pager.first_page.session``), read in the same call. Returns a pager;
        retried.
        """
        prepared = _requests.list_messages(
            session_id=session_id,
            view=view,
            order=order,
            page_size=page_size,
            page_token=page_token,
            after_sequence=after_sequence,
            before_sequence=before_sequence,
            include_session=include_session,
        )
        return await self._pager(self._messages.ListMessages, prepared, _messages)

    async def last_messages(
        self, *, session_id: str, n: int, view: message_pb2.MessageView | str = message_pb2.MESSAGE_VIEW_FULL
    ) -> list[message_pb2.Message]:
        """The last ``n`` messages, oldest first: one descending page, as cheap at any history length.

        May hold fewer than ``n`` messages so as not to separate a tool call from its result. Retried.
        """
        if n <= 0:  # a page size of 0 would mean the server's default
            return []
        prepared = _requests.last_messages(session_id=session_id, n=n, view=view)
        page = await self._unary(self._messages.ListMessages, prepared)
        return list(reversed(page.messages))

    async def delete_messages(
        self, *, session_id: str, message_id: str | None = None, after_sequence: int | None = None
    ) -> message_service_pb2.DeleteMessagesResponse:
        """Deletes one message, or every message with a sequence above ``after_sequence`` (0: all).

        Never retried: a repeated one-message delete would raise ``NotFound``, and a repeat of "everything
        after N" whose first attempt did land would also delete what others appended in between.
        """
        prepared = _requests.delete_messages(
            session_id=session_id, message_id=message_id, after_sequence=after_sequence
        )
        return await self._unary(self._messages.DeleteMessages, prepared)

    # TurnService

    def execute(
        self,
        *,
        session_id: str,
        text: str | None = None,
        message: MessageInput | None = None,
        trigger: Trigger | None = None,
        continue_turn: ContinueTurn | None = None,
        request_id: str = "",
        multitask_strategy: turn_service_pb2.MultitaskStrategy | str = "MULTITASK_STRATEGY_UNSPECIFIED",
        on_disconnect: turn_service_pb2.DisconnectBehavior | str = "DISCONNECT_BEHAVIOR_UNSPECIFIED",
        timeout: float | None = None,
    ) -> AsyncStream[events_pb2.TurnEvent]:
        """Runs a turn and streams its events, ending with ``turn_finished``.

        The input is exactly one of ``text`` (a user message), ``message``, ``trigger`` or
        ``continue_turn`` (results of the client tools a paused turn asked for). ``multitask_strategy``
        says what happens to a turn already running (reject, interrupt (default), rollback, enqueue);
        names may be short (``"reject"``). Cancelling the stream stops the turn unless ``on_disconnect``
        is ``"continue"``. Not retried; a ``request_id`` lets you retry it yourself and join the same turn.
        ``timeout`` bounds the whole stream (default: none).
        """
        request = _requests.execute(
            session_id=session_id,
            text=text,
            message=message,
            trigger=trigger,
            continue_turn=continue_turn,
            request_id=request_id,
            multitask_strategy=multitask_strategy,
            on_disconnect=on_disconnect,
        )
        return AsyncStream(
            lambda: self._turns.Execute(
                request, timeout=timeout, metadata=self._metadata, credentials=self._call_credentials
            )
        )

    async def stop_turn(self, *, session_id: str, turn_id: str = "") -> turn_service_pb2.StopTurnResponse:
        """Stops the session's running turn (only ``turn_id`` when given), from any caller.

        ``stopped`` is false when no matching turn was running. Not retried.
        """
        prepared = _requests.stop_turn(session_id=session_id, turn_id=turn_id)
        return await self._unary(self._turns.StopTurn, prepared)

    def connect(self, *, session_id: str) -> AsyncConnection:
        """Opens a Connect stream for ``session_id``: send execute, stop and heartbeat frames, iterate
        the responses (see :class:`agentsessions.streams.AsyncConnection`). Not retried; no deadline."""
        try:
            call = self._turns.Connect(metadata=self._metadata, credentials=self._call_credentials)
        except grpc.aio.UsageError as err:
            raise client_closed() from err
        return AsyncConnection(call, session_id)

    # AgentRegistryService

    async def create_agent(self, *, agent: AgentInput, agent_id: str = "") -> agent_pb2.Agent:
        """Creates an agent (an ``Agent`` or its JSON form) under ``agent_id`` (default: ``agent.agent_id``).

        Not retried: a repeat of a create that went through would raise ``AlreadyExists``.
        """
        prepared = _requests.create_agent(agent=agent, agent_id=agent_id)
        return await self._unary(self._agents.CreateAgent, prepared)

    async def get_agent(self, *, agent_id: str) -> agent_pb2.Agent:
        """Returns an agent. Retried."""
        return await self._unary(self._agents.GetAgent, _requests.get_agent(agent_id))

    async def list_agents(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> AsyncPager[agent_pb2.Agent, agent_service_pb2.ListAgentsResponse]:
        """The agents (built in, from the config file, created by API). Returns a pager; retried."""
        prepared = _requests.list_agents(page_size=page_size, page_token=page_token)
        return await self._pager(self._agents.ListAgents, prepared, _agents)

    async def update_agent(
        self, *, agent: AgentInput, update_mask: Sequence[str] | None = None
    ) -> agent_pb2.Agent:
        """Updates agent ``agent.agent_id``: ``update_mask`` paths (display_name, backend, timeout_defaults,
        history_window), by default those the agent sets. Retried: updates set values."""
        prepared = _requests.update_agent(agent=agent, update_mask=update_mask)
        return await self._unary(self._agents.UpdateAgent, prepared)

    async def delete_agent(self, *, agent_id: str, allow_missing: bool = False) -> None:
        """Deletes an agent (built-in agents cannot be). Retried with ``allow_missing`` only."""
        prepared = _requests.delete_agent(agent_id=agent_id, allow_missing=allow_missing)
        await self._unary(self._agents.DeleteAgent, prepared)

    # AdminService

    async def get_server_stats(self) -> admin_service_pb2.ServerStats:
        """Counts of sessions by status, running turns, uptime, version and database. Retried."""
        return await self._unary(self._admin.GetServerStats, _requests.get_server_stats())


class SessionsClient:
    """Blocking client of Agent Sessions over a sync gRPC channel.

    Same constructor arguments, methods and semantics as :class:`AsyncSessionsClient` (the methods share
    its docstrings and its request building); calls block, pagers and streams are plain iterators, and
    ``channel`` is a ``grpc.Channel``. Use it as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        call_credentials: grpc.CallCredentials | None = None,
        timeout: float | None = 30.0,
        metadata: Sequence[tuple[str, str]] = (),
        retry: RetryPolicy | None = DEFAULT_RETRY,
        channel_options: Sequence[tuple[str, Any]] = (),
        channel: grpc.Channel | None = None,
    ) -> None:
        self._owns_channel = channel is None
        self._closed = False
        if channel is None:
            if credentials is not None:
                channel = grpc.secure_channel(target, credentials, options=_options(channel_options))
            else:
                channel = grpc.insecure_channel(target, options=_options(channel_options))
        self._channel = channel
        self._call_credentials = call_credentials
        self._timeout = timeout
        self._metadata: Metadata = tuple(metadata)
        self._retry = retry
        self._sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        self._messages = message_service_pb2_grpc.MessageServiceStub(channel)
        self._turns = turn_service_pb2_grpc.TurnServiceStub(channel)
        self._agents = agent_service_pb2_grpc.AgentRegistryServiceStub(channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(channel)

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel."""
        return self._channel

    def close(self) -> None:
        """Closes the channel the client opened (a channel passed in stays open). Calls made afterwards
        raise ``Cancelled`` / ``CLIENT_CLOSED``; those other threads still wait on raise ``Cancelled``."""
        self._closed = True
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> SessionsClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _unary(
        self, method: grpc.UnaryUnaryMultiCallable[RequestT, ResponseT], prepared: Prepared[RequestT]
    ) -> ResponseT:
        attempts = CallAttempts(self._retry if prepared.idempotent else None, self._timeout)
        while True:
            if self._closed:
                raise client_closed()
            try:
                return method(
                    prepared.request,
                    timeout=attempts.timeout(),
                    metadata=self._metadata,
                    credentials=self._call_credentials,
                )
            except grpc.RpcError as err:
                error = from_grpc_error(err)
                delay = attempts.backoff(error)
                if delay is None:
                    raise error from err
            except ValueError as err:
                # grpc's "Cannot invoke RPC on closed channel!": a channel passed in, closed by its owner
                raise client_closed() from err
            time.sleep(delay)

    def _pager(
        self,
        method: grpc.UnaryUnaryMultiCallable[RequestT, PageT],
        prepared: Prepared[RequestT],
        items: Callable[[PageT], Iterable[ItemT]],
    ) -> Pager[ItemT, PageT]:
        def fetch(token: str) -> PageT:
            return self._unary(
                method, prepared._replace(request=_requests.with_page_token(prepared.request, token))
            )

        return Pager(self._unary(method, prepared), fetch, items)

    # SessionService

    def create_session(
        self,
        *,
        agent_id: str,
        session_id: str = "",
        user_id: str = "",
        metadata: Mapping[str, str] | None = None,
        variables: Variables | None = None,
        timeout_policy: TimeoutPolicyInput | None = None,
        request_id: str | None = None,
    ) -> session_pb2.Session:
        prepared = _requests.create_session(
            agent_id=agent_id,
            session_id=session_id,
            user_id=user_id,
            metadata=metadata,
            variables=variables,
            timeout_policy=timeout_policy,
            request_id=request_id,
        )
        return self._unary(self._sessions.CreateSession, prepared)

    def get_session(self, *, session_id: str) -> session_pb2.Session:
        return self._unary(self._sessions.GetSession, _requests.get_session(session_id))

    def list_sessions(
        self,
        *,
        agent_id: str = "",
        user_id: str = "",
        status: session_pb2.SessionStatus | str = session_pb2.SESSION_STATUS_UNSPECIFIED,
        metadata: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> Pager[session_pb2.Session, session_service_pb2.ListSessionsResponse]:
        prepared = _requests.list_sessions(
            agent_id=agent_id,
            user_id=user_id,
            status=status,
            metadata=metadata,
            page_size=page_size,
            page_token=page_token,
        )
        return self._pager(self._sessions.ListSessions, prepared, _sessions)

    def update_session(
        self,
        *,
        session_id: str,
        metadata: Mapping[str, str] | None = None,
        variables: Variables | None = None,
        timeout_policy: TimeoutPolicyInput | None = None,
        update_mask: Sequence[str] | None = None,
        etag: str = "",
    ) -> session_pb2.Session:
        prepared = _requests.update_session(
            session_id=session_id,
            metadata=metadata,
            variables=variables,
            timeout_policy=timeout_policy,
            update_mask=update_mask,
            etag=etag,
        )
        return self._unary(self._sessions.UpdateSession, prepared)

    def end_session(self, *, session_id: str) -> session_pb2.Session:
        return self._unary(self._sessions.EndSession, _requests.end_session(session_id))

    def delete_session(
        self, *, session_id: str, force: bool = False, allow_missing: bool = False, etag: str = ""
    ) -> None:
        prepared = _requests.delete_session(
            session_id=session_id, force=force, allow_missing=allow_missing, etag=etag
        )
        self._unary(self._sessions.DeleteSession, prepared)

    def renew_session(self, *, session_id: str) -> session_pb2.Session:
        return self._unary(self._sessions.RenewSession, _requests.renew_session(session_id))

    def heartbeat(self, *, session_id: str) -> session_pb2.Session:
        return self._unary(self._sessions.Heartbeat, _requests.heartbeat(session_id))

    def clear_session(self, *, session_id: str) -> session_pb2.Session:
        return self._unary(self._sessions.ClearSession, _requests.clear_session(session_id))

    def restore_session(
        self, *, session_id: str, messages: Sequence[MessageInput]
    ) -> session_service_pb2.RestoreSessionResponse:
        prepared = _requests.restore_session(session_id=session_id, messages=messages)
        return self._unary(self._sessions.RestoreSession, prepared)

    def watch_session(
        self,
        *,
        session_id: str,
        after_event_id: int | None = None,
        include_deltas: bool = False,
        resume: bool | RetryPolicy = True,
    ) -> Stream[events_pb2.SessionEvent]:
        request = _requests.watch_session(
            session_id=session_id, after_event_id=after_event_id, include_deltas=include_deltas
        )
        cursor = WatchCursor(request, resume)
        return Stream(
            lambda: self._sessions.WatchSession(
                cursor.request(), metadata=self._metadata, credentials=self._call_credentials
            ),
            cursor,
        )

    # MessageService

    def append_messages(
        self, *, session_id: str, messages: Sequence[MessageInput], set_variables: Variables | None = None
    ) -> message_service_pb2.AppendMessagesResponse:
        prepared = _requests.append_messages(
            session_id=session_id, messages=messages, set_variables=set_variables
        )
        return self._unary(self._messages.AppendMessages, prepared)

    def append_text(
        self,
        *,
        session_id: str,
        role: message_pb2.Role | str,
        text: str,
        message_id: str = "",
        hidden: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> message_pb2.Message:
        message = _requests.text_message(
            role=role, text=text, message_id=message_id, hidden=hidden, metadata=metadata
        )
        return self.append_messages(session_id=session_id, messages=[message]).messages[0]

    def list_messages(
        self,
        *,
        session_id: str,
        view: message_pb2.MessageView | str = message_pb2.MESSAGE_VIEW_FULL,
        order: message_pb2.MessageOrder | str = message_pb2.MESSAGE_ORDER_ASCENDING,
        page_size: int = 0,
        page_token: str = "",
        after_sequence: int = 0,
        before_sequence: int = 0,
        include_session: bool = False,
    ) -> Pager[message_pb2.Message, message_service_pb2.ListMessagesResponse]:
        prepared = _requests.list_messages(
            session_id=session_id,
            view=view,
            order=order,
            page_size=page_size,
            page_token=page_token,
            after_sequence=after_sequence,
            before_sequence=before_sequence,
            include_session=include_session,
        )
        return self._pager(self._messages.ListMessages, prepared, _messages)

    def last_messages(
        self, *, session_id: str, n: int, view: message_pb2.MessageView | str = message_pb2.MESSAGE_VIEW_FULL
    ) -> list[message_pb2.Message]:
        if n <= 0:  # a page size of 0 would mean the server's default
            return []
        prepared = _requests.last_messages(session_id=session_id, n=n, view=view)
        return list(reversed(self._unary(self._messages.ListMessages, prepared).messages))

    def delete_messages(
        self, *, session_id: str, message_id: str | None = None, after_sequence: int | None = None
    ) -> message_service_pb2.DeleteMessagesResponse:
        prepared = _requests.delete_messages(
            session_id=session_id, message_id=message_id, after_sequence=after_sequence
        )
        return self._unary(self._messages.DeleteMessages, prepared)

    # TurnService

    def execute(
        self,
        *,
        session_id: str,
        text: str | None = None,
        message: MessageInput | None = None,
        trigger: Trigger | None = None,
        continue_turn: ContinueTurn | None = None,
        request_id: str = "",
        multitask_strategy: turn_service_pb2.MultitaskStrategy | str = "MULTITASK_STRATEGY_UNSPECIFIED",
        on_disconnect: turn_service_pb2.DisconnectBehavior | str = "DISCONNECT_BEHAVIOR_UNSPECIFIED",
        timeout: float | None = None,
    ) -> Stream[events_pb2.TurnEvent]:
        request = _requests.execute(
            session_id=session_id,
            text=text,
            message=message,
            trigger=trigger,
            continue_turn=continue_turn,
            request_id=request_id,
            multitask_strategy=multitask_strategy,
            on_disconnect=on_disconnect,
        )
        return Stream(
            lambda: self._turns.Execute(
                request, timeout=timeout, metadata=self._metadata, credentials=self._call_credentials
            )
        )

    def stop_turn(self, *, session_id: str, turn_id: str = "") -> turn_service_pb2.StopTurnResponse:
        prepared = _requests.stop_turn(session_id=session_id, turn_id=turn_id)
        return self._unary(self._turns.StopTurn, prepared)

    def connect(self, *, session_id: str) -> Connection:
        return Connection(
            lambda requests: self._turns.Connect(
                requests, metadata=self._metadata, credentials=self._call_credentials
            ),
            session_id,
        )

    # AgentRegistryService

    def create_agent(self, *, agent: AgentInput, agent_id: str = "") -> agent_pb2.Agent:
        prepared = _requests.create_agent(agent=agent, agent_id=agent_id)
        return self._unary(self._agents.CreateAgent, prepared)

    def get_agent(self, *, agent_id: str) -> agent_pb2.Agent:
        return self._unary(self._agents.GetAgent, _requests.get_agent(agent_id))

    def list_agents(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> Pager[agent_pb2.Agent, agent_service_pb2.ListAgentsResponse]:
        prepared = _requests.list_agents(page_size=page_size, page_token=page_token)
        return self._pager(self._agents.ListAgents, prepared, _agents)

    def update_agent(self, *, agent: AgentInput, update_mask: Sequence[str] | None = None) -> agent_pb2.Agent:
        prepared = _requests.update_agent(agent=agent, update_mask=update_mask)
        return self._unary(self._agents.UpdateAgent, prepared)

    def delete_agent(self, *, agent_id: str, allow_missing: bool = False) -> None:
        prepared = _requests.delete_agent(agent_id=agent_id, allow_missing=allow_missing)
        self._unary(self._agents.DeleteAgent, prepared)

    # AdminService

    def get_server_stats(self) -> admin_service_pb2.ServerStats:
        return self._unary(self._admin.GetServerStats, _requests.get_server_stats())


def _share_docstrings(target: type, source: type) -> None:
    # The sync methods behave as the async ones do: one docstring for both, written once.
    for name, member in vars(target).items():
        if callable(member) and member.__doc__ is None and not name.startswith("_"):
            member.__doc__ = getattr(source, name).__doc__


_share_docstrings(SessionsClient, AsyncSessionsClient)
