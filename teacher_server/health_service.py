"""The standard gRPC health service, with Watch streams that end when the server drains.

grpcio's own Watch never returns: on SIGTERM an open Watch (a load balancer, a probe, gRPC's client-side
health checking of every trainer channel) would hold the server for its whole grace period after the
in-flight work was done. Here ``drain`` sends NOT_SERVING on every Watch stream and then ends it.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2

Status = health_pb2.HealthCheckResponse.ServingStatus


class DrainingHealthServicer(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, Status] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Condition()
        self._draining = False

    def _status(self, service: str) -> Status:
        return self._statuses.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def set(self, service: str, status: Status) -> None:
        await super().set(service, status)  # Check answers from the parent's table
        async with self._changed:
            if not self._draining:
                self._statuses[service] = status
                self._changed.notify_all()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        """Sends the status now and on every change (written outside the lock: a slow reader holds no one up);
        after the last status a draining server sends, the stream ends."""
        last: Status | None = None
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda seen=last: self._status(request.service) != seen or self._draining)
                status, ending = self._status(request.service), self._draining
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if ending:
                return

    async def drain(self) -> None:
        """Every service NOT_SERVING from now on, and every Watch stream ends."""
        await self.enter_graceful_shutdown()
        async with self._changed:
            self._statuses = dict.fromkeys(self._statuses, health_pb2.HealthCheckResponse.NOT_SERVING)
            self._draining = True
            self._changed.notify_all()
