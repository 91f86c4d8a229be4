"""Assembles the training service from its settings: database, Redis, audit, the channel
to ingest, the job runner and the servicer."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from importlib.metadata import version
from importlib.resources import files

from medimg.training.v1 import training_service_pb2, training_service_pb2_grpc
from medimg_core import channels, db
from medimg_core import redis as medimg_redis
from medimg_core.audit import AuditClient
from medimg_core.server import ServiceDefinition
from medimg_training import launchers
from medimg_training.ingest import IngestIndex, IngestProbe
from medimg_training.leader import Leadership
from medimg_training.runner import Runner, code_version
from medimg_training.servicer import POLICY, TrainingServicer
from medimg_training.settings import TrainingSettings


def _count_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


async def build(settings: TrainingSettings, resources: AsyncExitStack) -> ServiceDefinition:
    pool = await db.connect(settings.database_url)
    resources.push_async_callback(pool.close)
    await db.migrate(pool, files("medimg_training.migrations"))
    events = medimg_redis.connect(settings.redis_url)
    resources.push_async_callback(events.aclose)
    executor = resources.enter_context(ThreadPoolExecutor(settings.worker_threads, "training"))
    audit_channel = channels.outbound(settings.audit_target, settings)
    resources.push_async_callback(audit_channel.close, None)
    audit = await resources.enter_async_context(
        AuditClient.for_service(audit_channel, service="training", settings=settings, redis=events)
    )
    ingest_channel = channels.outbound(settings.ingest_target, settings)
    resources.push_async_callback(ingest_channel.close, None)
    loop = asyncio.get_running_loop()
    gpus = (
        settings.gpus if settings.gpus >= 0 else await loop.run_in_executor(executor, _count_gpus)
    )
    code = await loop.run_in_executor(executor, code_version, version("medimg-training"))
    settings.object_dir.mkdir(parents=True, exist_ok=True)
    launcher = launchers.build(settings, settings.object_dir / "jobs")
    resources.push_async_callback(launcher.aclose)
    runner = Runner(
        pool=pool,
        events=events,
        settings=settings,
        executor=executor,
        code_version=code,
        launcher=launcher,
    )
    # The runner runs while this replica leads (see `leader`); every replica serves.
    lease = Leadership(
        settings.database_url,
        on_gain=runner.start,
        on_loss=runner.close,
        on_wake=lambda _job: runner.wake(),
        retry_seconds=settings.leader_retry_seconds,
        # A cut-off leader's local workers: its connection found dead within 4 retries (a
        # wait and a check's timeout), then they get the cancel grace.
        settle_seconds=0.0
        if launcher.detached
        else 4 * settings.leader_retry_seconds + settings.cancel_grace_seconds,
    )
    # The servicer's drain closes them at shutdown; this is for a build that fails later on
    # (the runner again: a close cut short in the lease still stops its workers).
    resources.push_async_callback(runner.close)
    resources.push_async_callback(lease.close)
    await lease.start()
    servicer = TrainingServicer(
        pool=pool,
        events=events,
        audit=audit,
        runner=runner,
        lease=lease,
        probe=IngestProbe(ingest_channel, settings.default_deadline_seconds),
        index=IngestIndex(ingest_channel, settings.default_deadline_seconds),
        settings=settings,
        executor=executor,
        gpus=gpus,
    )
    return ServiceDefinition(
        names=[training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name],
        add_to_server=lambda server: (
            training_service_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)
        ),
        policy=POLICY,
        on_denied=audit.record_denial,
        on_drain=servicer.drain,
    )
