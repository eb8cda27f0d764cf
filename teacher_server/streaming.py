"""ScoreStream's engine: many requests in flight on one stream, responses as they finish, and per-stream
flow control so a client that does not read cannot make the server buffer without bound.

The server stops reading a stream while ``max_pending`` of its requests are read and unanswered (scoring,
or computed and waiting for the client to read) or ``max_unsent_bytes`` of computed responses wait for the
client. Memory per stream stays under about ``max_unsent_bytes`` + ``max_pending`` x the largest response.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from protos import teacher_pb2 as pb
from teacher_server.gate import UnparseableMessage

ScoreRpc = Callable[[pb.ScoreRequest], Awaitable[pb.ScoreResponse]]


class StreamBroken(Exception):
    """A message of the stream did not parse: every response before it was sent, and the stream must end
    with a non-OK status carrying this message (INVALID_ARGUMENT)."""


class _Window:
    """What one stream has read and not yet handed to the transport."""

    def __init__(self, max_pending: int, max_unsent_bytes: int) -> None:
        self.max_pending, self.max_unsent_bytes = max_pending, max_unsent_bytes
        self.pending, self.unsent_bytes = 0, 0
        self._changed = asyncio.Condition()

    async def room(self) -> None:
        async with self._changed:
            await self._changed.wait_for(
                lambda: self.pending < self.max_pending and self.unsent_bytes < self.max_unsent_bytes)

    async def sent(self, nbytes: int) -> None:
        async with self._changed:
            self.pending -= 1
            self.unsent_bytes -= nbytes
            self._changed.notify_all()


async def serve_stream(requests: AsyncIterator[pb.ScoreRequest], score: ScoreRpc, max_pending: int,
                       max_unsent_bytes: int) -> AsyncIterator[pb.ScoreResponse]:
    """Scores each request as it arrives and yields responses as they finish. When a message does not parse
    (or reading fails otherwise), nothing after it is read, every request before it is answered, and then
    StreamBroken (or the reading error) is raised."""
    window = _Window(max_pending, max_unsent_bytes)
    done: asyncio.Queue[tuple[pb.ScoreResponse, int] | None] = asyncio.Queue()
    tasks: set[asyncio.Task] = set()
    failed: list[Exception] = []
    requests = aiter(requests)

    async def one(request: pb.ScoreRequest) -> None:
        response = await score(request)
        size = response.ByteSize()
        window.unsent_bytes += size
        done.put_nowait((response, size))

    async def read() -> None:
        try:
            while True:
                await window.room()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    break
                window.pending += 1
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except Exception as err:  # the stream cannot be read on: answer what was read, then fail it
            failed.append(err)
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)
            done.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (item := await done.get()) is not None:
            yield item[0]
            await window.sent(item[1])
    finally:
        for task in (reader, *tasks):
            task.cancel()
    if failed and isinstance(failed[0], UnparseableMessage):
        raise StreamBroken(str(failed[0]))
    if failed:
        raise failed[0]  # never end with OK when the stream broke (grpcio answers UNKNOWN)
