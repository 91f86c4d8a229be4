"""Assembles the inference service from its settings."""

from contextlib import AsyncExitStack

from medimg.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from medimg_core.server import ServiceDefinition
from medimg_inference.servicer import POLICY, InferenceServicer
from medimg_inference.settings import InferenceSettings


async def build(settings: InferenceSettings, resources: AsyncExitStack) -> ServiceDefinition:
    servicer = InferenceServicer()
    return ServiceDefinition(
        names=[inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name],
        add_to_server=lambda server: (
            inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        ),
        policy=POLICY,
    )
