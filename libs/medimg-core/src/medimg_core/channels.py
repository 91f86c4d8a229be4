"""Client channels to other services, always through the local sidecar's outbound listener.

The sidecar originates mTLS and pins the target's identity, so the channel to it is
plaintext on 127.0.0.1; traces propagate through the OpenTelemetry interceptors.
"""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from medimg_core.settings import ServiceSettings


def outbound(target: str, settings: ServiceSettings) -> grpc.aio.Channel:
    limit = settings.max_message_bytes
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
        interceptors=aio_client_interceptors(),  # type: ignore[no-untyped-call]
    )
