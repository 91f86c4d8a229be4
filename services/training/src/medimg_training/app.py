"""Assembles the training service from its settings."""

from contextlib import AsyncExitStack

from medimg.training.v1 import training_service_pb2, training_service_pb2_grpc
from medimg_core.server import ServiceDefinition
from medimg_training.servicer import POLICY, TrainingServicer
from medimg_training.settings import TrainingSettings


async def build(settings: TrainingSettings, resources: AsyncExitStack) -> ServiceDefinition:
    servicer = TrainingServicer()
    return ServiceDefinition(
        names=[training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name],
        add_to_server=lambda server: (
            training_service_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)
        ),
        policy=POLICY,
    )
