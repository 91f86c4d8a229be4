"""What the current RPC is and who made it, for code far from the servicer (the audit client)."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from medimg_core.identity import Principal

#: The servicer context of any RPC, as servicer methods take it.
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class Call:
    """The RPC being handled: its full method name and its verified caller."""

    method: str
    principal: Principal


_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("call", default=None)


def enter(call: Call) -> None:
    _current.set(call)


def current() -> Call | None:
    return _current.get()


#: A transcoded answer's HTTP status, where a protocol wants another success code than 200
#: (the gateway turns this response header into the status; see medimg_cli.mesh).
HTTP_STATUS_HEADER = "x-medimg-http-status"


async def set_http_status(context: Context, status: int) -> None:
    """Sets the HTTP status the gateway answers a transcoded call with. Before any reply."""
    await context.send_initial_metadata(((HTTP_STATUS_HEADER, str(status)),))
