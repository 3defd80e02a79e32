"""The `openai_chat` backend: an OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, Ollama,
llama.cpp server), streamed over HTTP as server-sent events.

The request carries the system prompt, the history window in the chat format and the agent's tools; the
stream's `delta.content` becomes text deltas, `delta.reasoning_content` (or `delta.reasoning`, as vLLM,
llama.cpp and DeepSeek send it) reasoning deltas, `delta.tool_calls` client tool calls (the model's calls
are run by the caller of Execute, who continues the turn with their results), the final usage chunk a
usage event, and `finish_reason` the turn's finish reason.

Failures become AgentFailure (AGENT_UNAVAILABLE): retryable for connection failures, timeouts, HTTP 408,
409, 425, 429 (but OpenAI's `insufficient_quota`) and 5xx, a stream cut short, an answer the endpoint gave
up on (`finish_reason` `abort` or `error`) and an error inside the stream whose `code` is one of those
statuses or whose type is `server_error`; not for the other 4xx, a missing API key or the other errors
inside the stream. `timeout_seconds` bounds the whole request, stream included. A connection that drops
(or a deadline that passes) after the answer's `finish_reason` but before `[DONE]` ends the turn as that
finish reason says: the answer is whole, only a trailing usage chunk may be lost. An endpoint that refuses
`max_tokens` for `max_completion_tokens` (OpenAI's reasoning models) is asked once more with that field,
and gets that field from then on.
A server that ignores `stream: true` and answers one JSON completion is read as the one chunk that would
have carried it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import httpx
from google.protobuf import json_format

from agentsessions.v1 import agent_service_pb2, events_pb2, message_pb2

from ..domain.agents import key_variable_denied
from .backends import AgentFailure

log = logging.getLogger(__name__)

Response = agent_service_pb2.RespondResponse
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
FINISH_REASONS = {
    "stop": events_pb2.FINISH_REASON_STOP,
    "length": events_pb2.FINISH_REASON_LENGTH,
    "tool_calls": events_pb2.FINISH_REASON_CLIENT_TOOL_CALLS,
    "function_call": events_pb2.FINISH_REASON_CLIENT_TOOL_CALLS,
}
# Finish reasons of an answer the endpoint gave up on: vLLM's `abort`, OpenRouter's `error`.
ABORTED = frozenset({"abort", "error"})


class OpenAIChatBackend:
    uses_history = True

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        agent_id: str,
        settings: Mapping[str, Any],
        key_refused: str | None = None,
        completion_tokens: set[tuple[str, str]] | None = None,
    ) -> None:
        self.client = client
        # (url, model) pairs that refused max_tokens for max_completion_tokens, shared by the turns of the
        # process: one refusal, not one per turn.
        self.completion_tokens = completion_tokens if completion_tokens is not None else set()
        self.key_refused = key_refused  # api_key_env names a variable this agent may not read
        self.agent_id = agent_id
        self.url = str(settings["base_url"]).rstrip("/") + "/chat/completions"
        self.model = str(settings["model"])
        self.api_key_env = str(settings.get("api_key_env", ""))
        self.system_prompt = str(settings.get("system_prompt", ""))
        self.max_tokens = int(settings.get("max_tokens", 0))
        self.timeout = int(settings.get("timeout_seconds", 0))
        self.tools: list[Any] = list(settings.get("tools", []))

    def body(self, request: agent_service_pb2.RespondRequest) -> dict[str, Any]:
        """The chat-completions request for one turn."""
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages += chat_messages(request.history)
        if request.WhichOneof("input") == "trigger":
            payload = json_format.MessageToDict(request.trigger.input)
            _add_user(messages, f"Trigger {request.trigger.name}: {json.dumps(payload, sort_keys=True)}")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.max_tokens:
            limit = (
                "max_completion_tokens" if (self.url, self.model) in self.completion_tokens else "max_tokens"
            )
            body[limit] = self.max_tokens
        if self.tools:
            body["tools"] = self.tools
        return body

    def _fail(self, what: str, *, retryable: bool) -> AgentFailure:
        return AgentFailure(f"agent {self.agent_id!r} ({self.url}): {what}", retryable=retryable)

    async def respond(self, request: agent_service_pb2.RespondRequest) -> AsyncGenerator[Response, None]:
        headers = {"Accept": "text/event-stream"}
        if self.key_refused:
            raise self._fail(key_variable_denied(self.agent_id, self.key_refused).message, retryable=False)
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise self._fail(f"the API key variable {self.api_key_env} is not set", retryable=False)
            headers["Authorization"] = f"Bearer {key}"
        timeout = httpx.Timeout(self.timeout, connect=10.0) if self.timeout else httpx.USE_CLIENT_DEFAULT
        request_body = self.body(request)
        # timeout_seconds bounds the whole request, as the contract says, not only each read: a server
        # that keeps the stream alive with comments (OpenRouter's ": OPENROUTER PROCESSING") and never
        # answers would otherwise hold the turn open for as long as it likes.
        deadline = asyncio.get_running_loop().time() + self.timeout if self.timeout else None
        try:
            for attempt in range(2):
                async with self.client.stream(
                    "POST", self.url, json=request_body, headers=headers, timeout=timeout
                ) as response:
                    if response.status_code != 200:
                        body = await response.aread()
                        error = _body_error(body)
                        if attempt == 0 and "max_tokens" in request_body and _wants_completion_tokens(error):
                            # OpenAI's reasoning models take the limit only as max_completion_tokens, which
                            # vLLM, Ollama and llama.cpp servers may not know: asked again, once, that way.
                            request_body["max_completion_tokens"] = request_body.pop("max_tokens")
                            self.completion_tokens.add((self.url, self.model))
                            continue
                        raise self._fail(
                            f"HTTP {response.status_code}: {_error_text(body)}",
                            retryable=_retryable_status(response.status_code) and not _out_of_quota(error),
                        )
                    if response.headers.get("content-type", "").startswith("application/json"):
                        chunks = self._completion(await response.aread())  # it ignored `stream: true`
                    else:
                        chunks = self._chunks(response)
                    async for event in self._relay(chunks, deadline):
                        yield event
                    return
        except httpx.TimeoutException as err:
            raise self._fail(f"timed out ({type(err).__name__})", retryable=True) from err
        except httpx.InvalidURL as err:  # an agent stored before base URLs were checked
            raise self._fail(f"invalid base_url: {err}", retryable=False) from err
        except httpx.HTTPError as err:
            raise self._fail(f"{type(err).__name__}: {err}", retryable=True) from err

    async def _chunks(self, response: httpx.Response) -> AsyncGenerator[dict[str, Any] | None, None]:
        """The stream's chunks; None for `data: [DONE]`."""
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event: / id: / retry: fields
            data = line[5:].strip()
            if not data:
                continue  # an event without data is not dispatched (the SSE spec); some send it to keep alive
            if data == "[DONE]":
                yield None
                return
            yield self._object(data, "stream chunk")

    def _object(self, raw: str | bytes, what: str) -> dict[str, Any]:
        """A JSON object the endpoint sent; anything else ends the turn as a malformed answer."""
        try:
            decoded = json.loads(raw)
        except ValueError as err:
            raise self._fail(f"malformed {what} {raw[:200]!r}", retryable=False) from err
        if not isinstance(decoded, dict):
            raise self._fail(f"malformed {what} {raw[:200]!r}", retryable=False)
        return decoded

    async def _completion(self, body: bytes) -> AsyncGenerator[dict[str, Any] | None, None]:
        """A whole completion as the one chunk that would have carried it."""
        completion = self._object(body, "response")
        for choice in completion.get("choices") or ():
            if isinstance(choice, dict) and "message" in choice:
                choice["delta"] = choice.pop("message")
        yield completion
        yield None

    async def _relay(
        self, chunks: AsyncGenerator[dict[str, Any] | None, None], deadline: float | None = None
    ) -> AsyncGenerator[Response, None]:
        calls: list[dict[str, str]] = []
        by_index: dict[Any, dict[str, str]] = {}
        usage: dict[str, Any] | None = None
        finish: str | None = None
        done = False
        pieces = aiter(chunks)
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # around the read alone: never across a yield
                    chunk = await anext(pieces)
            except StopAsyncIteration:
                break
            except (TimeoutError, httpx.HTTPError) as err:
                if finish is None and isinstance(err, TimeoutError):
                    raise self._fail(f"no whole answer within {self.timeout} s", retryable=True) from None
                if finish is None:
                    raise
                # The answer had ended (its finish_reason came) when the connection dropped or the time ran
                # out before `[DONE]`: it is whole, and a retry would pay for it again. Only a usage chunk
                # may be lost.
                log.info("agent %r: no [DONE] after finish_reason %r: %r", self.agent_id, finish, err)
                break
            if chunk is None:
                done = True
                break
            error = chunk.get("error") or (chunk if chunk.get("object") == "error" else None)
            if error:
                raise self._fail(
                    f"error in the stream: {_error_message(error)}", retryable=_retryable_error(error)
                )
            # Together, Groq, DeepSeek and LiteLLM repeat the (cumulative) usage in several chunks: the
            # last one counts.
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    yield Response(reasoning_delta=events_pb2.ReasoningDelta(text=reasoning))
                if delta.get("content"):
                    yield Response(text_delta=events_pb2.TextDelta(text=delta["content"]))
                for call in delta.get("tool_calls") or ():
                    # A call arrives in pieces: its id and name first, then its arguments in fragments,
                    # under its `index`. Ollama and some vLLM parsers send each of several calls whole
                    # under index 0, and Gemini sends no index: a piece naming another id is another call,
                    # and one without an index continues the call before it.
                    key = call.get("index")
                    entry = by_index.get(key) if key is not None else (calls[-1] if calls else None)
                    call_id = call.get("id") or ""
                    if entry is None or (call_id and entry["id"] and call_id != entry["id"]):
                        entry = {"id": "", "name": "", "arguments": ""}
                        calls.append(entry)
                        by_index[key] = entry
                    function = call.get("function") or {}
                    entry["id"] = call_id or entry["id"]
                    entry["name"] += function.get("name") or ""
                    entry["arguments"] += function.get("arguments") or ""
                finish = choice.get("finish_reason") or finish
        if not done and finish is None:
            raise self._fail("the stream ended before the answer did", retryable=True)
        if finish == "content_filter":
            raise AgentFailure(
                f"agent {self.agent_id!r}: the endpoint's content filter stopped the answer",
                retryable=False,
                reason="CONTENT_FILTERED",
            )
        if finish in ABORTED:
            raise self._fail(f"the endpoint stopped the answer (finish_reason {finish!r})", retryable=True)
        if usage:
            details = usage.get("completion_tokens_details") or {}
            yield Response(
                usage=events_pb2.Usage(
                    input_tokens=usage.get("prompt_tokens") or 0,
                    output_tokens=usage.get("completion_tokens") or 0,
                    reasoning_tokens=details.get("reasoning_tokens") or 0,
                    total_tokens=usage.get("total_tokens") or 0,
                )
            )
        # Cut off at the token limit, a call's arguments are cut too: the answer ends LENGTH, asking for
        # no call the caller could not run.
        if calls and finish != "length":
            yield Response(
                client_tool_request=events_pb2.ClientToolRequest(
                    calls=[
                        message_pb2.ToolCallPart(
                            call_id=c["id"],
                            name=c["name"],
                            arguments=c["arguments"] or "{}",
                            client_side=True,
                        )
                        for c in calls
                    ]
                )
            )
            finish = "tool_calls"
        reason = FINISH_REASONS.get(finish or "stop", events_pb2.FINISH_REASON_STOP)
        yield Response(finished=events_pb2.TurnFinished(reason=reason))


