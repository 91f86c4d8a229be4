"""Assembles the audit service from its settings: database, migrations, signer, servicer."""

from contextlib import AsyncExitStack
from importlib.resources import files

import grpc

from medimg.audit.v1 import audit_service_pb2, audit_service_pb2_grpc
from medimg.envoy import als_pb2, als_pb2_grpc
from medimg_audit import checkpoints, log, logins
from medimg_audit.servicer import POLICY, AuditServicer
from medimg_audit.settings import AuditSettings
from medimg_core import db
from medimg_core.server import ServiceDefinition, run_in_background


async def build(settings: AuditSettings, resources: AsyncExitStack) -> ServiceDefinition:
    signer = checkpoints.Signer.from_file(
        settings.signing_key_file, settings.origin, settings.previous_public_key_files
    )
    owner = await db.connect(settings.database_url, max_size=1)
    try:
        await db.migrate(owner, files("medimg_audit.migrations"))
    finally:
        await owner.close()
    # From here on the service works as a role that can only append and read.
    pool = await db.connect(settings.database_url, role=settings.database_role)
    resources.push_async_callback(pool.close)
    run_in_background(
        resources,
        checkpoints.sign_periodically(pool, signer, settings.checkpoint_interval_seconds),
        "audit-checkpoints",
    )
    appender = log.Appender(pool)
    servicer = AuditServicer(pool, appender, signer)
    refused_logins = logins.RefusedLogins(appender)

    def add_to_server(server: grpc.aio.Server) -> None:
        audit_service_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(refused_logins, server)

    return ServiceDefinition(
        names=[
            audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
            als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name,
        ],
        add_to_server=add_to_server,
        policy=POLICY,
        on_denied=servicer.record_denial,
        gateway_alone=frozenset({logins.METHOD}),
    )
