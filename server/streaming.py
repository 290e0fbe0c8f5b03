"""The relay's streamed response: it ends when the client leaves or stops reading.

A client that stops reading a stream (but keeps its connection) blocks the response's writes
once the socket buffers fill; uvicorn has no write timeout, and the request keeps its variant's
admission, so it could hold off every other variant's swap for as long as it likes. `StallWatch`
is one task per gateway that ends such streams after `timeout` seconds without progress.

Why a watch and not a timer per write: `asyncio.timeout()` around each chunk costs ~4 µs (a timer
armed and cancelled), a few percent of the relay at 25k chunks/s; marking when a write started
costs ~0.1 µs, and one task scans the open streams once a second.

Ending a stream cancels its task: at whichever await it is (reading the engine or writing to the
client), the body iterator is closed, which releases the admission (server/proxy.py). The client's
connection is then closed by uvicorn (it logs "ASGI callable returned without completing
response" after our own warning).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("deltagate")


class _Open:
    """One open stream: its task, its label (the variant), and when its pending write started
    (0: none pending)."""

    __slots__ = ("task", "label", "since", "ended_by", "done")

    def __init__(self, task: asyncio.Task, label: str) -> None:
        self.task, self.label, self.since, self.ended_by, self.done = task, label, 0.0, "", False

    def end(self, why: str) -> None:
        if not self.done and not self.ended_by:
            self.ended_by = why
            self.task.cancel()


class StallWatch:
    """Ends streams whose write to the client has not completed for `timeout` seconds (0: never)."""

    def __init__(self, timeout: float, on_stall: Callable[[str], None] = lambda label: None) -> None:
        self.timeout, self.on_stall = timeout, on_stall
        self.open: set[_Open] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start watching (in the running loop); without a timeout there is nothing to watch."""
        if self.timeout > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        """Stop the watch task."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 4))
            now = loop.time()
            for stream in list(self.open):
                if stream.since and now - stream.since > self.timeout:
                    log.warning(
                        "client of a %s stream read nothing for %.0f s: stream ended, admission released",
                        stream.label,
                        self.timeout,
                    )
                    self.on_stall(stream.label)
                    stream.end("stalled")


class RelayStream(StreamingResponse):
    """A StreamingResponse of server-sent events that ends when the client leaves (as Starlette's
    does) or when `watch` finds its writes stalled. The body iterator is always closed."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], watch: StallWatch, label: str) -> None:
        super().__init__(chunks, media_type="text/event-stream")
        self.watch, self.label = watch, label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        stream = _Open(asyncio.current_task(), self.label)
        self.watch.open.add(stream)
        listener = loop.create_task(_until_disconnect(receive, stream))
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in self.body_iterator:
                stream.since = loop.time()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                stream.since = 0.0
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not stream.ended_by:  # not ours: the server is stopping
                raise
            stream.task.uncancel()
        except OSError:  # the socket went away under a write
            pass
        finally:
            stream.done = True  # from here on, neither the listener nor the watch cancels this task
            listener.cancel()
            self.watch.open.discard(stream)
            await self.body_iterator.aclose()  # releases the admission if the stream did not finish


async def _until_disconnect(receive: Receive, stream: _Open) -> None:
    """Wait for the client to go away (uvicorn also answers "disconnect" once the response is
    complete; by then the stream is done and nothing is cancelled)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    stream.end("disconnected")