def chat_messages(history: Any) -> list[dict[str, Any]]:
    """The history window in the chat format. Reasoning is left out; tool calls left unanswered (a turn
    paused for client tools and never continued) are dropped, because the endpoints refuse them; user
    messages in a row go as one, their texts separated by a blank line."""
    out: list[dict[str, Any]] = []
    for m in history:
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for part in m.parts:
            kind = part.WhichOneof("kind")
            if kind == "text":
                texts.append(part.text.text)
            elif kind == "data":
                texts.append(json.dumps(json_format.MessageToDict(part.data.value)))
            elif kind == "file":
                texts.append(
                    f"[file {part.file.name or part.file.uri} ({part.file.mime_type}): {part.file.uri}]"
                )
            elif kind == "tool_call":
                c = part.tool_call
                calls.append(
                    {
                        "id": c.call_id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": _json_object(c.arguments)},
                    }
                )
            elif kind == "tool_result":
                r = part.tool_result
                results.append({"role": "tool", "tool_call_id": r.call_id, "content": r.output})
        text = "\n".join(texts)
        if m.role == message_pb2.ROLE_ASSISTANT:
            entry: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
        elif m.role in (message_pb2.ROLE_USER, message_pb2.ROLE_SYSTEM) and text:
            out.append({"role": "user" if m.role == message_pb2.ROLE_USER else "system", "content": text})
        out += results
    answered = {m["tool_call_id"] for m in out if m["role"] == "tool"}
    asked = {c["id"] for m in out for c in m.get("tool_calls", ())}
    kept: list[dict[str, Any]] = []
    for m in out:
        if m["role"] == "tool" and m["tool_call_id"] not in asked:
            continue
        if "tool_calls" in m:
            m["tool_calls"] = [c for c in m["tool_calls"] if c["id"] in answered]
            if not m["tool_calls"]:
                del m["tool_calls"]
        if m["role"] == "assistant" and not m.get("content") and "tool_calls" not in m:
            continue
        if m["role"] == "user":
            _add_user(kept, m["content"])
            continue
        kept.append(m)
    return kept


