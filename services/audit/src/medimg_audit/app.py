"""Assembles the audit service from its settings: database, migrations, servicer."""

from contextlib import AsyncExitStack
from importlib.resources import files

from medimg.audit.v1 import audit_service_pb2, audit_service_pb2_grpc
from medimg_audit.servicer import POLICY, AuditServicer
from medimg_audit.settings import AuditSettings
from medimg_core import db
from medimg_core.server import ServiceDefinition


async def build(settings: AuditSettings, resources: AsyncExitStack) -> ServiceDefinition:
    pool = await db.connect(settings.database_url)
    resources.push_async_callback(pool.close)
    await db.migrate(pool, files("medimg_audit.migrations"))
    servicer = AuditServicer(pool)
    return ServiceDefinition(
        names=[audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name],
        add_to_server=lambda server: audit_service_pb2_grpc.add_AuditServiceServicer_to_server(
            servicer, server
        ),
        policy=POLICY,
    )
