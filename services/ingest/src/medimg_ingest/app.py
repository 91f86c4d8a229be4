"""Assembles the ingest service from its settings: index, object store, events, audit,
de-identification policy and keys."""

from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from importlib.resources import files

from medimg.ingest.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from medimg_core import channels, db
from medimg_core import redis as medimg_redis
from medimg_core.audit import AuditClient
from medimg_core.server import ServiceDefinition, run_in_background
from medimg_ingest.dimse import DimseServer
from medimg_ingest.identities import IdentityVault
from medimg_ingest.objects import open_store
from medimg_ingest.pipeline import Pipeline, sweep_forever
from medimg_ingest.servicer import POLICY, IngestServicer
from medimg_ingest.settings import IngestSettings, policy_of
from medimg_ingest.workers import Workers


async def build(settings: IngestSettings, resources: AsyncExitStack) -> ServiceDefinition:
    pool = await db.connect(settings.database_url)
    resources.push_async_callback(pool.close)
    await db.migrate(pool, files("medimg_ingest.migrations"))
    events = medimg_redis.connect(settings.redis_url)
    resources.push_async_callback(events.aclose)
    executor = resources.enter_context(ThreadPoolExecutor(settings.worker_threads, "ingest"))
    workers = Workers(settings.worker_processes) if settings.worker_processes else None
    if workers is not None:
        resources.callback(workers.close)  # after the server and the pipeline stop
    audit_channel = channels.outbound(settings.audit_target, settings)
    resources.push_async_callback(audit_channel.close, None)
    # The instance-event Redis doubles as the durable audit spool while audit is down; the
    # drainer stops before the channel and Redis close (the exit stack unwinds in reverse).
    audit = await resources.enter_async_context(
        AuditClient.for_service(audit_channel, service="ingest", settings=settings, redis=events)
    )
    vault = IdentityVault.from_file(
        settings.identity_key_file, settings.previous_identity_key_files
    )
    objects = open_store(settings)
    run_in_background(
        resources,
        sweep_forever(pool, objects, executor, settings.orphan_grace_seconds),
        "ingest-orphan-sweep",
    )
    pipeline = Pipeline(
        pool=pool,
        objects=objects,
        events=events,
        executor=executor,
        report=audit.report,
        policy=policy_of(settings),
        deid_key=settings.deid_key_file.read_bytes(),
        vault=vault,
        workers=workers,
    )
    if settings.dimse_port:
        dimse = DimseServer(
            ingest=pipeline.ingest,
            pool=pool,
            report=audit.report,
            ae_title=settings.dimse_ae_title,
            host=settings.dimse_host,
            port=settings.dimse_port,
            max_associations=settings.dimse_max_associations,
        )
        dimse.start()
        # Stops first at shutdown (the stack unwinds in reverse), while the pipeline works.
        resources.callback(dimse.stop)
    servicer = IngestServicer(
        pool=pool,
        pipeline=pipeline,
        audit=audit,
        settings=settings,
        vault=vault,
        objects=objects,
        executor=executor,
    )
    return ServiceDefinition(
        names=[ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name],
        add_to_server=lambda server: ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(
            servicer, server
        ),
        policy=POLICY,
        on_denied=audit.record_denial,
    )