def _add_user(messages: list[dict[str, Any]], text: str) -> None:
    """Adds a user message, joined to the one before when that is a user message too (a turn that failed
    before answering, a call left unanswered, messages appended by the caller, a trigger after them):
    chat templates that want the roles to alternate (Mistral's and Gemma's, as vLLM and llama.cpp run
    them) refuse the whole request otherwise."""
    if messages and messages[-1]["role"] == "user":
        messages[-1]["content"] += "\n\n" + text
    else:
        messages.append({"role": "user", "content": text})


def _json_object(arguments: str) -> str:
    """A call's arguments as the history sends them. vLLM and Ollama decode the arguments of the calls in
    the history into an object and refuse the whole request when they do not decode (a model that wrote
    bad JSON, or was cut off): such arguments go as `{}`, and the call's result says what became of it."""
    try:
        if isinstance(json.loads(arguments), dict):
            return arguments
    except ValueError:
        pass
    return "{}"


def _retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def _retryable_error(error: Any) -> bool:
    """Whether an error the endpoint sent inside the stream may pass on a retry: vLLM, llama.cpp and
    OpenRouter give the HTTP status it stands for as `code`, OpenAI leaves `code` null and says
    `server_error`."""
    if not isinstance(error, Mapping):
        return False
    try:
        status = int(error.get("code") or 0)
    except (TypeError, ValueError):
        status = 0
    return _retryable_status(status) or error.get("type") == "server_error"


