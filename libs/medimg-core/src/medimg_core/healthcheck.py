"""`python -m medimg_core.healthcheck [HOST:PORT]`: exit 0 if the service answers SERVING.

The image's HEALTHCHECK (docker, compose) and an operator in a pod (`kubectl exec`) use it;
Kubernetes itself probes natively over gRPC through the sidecar's health port. It asks the
service's plaintext port on 127.0.0.1, so it runs beside the service, in its container.
Without an argument the address is 127.0.0.1 and `MEDIMG_<SERVICE>_PORT`, where SERVICE
is `MEDIMG_SERVICE` (set in the image).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_SECONDS = 2.0


def target(argv: list[str], environ: dict[str, str]) -> str:
    if argv:
        return argv[0]
    service = environ.get("MEDIMG_SERVICE", "")
    port = environ.get(f"MEDIMG_{service.upper()}_PORT", "")
    if not service or not port:
        raise SystemExit(
            "usage: python -m medimg_core.healthcheck HOST:PORT "
            "(or set MEDIMG_SERVICE and MEDIMG_<SERVICE>_PORT)"
        )
    return f"127.0.0.1:{port}"


def check(address: str, timeout: float = TIMEOUT_SECONDS) -> bool:
    """Whether the overall health ("" service) of the server at address is SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError as error:
            print(f"{address}: {error.code().name}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{address}: {status}")
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def main() -> int:
    return 0 if check(target(sys.argv[1:], dict(os.environ))) else 1


if __name__ == "__main__":
    sys.exit(main())
