"""What the framework adapters share: a framework's own record kept verbatim in a hidden data part, the
agent a framework's sessions hang on, and the client they open on first use."""

from __future__ import annotations

import asyncio
import contextlib

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from agentsessions import errors
from agentsessions.client import DEFAULT_TARGET, AsyncSessionsClient
from agentsessions.v1 import message_pb2, session_pb2


class LazyClient:
    """An adapter's client: the one passed in (left open), or one opened on first use and closed by
    `close()`.

    A ``grpc.aio`` channel belongs to the event loop it was opened on, and some callers run each call on a
    loop of its own (ADK's sync ``Runner.run`` runs ``asyncio.run`` in a thread per call), so the client
    opened here is one per loop: a call on another loop opens another. The clients of loops that have
    closed are dropped, not closed: closing a channel needs its loop."""

    def _use_client(self, client: AsyncSessionsClient | None, target: str = DEFAULT_TARGET) -> None:
        self._client = client
        self._target = target
        self._opened: dict[asyncio.AbstractEventLoop, AsyncSessionsClient] = {}

    @property
    def client(self) -> AsyncSessionsClient:
        """The client in use: the one given, or the one opened on the running loop (on first use there)."""
        if self._client is not None:
            return self._client
        loop = asyncio.get_running_loop()
        client = self._opened.get(loop)
        if client is None:
            for ended in [other for other in list(self._opened) if other.is_closed()]:
                self._opened.pop(ended, None)
            client = self._opened[loop] = AsyncSessionsClient(self._target)
        return client

    async def close(self) -> None:
        """Closes the clients this adapter opened (a client passed in stays open): the running loop's at
        once, those of other loops still running on their loop, soon."""
        opened, self._opened = self._opened, {}
        loop = asyncio.get_running_loop()
        for other, client in opened.items():
            if other is loop:
                await client.close()
            elif other.is_running():
                asyncio.run_coroutine_threadsafe(client.close(), other)


#: The largest page the server serves; longer histories are read page by page.
MAX_PAGE = 1000
#: Messages per AppendMessages (the server's default SESSIOND_MAX_BATCH_MESSAGES).
MAX_BATCH = 100


def add_record_part(parts: RepeatedCompositeFieldContainer[message_pb2.Part], kind: str, text: str) -> None:
    """Adds to ``parts`` (a message's) a hidden part holding a framework record as JSON ``text``. Text, not
    a ``Struct``: a ``Struct`` would turn every number into a double, and the round trip would no longer be
    exact."""
    part = parts.add()
    part.hidden = True
    part.data.type = kind
    part.data.value.string_value = text


def record_text(message: message_pb2.Message, kind: str) -> str | None:
    """The JSON text ``add_record_part`` stored in ``message``, or None if it holds no record of ``kind``."""
    for part in message.parts:
        if part.WhichOneof("kind") == "data" and part.data.type == kind:
            return part.data.value.string_value
    return None


async def ensure_agent(client: AsyncSessionsClient, agent_id: str) -> None:
    """Registers ``agent_id`` unless it exists. A session, and state shared by an agent's sessions, hang on
    an agent; these frameworks run their own model loop, so the record only names the application (its
    backend is the built-in echo, never called through these adapters)."""
    with contextlib.suppress(errors.AlreadyExists):
        await client.create_agent(
            agent={"agent_id": agent_id, "display_name": agent_id, "echo": {}}, agent_id=agent_id
        )


#: A session (when asked for) and messages of it, oldest first, read together.
Conversation = tuple[session_pb2.Session | None, list[message_pb2.Message]]


async def newest(
    client: AsyncSessionsClient, session_id: str, n: int, *, include_session: bool = False
) -> Conversation:
    """The newest ``n`` messages of a session, oldest first, in descending pages of at most MAX_PAGE; with
    ``include_session``, the session too, read by the first page's call.

    The server cuts each page at a tool group's edge, so no tool result comes without its call: a page
    that comes back short is the answer, not a gap to fill (only a page shortened by MAX_PAGE goes on)."""
    found: list[message_pb2.Message] = []
    session: session_pb2.Session | None = None
    token = ""
    while True:
        wanted = n - len(found)
        pager = await client.list_messages(
            session_id=session_id,
            order=message_pb2.MESSAGE_ORDER_DESCENDING,
            page_size=min(wanted, MAX_PAGE),
            page_token=token,
            include_session=include_session and session is None,
        )
        if pager.first_page.HasField("session"):
            session = pager.first_page.session
        found += pager.first_page.messages
        token = pager.first_page.next_page_token
        if not token or wanted <= MAX_PAGE or len(found) >= n:  # the last, or a page grown past n
            return session, found[::-1]


async def history(
    client: AsyncSessionsClient, session_id: str, *, include_session: bool = False
) -> Conversation:
    """Every message of a session, oldest first; with ``include_session``, the session too, read by the
    first page's call."""
    pager = await client.list_messages(
        session_id=session_id, page_size=MAX_PAGE, include_session=include_session
    )
    session = pager.first_page.session if pager.first_page.HasField("session") else None
    return session, [m async for m in pager]
