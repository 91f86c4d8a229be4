"""The server factory: a grpc.aio server on 127.0.0.1 with health, reflection and graceful drain.

A service describes itself with a `ServiceDefinition`; `run` does the rest:
settings-driven message limits, the interceptors, health NOT_SERVING until the
service is ready and again while it drains on SIGTERM, reflection for grpcurl, and
a graceful stop that lets in-flight calls finish within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from medimg_core import telemetry
from medimg_core.identity import Role
from medimg_core.interceptors import STARTING, CallInterceptor, DenialHook, RolePolicy
from medimg_core.settings import ServiceSettings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServiceDefinition:
    """What a service adds to the server: its servicers and the roles its methods need."""

    #: Full names of the gRPC services, e.g. `medimg.ingest.v1.IngestService`.
    names: Sequence[str]
    add_to_server: Callable[[grpc.aio.Server], None]
    policy: RolePolicy
    #: Records calls the interceptor refused (see CallInterceptor.on_denied).
    on_denied: DenialHook | None = None
    #: Full method names the gateway calls as itself, with no user (its access log).
    gateway_alone: frozenset[str] = frozenset()
    #: Awaited when the service starts draining, once callers were told NOT_SERVING and
    #: before in-flight calls get their grace: ends what would otherwise outlive the grace
    #: (open-ended streams, worker processes), so it ends cleanly and at once.
    on_drain: Callable[[], Awaitable[None]] | None = None


#: Builds a service's definition; resources it opens go on the exit stack, closed at stop.
Builder = Callable[[AsyncExitStack], Awaitable[ServiceDefinition]]


def run_in_background(
    resources: AsyncExitStack, work: Coroutine[Any, Any, None], name: str
) -> asyncio.Task[None]:
    """Runs `work` for the life of the service: cancelled, and waited for, when `resources`
    unwinds, so before whatever was pushed on the stack ahead of it closes."""
    task = asyncio.create_task(work, name=name)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    resources.push_async_callback(stop)
    return task


class _LateHandlers(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # not generic at runtime
    """The service's handlers: registered before the server starts, filled in once built.

    grpc looks generic handlers up per call, so the server can listen, with health saying
    NOT_SERVING, while the service still connects to its database and migrates.
    """

    def __init__(self) -> None:
        self._handlers: list[grpc.GenericRpcHandler[Any, Any]] = []

    # The two methods the generated add_*Servicer_to_server functions call.
    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: object) -> None:
        pass  # a lookup shortcut of grpc's own server; the generic handlers suffice

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        if not self._handlers:
            return STARTING  # type: ignore[no-any-return]
        for handler in self._handlers:
            found = handler.service(details)
            if found is not None:
                return found
        return None


class Server:
    """One grpc.aio server for one service, bound to 127.0.0.1 only."""

    def __init__(self, settings: ServiceSettings, definition: ServiceDefinition | None = None):
        self.settings = settings
        self.names: list[str] = []
        self._policy: dict[str, frozenset[Role]] = {}
        self._on_drain: Callable[[], Awaitable[None]] | None = None
        self._late = _LateHandlers()
        limit = settings.max_message_bytes
        self._interceptor = CallInterceptor(gateway=settings.gateway, policy=self._policy)
        self.grpc = grpc.aio.server(
            handlers=[self._late],
            interceptors=[
                # Not on health: its Watch streams with context.write(), which the tracing
                # wrapper (an `async for` over the handler) would break.
                aio_server_interceptor(  # type: ignore[no-untyped-call]
                    filter_=filters.negate(filters.health_check())
                ),
                self._interceptor,
            ],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.port = 0
        if definition is not None:
            self.add(definition)

    def add(self, definition: ServiceDefinition) -> None:
        """Adds the service's servicers and reflection, also once the server is listening."""
        assert not self.names, "one service definition per server"
        target = cast(grpc.aio.Server, self._late)  # it has what add_*_to_server calls
        definition.add_to_server(target)
        self.names = list(definition.names)
        self._policy.update(definition.policy)
        self._interceptor.on_denied = definition.on_denied
        self._interceptor.gateway_alone = definition.gateway_alone
        self._on_drain = definition.on_drain
        health = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer([*self.names, health, reflection.SERVICE_NAME]),
            target,
        )

    async def start(self) -> int:
        """Listens and answers health with NOT_SERVING; returns the bound port."""
        self.port = self.grpc.add_insecure_port(f"127.0.0.1:{self.settings.port}")
        await self._set_health(NOT_SERVING)
        await self.grpc.start()
        return self.port

    async def ready(self) -> None:
        await self._set_health(SERVING)

    async def drain(self) -> None:
        """NOT_SERVING first, so callers stop sending; then refuse new calls; old ones finish."""
        await self._set_health(NOT_SERVING)
        await asyncio.sleep(self.settings.drain_delay_seconds)
        if self._on_drain is not None:
            await self._on_drain()
        await self.grpc.stop(self.settings.grace_seconds)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", *self.names):
            await self.health.set(name, status)


async def serve(name: str, settings: ServiceSettings, build: Builder) -> None:
    """Runs one service until SIGTERM or SIGINT, then drains and returns (exit code 0)."""
    telemetry.configure_logging(name, settings.log_level)
    telemetry.configure_tracing(
        name, to_console=settings.trace_to_console, otlp_endpoint=settings.otlp_endpoint
    )
    telemetry.start_metrics_server(settings.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as resources:
        server = Server(settings)
        port = await server.start()  # health answers NOT_SERVING while the service builds
        server.add(await build(resources))
        await server.ready()
        log.info("serving", extra={"fields": {"port": port}})
        await stop.wait()
        log.info("draining", extra={"fields": {"grace_seconds": settings.grace_seconds}})
        await server.drain()
    log.info("stopped")
