"""grpc.health.v1 with all three methods: the reference servicer's Check and Watch, plus List."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2


class HealthStatuses(health_aio.HealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's asyncio servicer answers List as unimplemented, and an unknown
    service with a bare NOT_FOUND; clients in other languages call both."""

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        status = self._server_status.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no service {request.service!r} here; List names every one"
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in sorted(self._server_status.items())
            }
        )
