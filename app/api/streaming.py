"""Streamed answers (``"stream": true`` on /translate and /summarize): Server-Sent Events.

The service hears a request as it goes (app/service/requests.py: Progress) and this module
writes what it hears as events, in the order they happen:

    event: delta   data: {"index": i, "text": "<new text>", "tokens": n}
    event: final   data: {"index": i, "text": "<full text>", "truncated": false, "chunks": 1}
    event: error   data: {"error": ..., "message": ..., "request_id": ...}   (then the stream ends)
    event: done    data: {"model": "<entry name>"}

The stream begins with its first event: an error before it (a 404, a 429, a deadline passed
before any text) is the ordinary error response, with its status. A client that leaves
cancels the request, in the engine too. Why events, and their order: docs/streaming.md.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from app.api.calls import account, until_disconnect
from app.api.errors import error_body
from app.payloads import GenerationDelta
from app.service.requests import Answer, Progress, Summary, Translation

MEDIA_TYPE = "text/event-stream"
# No cache may keep the stream, and a proxy (nginx) must pass each event on as it comes.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Work = Callable[[Progress], Awaitable[Answer[Any]]]


def frame(event: str, data: dict[str, Any]) -> bytes:
    """One event; JSON escapes every line break in ``data``, so it stays one ``data:`` line
    (and a lone surrogate a client sent is written as the JSON escape it came as)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n".encode("utf-8", "backslashreplace")


class EventStream:
    """A request's Progress, as events queued for its response; then its answer's finals
    (for the inputs that had none yet) and ``done``, or the error that ended it."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()  # None: the end
        self._finals: set[int] = set()

    def delta(self, index: int, piece: GenerationDelta) -> None:
        self._queue.put_nowait(frame("delta", {"index": index, "text": piece.text, "tokens": piece.tokens}))

    def final(self, index: int, result: Translation | Summary) -> None:
        if index not in self._finals:
            self._finals.add(index)
            body = {"index": index, "text": result.text, "truncated": result.truncated, "chunks": result.chunks}
            self._queue.put_nowait(frame("final", body))

    async def run(self, request: Request, work: Work) -> None:
        try:
            answer = await work(self)
        except Exception as exc:
            self._queue.put_nowait(exc)
        else:
            for index, result in enumerate(answer.results):
                self.final(index, result)
            account(request, answer)
            self._queue.put_nowait(frame("done", {"model": answer.model}))
        finally:
            self._queue.put_nowait(None)

    async def next(self) -> bytes | Exception | None:
        return await self._queue.get()

    async def frames(self, request: Request, first: bytes, running: asyncio.Future[None]) -> AsyncIterator[bytes]:
        """The events from ``first`` on, each as soon as it is there (those already there
        together); ``running`` is cancelled if the client leaves first."""
        # Starlette stops a stream whose client left at once only under servers of ASGI spec
        # < 2.4 (uvicorn's is 2.3); under 2.4, at its next send that fails, maybe long after.
        # This watch holds under both.
        watch = asyncio.ensure_future(_cancel_when_gone(request, running))
        try:
            came: list[bytes | Exception | None] = [first]
            while True:
                while not self._queue.empty():
                    came.append(self._queue.get_nowait())
                ready, ended = bytearray(), False
                for item in came:
                    if isinstance(item, bytes):
                        ready += item
                        continue
                    if item is not None:  # the error that ended the request
                        ready += frame("error", error_body(request, item))
                    ended = True
                    break
                if ready:
                    yield bytes(ready)
                if ended:
                    return
                came = [await self.next()]
        finally:
            watch.cancel()
            running.cancel()  # the client left (or the stream ended): nothing more is computed


async def _cancel_when_gone(request: Request, running: asyncio.Future[None]) -> None:
    # The body has been read: what the server says next is that the client left.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    running.cancel()


async def stream(request: Request, work: Work) -> Response:
    """``work``'s events as Server-Sent Events, from its first; ``work``'s error before then
    raised as for any other route."""
    events = EventStream()
    running = asyncio.ensure_future(events.run(request, work))
    try:
        first = await until_disconnect(request, events.next())
    except BaseException:
        running.cancel()
        raise
    if isinstance(first, Exception):
        raise first
    assert first is not None  # run puts an event or an error before its end
    return StreamingResponse(events.frames(request, first, running), media_type=MEDIA_TYPE, headers=HEADERS)


EXAMPLE = (
    'event: delta\ndata: {"index":0,"text":"Das Wetter","tokens":3}\n\n'
    'event: delta\ndata: {"index":0,"text":" ist heute schön.","tokens":8}\n\n'
    'event: final\ndata: {"index":0,"text":"Das Wetter ist heute schön.","truncated":false,"chunks":1}\n\n'
    'event: done\ndata: {"model":"opus-mt-en-de"}\n\n'
)


def _data(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """An event's ``data``: a line of JSON, holding ``required``'s fields (and maybe ``optional``'s)."""
    body = {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": body}


_INDEX = {"type": "integer", "minimum": 0, "description": "The input's place in `inputs`."}
_EVENTS: dict[str, dict[str, Any]] = {
    "delta": _data(
        {
            "index": _INDEX,
            "text": {"type": "string", "description": "New text since the input's last delta."},
            "tokens": {"type": "integer", "description": "Tokens generated for the input so far."},
        }
    ),
    "final": _data(
        {
            "index": _INDEX,
            "text": {"type": "string", "description": "The input's whole text, as answered unstreamed."},
            "truncated": {"type": "boolean"},
            "chunks": {"type": "integer"},
        }
    ),
    "error": _data(
        {"error": {"type": "string"}, "message": {"type": "string"}}, {"request_id": {"type": ["string", "null"]}}
    ),
    "done": _data({"model": {"type": "string", "description": "The catalog model that answered."}}),
}
# One event of the stream, as OpenAPI before 3.2 has a text/event-stream schema describe it.
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {"event": {"type": "string", "enum": list(_EVENTS)}, "data": {"type": "string"}},
    "oneOf": [
        {"properties": {"event": {"const": name}, "data": data}, "required": ["event", "data"]}
        for name, data in _EVENTS.items()
    ],
}
# The 200 answer's second form, for the OpenAPI document (beside the route's JSON one).
STREAMED_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'The answer; with `"stream": true`, Server-Sent Events: per input, `delta` events '
        "(its new text and its tokens so far) as it is generated, then its `final` (the text the "
        "unstreamed answer gives); an `error` event ends a stream that failed once begun, `done` one that did not.",
        "content": {MEDIA_TYPE: {"schema": EVENT_SCHEMA, "example": EXAMPLE}},
    }
}
