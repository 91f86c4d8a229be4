"""Prometheus metrics of the inference service, with the names and meanings of Triton's.

One collector reads ModelServer's statistics snapshots when Prometheus scrapes, so the
batcher's ModelStatistics stays the one place where requests are counted. Labels are
`model` and `version` (the GPU metrics: `gpu_uuid`); nothing else, so no PHI.

Triton exposes its cumulative metrics without the `_total` suffix that prometheus_client
adds to every counter, so these are exposed untyped to keep Triton's names, and with them
the dashboards and alerts written for Triton. They are counters all the same: they only
grow while a version serves, and start again from zero when it is loaded afresh.

The GPU metrics (`nv_gpu_utilization`, `nv_gpu_memory_total_bytes`,
`nv_gpu_memory_used_bytes`) appear only where NVML finds a GPU: through nvidia-ml-py
(`pynvml`), or else through torch.cuda, imported only then.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from medimg_inference.batcher import ModelStatistics
from medimg_inference.serving import ModelServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Cumulative:
    name: str
    documentation: str
    # Reads the value from a snapshot.
    field: str
    # Nanoseconds shown as microseconds, as Triton's `_duration_us` counters.
    microseconds: bool = False


CUMULATIVE = (
    _Cumulative(
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        "success_count",
    ),
    _Cumulative(
        "nv_inference_request_failure",
        "Number of failed inference requests, all batch sizes",
        "failure_count",
    ),
    _Cumulative(
        "nv_inference_count",
        "Number of inferences performed (does not include cached requests)",
        "inference_count",
    ),
    _Cumulative(
        "nv_inference_exec_count",
        "Number of model executions performed (does not include cached requests)",
        "execution_count",
    ),
    _Cumulative(
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds (includes cached requests)",
        "success_ns",
        microseconds=True,
    ),
    _Cumulative(
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
        "queue_ns",
        microseconds=True,
    ),
    _Cumulative(
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds (does not include cached requests)",
        "compute_input_ns",
        microseconds=True,
    ),
    _Cumulative(
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
        "compute_infer_ns",
        microseconds=True,
    ),
    _Cumulative(
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds (does not include "
        "cached requests)",
        "compute_output_ns",
        microseconds=True,
    ),
    _Cumulative("nv_cache_num_hits_per_model", "Number of cache hits per model", "cache_hit_count"),
    _Cumulative(
        "nv_cache_num_misses_per_model", "Number of cache misses per model", "cache_miss_count"
    ),
    _Cumulative(
        "nv_cache_hit_duration_per_model",
        "Total cache hit duration per model, in microseconds",
        "cache_hit_ns",
        microseconds=True,
    ),
    _Cumulative(
        "nv_cache_miss_duration_per_model",
        "Total cache miss (lookup and insertion) duration per model, in microseconds",
        "cache_miss_ns",
        microseconds=True,
    ),
)


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one scrape: utilization in [0, 1], memory in bytes."""

    uuid: str
    utilization: float
    memory_total_bytes: int
    memory_used_bytes: int


class GpuProbe:
    """Reads the GPUs through NVML; reads nothing where there is no GPU or no NVML. The
    first failure to initialise NVML is final: a machine does not grow a GPU."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._tried = False

    def read(self) -> list[GpuReading]:
        nvml = self._init()
        if nvml is None:
            return self._read_torch()
        try:
            readings = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                readings.append(
                    GpuReading(
                        uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                        utilization=rates.gpu / 100.0,
                        memory_total_bytes=int(memory.total),
                        memory_used_bytes=int(memory.used),
                    )
                )
            return readings
        except nvml.NVMLError:
            log.warning("NVML failed to read the GPUs", exc_info=True)
            return []

    def _init(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                nvml = importlib.import_module("pynvml")
                nvml.nvmlInit()
            except Exception:  # noqa: BLE001 - no NVML library or no driver: no GPU metrics
                return None
            self._nvml = nvml
        return self._nvml

    def _read_torch(self) -> list[GpuReading]:
        """torch.cuda's view, where nvidia-ml-py is missing but torch sees a GPU (torch's
        utilization needs NVML too, so it is left out if that fails)."""
        try:
            import torch
        except ImportError:
            return []
        if not torch.cuda.is_available():
            return []
        readings = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            try:
                utilization = torch.cuda.utilization(index) / 100.0
            except Exception:  # noqa: BLE001 - torch reads utilization through NVML
                utilization = float("nan")
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            readings.append(GpuReading(f"GPU-{uuid}", utilization, total, total - free))
        return readings


class InferenceCollector(Collector):
    """Triton's per-model metrics from `server`'s statistics, and its GPU metrics."""

    def __init__(self, server: ModelServer, gpus: GpuProbe | None = None) -> None:
        self.server = server
        self.gpus = gpus or GpuProbe()

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: the GPU metrics exist only where a GPU does, and the registry
        # then skips its check for names registered twice (a process that builds the service
        # twice, as tests do, registers one collector per model server).
        return []

    def collect(self) -> Iterable[Metric]:
        # Runs on the metrics server's thread: statistics() copies before it reads.
        snapshots = sorted(self.server.statistics().items())
        for spec in CUMULATIVE:
            metric = Metric(spec.name, spec.documentation, "unknown")
            for (model, version), statistics in snapshots:
                metric.add_sample(
                    spec.name, {"model": model, "version": str(version)}, _value(spec, statistics)
                )
            yield metric
        yield from self._gpu_metrics()

    def _gpu_metrics(self) -> Iterator[Metric]:
        readings = self.gpus.read()
        if not readings:
            return
        families = {
            "utilization": GaugeMetricFamily(
                "nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"]
            ),
            "memory_total_bytes": GaugeMetricFamily(
                "nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=["gpu_uuid"]
            ),
            "memory_used_bytes": GaugeMetricFamily(
                "nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"]
            ),
        }
        for reading in readings:
            for field, family in families.items():
                family.add_metric([reading.uuid], float(getattr(reading, field)))
        yield from families.values()


def _value(spec: _Cumulative, statistics: ModelStatistics) -> float:
    value: int = getattr(statistics, spec.field)
    return value // 1000 if spec.microseconds else value


def register_metrics(
    server: ModelServer, registry: CollectorRegistry = prometheus_client.REGISTRY
) -> InferenceCollector:
    """Registers the collector of `server`'s metrics (by default where
    medimg_core.telemetry.start_metrics_server serves them) and returns it, for
    `registry.unregister` when the server goes."""
    collector = InferenceCollector(server)
    registry.register(collector)
    return collector
