"""Runs a TeacherServer on its own event loop in a background thread (tests, benchmarks, embedding).

    with BackgroundServer(config) as server:        # loaded, warmed up and SERVING on return
        client = TeacherClient(f"127.0.0.1:{server.port}")
"""

from __future__ import annotations

import asyncio
import threading

from teacher_server.backends.base import Backend
from teacher_server.config import TeacherConfig
from teacher_server.server import TeacherServer
from teacher_server.tokenizer import TeacherTokenizer


class BackgroundServer:
    def __init__(self, config: TeacherConfig, backend: Backend | None = None,
                 tokenizer: TeacherTokenizer | None = None, load: bool = True) -> None:
        self.config, self._load = config, load
        self._args = (backend, tokenizer)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-server", daemon=True)
        self.server: TeacherServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def metrics_port(self) -> int | None:
        assert self.server is not None
        return self.server.metrics_port

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self.server = TeacherServer(self.config, *self._args)
        await self.server.start()

    def start(self) -> BackgroundServer:
        self._thread.start()
        self._call(self._start())
        if self._load:
            self.load()
        return self

    def load(self) -> None:
        assert self.server is not None
        self._call(self.server.load())

    def stop(self, grace: float | None = 0.0) -> None:
        if self.server is not None:
            self._call(self.server.stop(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