def _body_error(body: bytes) -> Mapping[str, Any] | None:
    """The `error` object of an error body, as OpenAI and the servers that copy it send one."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return error if isinstance(error, Mapping) else None


def _wants_completion_tokens(error: Mapping[str, Any] | None) -> bool:
    """OpenAI's refusal of `max_tokens` for a model that takes `max_completion_tokens` (o1, o3, gpt-5):
    `param` names `max_tokens`, and the message says which parameter to use instead."""
    return (
        error is not None
        and error.get("param") == "max_tokens"
        and "max_completion_tokens" in str(error.get("message", ""))
    )


def _out_of_quota(error: Mapping[str, Any] | None) -> bool:
    """OpenAI's 429 for an account out of credit, which no retry gets past (its other 429s do pass)."""
    return error is not None and "insufficient_quota" in (error.get("code"), error.get("type"))


def _error_message(error: Any) -> str:
    if isinstance(error, Mapping):
        return str(error.get("message") or error)
    return str(error)


def _error_text(body: bytes) -> str:
    """The message of an error body: `{"error": {"message"}}` (OpenAI, newer vLLM, Ollama), a flat
    `{"message"}` (older vLLM) or `{"detail"}` (FastAPI's own 404 and 422), else the body itself."""
    try:
        error = json.loads(body)
        found = error.get("error") or error.get("message") or error.get("detail")
    except (ValueError, AttributeError):
        found = None
    if found:
        return _error_message(found)[:300]
    return body[:300].decode(errors="replace") or "(no body)"
