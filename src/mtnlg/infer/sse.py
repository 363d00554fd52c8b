"""The server-sent-event stream of a streamed completion: the engine's outputs, as they arrive, to the client.

One task per request writes the events; a second waits for the client to go away and then cancels the
request's generations (their KV-cache slots are free at the engine's next step), which ends the stream
with the engine's "abort". Starlette's ``StreamingResponse`` does the same with an anyio task group
around every response and three ``send`` wrappers per event; on this 2-core box that was ~0.15 ms per
request before its first byte and a share of every event's cost (``benchmarks/serve.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse

from mtnlg.infer.events import Output, merge_outputs
from mtnlg.infer.protocol import ABORTED, Choice, sse

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def coalesced(queue: asyncio.Queue) -> list[tuple[Choice, Output]]:
    """Wait for output, then take everything queued so far, merged into one event per choice: when the
    client side falls behind the engine, several tokens travel in one SSE event instead of many."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    merged: dict[int, tuple[Choice, list[Output]]] = {}
    for c, outs in items:
        merged.setdefault(c.index, (c, []))[1].extend(outs)
    return [(c, merge_outputs(outs)) for c, outs in merged.values()]


class EventStream(StreamingResponse):
    """``text/event-stream`` from ``events``; ``on_disconnect`` is called once if the client goes away first."""

    def __init__(self, events: AsyncIterator[str], on_disconnect: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers=HEADERS)
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            async for text in self.body_iterator:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            await self.body_iterator.aclose()  # its cleanup (cancelling what is unfinished) runs now

    async def _watch(self, receive: Any) -> None:
        await wait_disconnect(receive)
        self.on_disconnect()


async def wait_disconnect(receive: Callable) -> None:
    """Return once the client has gone away (``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def event_stream(choices: list[Choice], queue: asyncio.Queue, chunk: Callable[..., dict], opening: list[dict],
                 render: Callable[[Choice, Output], dict], use: Callable[[], dict] | None) -> EventStream:
    """The SSE body: the opening chunks, one chunk per engine output, the usage chunk when asked, then
    ``[DONE]``. A client that goes away cancels its unfinished requests at once, freeing their slots."""

    def cancel_open() -> None:
        for c in choices:
            if c.req is not None and c.finish_reason is None:
                c.req.cancel()

    async def events() -> AsyncIterator[str]:
        pending = len(choices)
        try:
            for opener in opening:
                yield sse(chunk([opener], None))
            while pending:
                for c, o in await coalesced(queue):
                    if o.finish_reason == "abort":
                        yield sse(ABORTED)
                        return
                    if o.finish_reason is not None:
                        c.finish_reason, c.completion_tokens = o.finish_reason, o.completion_tokens
                        pending -= 1
                    yield sse(chunk([render(c, o)], None))
            if use is not None:
                yield sse(chunk([], use()))
            yield "data: [DONE]\n\n"
        finally:
            cancel_open()

    return EventStream(events(), cancel_open)


__all__ = ["EventStream", "coalesced", "event_stream", "wait_disconnect"]
