"""Assembles the inference service from its settings: model server, audit, ingest channel."""

import logging
from contextlib import AsyncExitStack

import grpc
import prometheus_client
import redis.asyncio as aioredis

from inference import grpc_service_pb2_grpc as kserve_grpc
from medimg.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from medimg.ingest.v1 import ingest_service_pb2_grpc
from medimg.training.v1 import training_service_pb2_grpc as training_grpc
from medimg_core import channels
from medimg_core import redis as medimg_redis
from medimg_core.audit import AuditClient
from medimg_core.server import ServiceDefinition, run_in_background
from medimg_inference import kserve
from medimg_inference.backends import ENGINE_CACHE, TORCH_CPU, BackendOptions
from medimg_inference.cache import ResponseCache
from medimg_inference.metrics import register_metrics
from medimg_inference.predict import Predictor
from medimg_inference.promotion import PromotionFollower, TrainingRegistry
from medimg_inference.repository import ModelRepository
from medimg_inference.s3_models import S3_CACHE, S3Models
from medimg_inference.servicer import POLICY, InferenceServicer
from medimg_inference.serving import ModelServer
from medimg_inference.settings import InferenceSettings
from medimg_inference.startup import load_models

log = logging.getLogger(__name__)


async def build(settings: InferenceSettings, resources: AsyncExitStack) -> ServiceDefinition:
    spool: aioredis.Redis | None = None
    if settings.redis_url is not None:
        spool = medimg_redis.connect(settings.redis_url)
        resources.push_async_callback(spool.aclose)
    audit_channel = channels.outbound(settings.audit_target, settings)
    resources.push_async_callback(audit_channel.close, None)
    audit = await resources.enter_async_context(
        AuditClient.for_service(audit_channel, service="inference", settings=settings, redis=spool)
    )
    ingest_channel = channels.outbound(settings.ingest_target, settings)
    resources.push_async_callback(ingest_channel.close, None)
    cache: ResponseCache | None = None
    if settings.redis_url is not None:
        cache = ResponseCache(
            settings.redis_url,
            ttl_seconds=settings.response_cache_ttl_seconds,
            max_entry_bytes=settings.response_cache_max_entry_bytes,
            timeout_seconds=settings.response_cache_timeout_seconds,
            retry_after_seconds=settings.response_cache_retry_seconds,
        )
        resources.push_async_callback(cache.aclose)
    threads = settings.intra_op_threads
    engines = settings.model_repository / ENGINE_CACHE
    options = BackendOptions(threads, engines) if threads else BackendOptions(engine_cache=engines)
    TORCH_CPU.configure(options.intra_op_threads)
    server = ModelServer(repository(settings), options, cache=cache)
    # Unloads (answering what is queued) before the channels close: the stack unwinds in
    # reverse.
    resources.push_async_callback(server.close)
    # Triton's metrics, on the metrics port (the default registry).
    resources.callback(prometheus_client.REGISTRY.unregister, register_metrics(server))
    await load_models(server, settings.load_models)
    if spool is not None and settings.training_target is not None:
        # Promotions to this replica's alias, confirmed by the registry, are installed and
        # loaded as they come; the task stops before the model server and Redis close.
        training_channel = channels.outbound(settings.training_target, settings)
        resources.push_async_callback(training_channel.close, None)
        registry = TrainingRegistry(training_grpc.TrainingServiceStub(training_channel))
        follower = PromotionFollower(spool, server, registry, alias=settings.promotion_alias)
        run_in_background(resources, follower.run(), "inference-promotions")
    else:
        log.warning("promotions are off: they need both redis_url and training_target")
    kserve_servicer = kserve.KServeServicer(server)
    servicer = InferenceServicer(
        predictor=Predictor(server, TORCH_CPU),
        audit=audit,
        ingest=ingest_service_pb2_grpc.IngestServiceStub(ingest_channel),
        settings=settings,
    )

    def add_to_server(server: grpc.aio.Server) -> None:
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(kserve_servicer, server)

    return ServiceDefinition(
        names=[
            inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
            kserve.SERVICE,
        ],
        add_to_server=add_to_server,
        policy={**POLICY, **kserve.POLICY},
        on_denied=audit.record_denial,
    )


def repository(settings: InferenceSettings) -> ModelRepository:
    """The local repository, and the one on S3 when the settings name one."""
    remote = None
    if settings.model_repository_url is not None:
        remote = S3Models.connect(
            settings.model_repository_url,
            settings.model_repository / S3_CACHE,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    return ModelRepository(settings.model_repository, remote)
