"""The one server interceptor of every service: identity, authorization, deadlines, metrics, errors.

Every RPC of a medimg service passes through `CallInterceptor`, which
1. reads the verified caller (workload from XFCC, user from the gateway's header),
2. checks the user's roles against the service's method policy, before the servicer
   runs (so a caller without permission learns nothing about what exists),
3. records the caller's deadline for outgoing calls,
4. turns domain errors into `google.rpc.Status` with `ErrorInfo` (the only place this
   happens), and anything unexpected into INTERNAL without leaking its message,
5. counts the call and its latency by method and code.
Health and reflection pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Set
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from medimg_core import calls, deadlines
from medimg_core.calls import Context
from medimg_core.errors import (
    ERROR_DOMAIN,
    MedimgError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from medimg_core.identity import (
    UNVERIFIED,
    Principal,
    Role,
    SpiffeId,
    principal_from_metadata,
)
from medimg_core.telemetry import RPC_HANDLED, RPC_SECONDS

log = logging.getLogger(__name__)

#: Method name -> roles a user (through the gateway) needs for it. Workloads are
#: allowed per method by their sidecar's RBAC, from deploy/mesh.toml.
RolePolicy = Mapping[str, frozenset[Role]]

#: Records a refused call: the full method, and the error it was refused with.
DenialHook = Callable[[str, "Unauthenticated | PermissionDenied"], Awaitable[None]]

#: grpc-stubs types handlers loosely; the wrappers below treat them as Any.
Handler = Any

_PASS_THROUGH = ("/grpc.health.", "/grpc.reflection.")


async def _refuse_while_starting(requests: object, context: Context) -> AsyncIterator[None]:
    status = rich_status(
        Unavailable("SERVICE_STARTING", "the service is starting: retry in a few seconds")
    )
    await context.abort(status.code, status.details, status.trailing_metadata)
    yield  # never reached (abort raises): a generator, as stream handlers must be


#: What a call gets while the service is still being built (connecting to its database,
#: migrating): UNAVAILABLE, which clients retry, not UNIMPLEMENTED, which they do not.
#: A stream-stream handler takes any kind of call, since it reads no request.
STARTING: Handler = grpc.stream_stream_rpc_method_handler(_refuse_while_starting)


def rich_status(error: MedimgError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])
    return rpc_status.to_status(status)


def authorize(principal: Principal, method: str, policy: RolePolicy) -> None:
    if principal.user is None:
        return
    allowed = policy.get(method.rsplit("/", 1)[-1], frozenset())
    if not principal.has_any_role(allowed):
        raise PermissionDenied(
            "ROLE_NOT_ALLOWED",
            f"{method} needs one of the roles {sorted(allowed)}",
            method=method,
        )


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # not generic at runtime
    def __init__(
        self, *, gateway: SpiffeId, policy: RolePolicy, gateway_alone: Set[str] = frozenset()
    ) -> None:
        self._gateway = gateway
        self._policy = policy
        #: Full method names the gateway calls as itself, with no user behind the call.
        self.gateway_alone = gateway_alone
        #: Told of every call refused here (unauthenticated, or a role not allowed), so
        #: the service records the attempt in the audit log; set once the service is built.
        self.on_denied: DenialHook | None = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or handler is STARTING or method.startswith(_PASS_THROUGH):
            return handler
        return _wrap(handler, method, self)

    def enter(self, method: str, context: Context) -> None:
        deadlines.set_from_remaining(context.time_remaining())
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        try:
            principal = principal_from_metadata(
                metadata, self._gateway, user_required=method not in self.gateway_alone
            )
        except Unauthenticated:
            calls.enter(calls.Call(method, Principal(UNVERIFIED)))  # for the denial's record
            raise
        calls.enter(calls.Call(method, principal))  # before authorizing: a denial names them
        authorize(principal, method, self._policy)

    async def fail(self, method: str, context: Context, error: BaseException) -> None:
        if isinstance(error, NotImplementedError):
            # The generated base servicer's answer for a method a service does not offer yet.
            error = Unimplemented("NOT_IMPLEMENTED", f"{method} is not implemented yet")
        if isinstance(error, Unauthenticated | PermissionDenied) and self.on_denied is not None:
            try:
                await self.on_denied(method, error)
            except Exception:
                log.exception("denial not recorded", extra={"fields": {"method": method}})
        if isinstance(error, MedimgError):
            status = rich_status(error)
        else:
            log.error("unexpected error in %s", method, exc_info=error)
            status = rich_status(MedimgError("INTERNAL", "internal error; see the service log"))
        await context.abort(status.code, status.details, status.trailing_metadata)


@asynccontextmanager
async def _observed(outer: CallInterceptor, method: str, context: Context) -> AsyncIterator[None]:
    """Runs one call: enters it, maps its errors to a status, and counts it with its code."""
    service, _, name = method.lstrip("/").partition("/")
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        outer.enter(method, context)
        yield
    except grpc.aio.AbortError:
        code = context.code() or grpc.StatusCode.UNKNOWN  # the servicer aborted by itself
        raise
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED  # the client went away or its deadline passed
        raise
    except Exception as error:  # noqa: BLE001 - mapped to a status right here
        if isinstance(error, NotImplementedError):
            code = grpc.StatusCode.UNIMPLEMENTED
        else:
            code = error.code if isinstance(error, MedimgError) else grpc.StatusCode.INTERNAL
        await outer.fail(method, context, error)
    finally:
        RPC_HANDLED.labels(service, name, code.name).inc()
        RPC_SECONDS.labels(service, name).observe(time.perf_counter() - started)


def _wrap(handler: Handler, method: str, outer: CallInterceptor) -> Any:
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary_response(request: Any, context: Context) -> Any:
            async with _observed(outer, method, context):
                return await inner(request, context)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary_response,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # Streaming servicers here are async generators: they yield, never context.write().
    inner_stream = handler.unary_stream or handler.stream_stream

    async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
        async with _observed(outer, method, context):
            async for response in inner_stream(request, context):
                yield response

    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return factory(
        stream_response,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
