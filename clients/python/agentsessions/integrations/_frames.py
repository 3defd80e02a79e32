"""What the framework adapters share: a framework's own record kept verbatim in a hidden data part, the
agent a framework's sessions hang on, and the client they open on first use."""

from __future__ import annotations

import contextlib

from google.protobuf import struct_pb2

from agentsessions import errors
from agentsessions.client import DEFAULT_TARGET, AsyncSessionsClient
from agentsessions.v1 import message_pb2, session_pb2


class LazyClient:
    """An adapter's client: the one passed in (left open), or one opened on first use and closed by
    `close()`."""

    def _use_client(self, client: AsyncSessionsClient | None, target: str = DEFAULT_TARGET) -> None:
        self._client = client
        self._owns_client = client is None
        self._target = target

    @property
    def client(self) -> AsyncSessionsClient:
        """The client in use (opened on first use when none was given)."""
        if self._client is None:
            self._client = AsyncSessionsClient(self._target)
        return self._client

    async def close(self) -> None:
        """Closes the client this adapter opened (a client passed in stays open)."""
        if self._owns_client and self._client is not None:
            await self._client.close()
            self._client = None


#: The largest page the server serves; longer histories are read page by page.
MAX_PAGE = 1000
#: Messages per AppendMessages (the server's default SESSIOND_MAX_BATCH_MESSAGES).
MAX_BATCH = 100


def record_part(kind: str, text: str) -> message_pb2.Part:
    """A hidden part holding a framework record as JSON ``text``. Text, not a ``Struct``: a ``Struct`` would
    turn every number into a double, and the round trip would no longer be exact."""
    return message_pb2.Part(
        hidden=True, data=message_pb2.DataPart(type=kind, value=struct_pb2.Value(string_value=text))
    )


def record_text(message: message_pb2.Message, kind: str) -> str | None:
    """The JSON text ``record_part`` stored in ``message``, or None if it holds no record of ``kind``."""
    for part in message.parts:
        if part.WhichOneof("kind") == "data" and part.data.type == kind:
            return part.data.value.string_value
    return None


def text_of(message: message_pb2.Message) -> str:
    """The visible text of a message (its text parts, joined)."""
    return "".join(p.text.text for p in message.parts if p.WhichOneof("kind") == "text")


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
        if not token or wanted <= MAX_PAGE:
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
