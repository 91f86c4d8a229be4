"""SIGTERM during a call: health turns NOT_SERVING, the call completes, the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_cli import demo
from medimg_cli.platform import Platform
from medimg_cli.testing import free_port_offset
from tests.helpers import fresh_instance


async def test_sigterm_drains_in_flight_calls(platform: Platform) -> None:
    # A second ingest process beside the platform's, on a port of its own, so the
    # session's platform keeps its ingest. It reports to audit through ingest's sidecar.
    port = 7101 + free_port_offset(platform.mesh, start=platform.port_offset + 1000)
    env = platform.service_env(
        "ingest",
        PORT=str(port),
        METRICS_PORT="0",
        DIMSE_PORT="0",  # the platform's ingest has the DIMSE port
        DRAIN_DELAY_SECONDS="2",
        GRACE_SECONDS="20",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "medimg_ingest",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    # The service trusts its sidecar's XFCC header; called directly, the test sets it.
    caller = [("x-forwarded-client-cert", f"URI={platform.mesh.spiffe('ops')}")]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            return int(answer.status)

        deadline = time.monotonic() + 30
        while True:
            try:
                if await status() == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            assert process.returncode is None, "the extra ingest exited at start-up"
            assert time.monotonic() < deadline, "the extra ingest did not start"
            await asyncio.sleep(0.1)

        requests = list(demo.chunks(fresh_instance(), size=4096))
        upload = ingest_grpc.IngestServiceStub(channel).UploadInstances
        call = upload(metadata=caller, timeout=30)  # type: ignore[call-arg]  # write() style
        await call.write(requests[0])  # the call is now in flight

        process.send_signal(signal.SIGTERM)
        seen = None
        for _ in range(50):
            seen = await status()
            if seen == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.02)
        assert seen == health_pb2.HealthCheckResponse.NOT_SERVING

        for request in requests[1:]:
            await call.write(request)
        await call.done_writing()
        answer = await call
        assert answer.results[0].outcome == ingest_pb.InstanceResult.OUTCOME_STORED

    assert await asyncio.wait_for(process.wait(), 30) == 0
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    assert '"message": "draining"' in log and '"message": "stopped"' in log
