"""A training worker: `python -m medimg_training.worker CONFIG` (one process), or the same
under `torchrun` (several processes, DDP over gloo on CPU, NCCL on GPUs).

CONFIG is the JSON file the runner writes into the job's directory (see `runner`). The
worker fetches the dataset's volumes from ingest's `GetSeriesPixels` through the
training sidecar's outbound listener, caches them, trains the network of the spec,
reports progress to Redis (`MEDIMG_TRAINING_REDIS_URL` in its environment: the URL may
hold a password, so it stays out of CONFIG, which lies on the shared volume),
checkpoints into the job's directory, and on success exports the bundle the inference
service loads (see `bundle`). A failure writes `error-rank<N>.json` (the error's type
and message; never pixels or pseudonyms) before the process exits non-zero.

Several processes: `torchrun` (local launcher, one pod of a Kubernetes Job) or one process
per pod of a Kubeflow PyTorchJob; either way `torch.distributed` reads MASTER_ADDR,
MASTER_PORT, WORLD_SIZE and RANK from the environment (`env://`).

Traces: with `MEDIMG_TRAINING_OTLP_ENDPOINT` set, every rank exports its spans there (as
`medimg-training-worker`, with a `medimg.training.rank` attribute): `training.worker` as a
child of the launching span in `TRACEPARENT`, and under it `training.fetch` (rank 0),
`training.load_data`, one `training.epoch` per epoch (epoch, mean loss and, on rank 0, the
validation metrics), `training.checkpoint` and `training.export` (rank 0). They carry the
job id, the dataset's name, numbers and exception types, never series or pseudonyms, and
are flushed before the process exits, a failed one too. SIGTERM (a cancel, a deadline, a
deleted pod) unwinds the worker as the exception `Stopped`, so a stopped worker's spans are
exported too (ending in ERROR `Stopped`) before it dies of the signal.

Images: each series is a float32 volume (slices, rows, columns[, samples]) in modality
units, samples averaged into one channel. Networks see it in MONAI's axis order, as the
inference service hands it to them: a 3D network the whole volume (1, columns, rows,
slices), a 2D network every slice (1, columns, rows). A 2D classifier learns from every
slice, each with its series' class, and is validated as Predict answers: the mean of the
slices' probabilities per series. A segmenter's labels are the SEG's label volume that
ingest serves on the image's grid, matched slice by slice through the instance and frame
of both headers. Images are scaled to [0, 1] per image (MONAI `ScaleIntensity`) and
resized to `spec.image_size` (labels by nearest neighbour).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Config = Mapping[str, Any]
Volume = npt.NDArray[np.float32]
#: The workers' spans (a no-op until `tracing` configures a provider).
tracer = trace.get_tracer("medimg_training.worker")


@contextlib.contextmanager
def span(
    name: str, attributes: Mapping[str, str | int] | None = None, parent: Any = None
) -> Iterator[trace.Span]:
    """A span of the worker. An exception leaving it sets status ERROR and an `exception`
    event with its type and where it was raised: not its message, which may quote data (as
    the services' logs; OpenTelemetry's own recording would keep the message)."""
    with tracer.start_as_current_span(
        name, parent, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as error:
            current.set_status(trace.StatusCode.ERROR, type(error).__name__)
            current.add_event("exception", _exception_attributes(error))
            raise


def _exception_attributes(error: BaseException) -> dict[str, str]:
    where = error.__traceback__
    while where is not None and where.tb_next is not None:
        where = where.tb_next
    attributes = {"exception.type": type(error).__name__}
    if where is not None:
        attributes["code.location"] = f"{where.tb_frame.f_code.co_filename}:{where.tb_lineno}"
    return attributes


# Fetching and caching ------------------------------------------------------------------


def cache_path(cache_dir: Path, series: str) -> Path:
    """A cached volume's file: named by a hash of the series name, holding pixels only."""
    return cache_dir / f"{hashlib.sha256(series.encode()).hexdigest()[:40]}.npy"


#: A slice of a series: the (de-identified) SOP Instance UID of its instance, and its
#: frame in that instance (from 1).
Slice = tuple[str, int]


def slices_path(cache_dir: Path, series: str) -> Path:
    """Beside a cached volume: each slice's instance and frame."""
    return cache_path(cache_dir, series).with_suffix(".frames.json")


def fetch_with_slices(config: Config, series: str) -> tuple[Volume, list[Slice]]:
    """The series' volume and the instance and frame of each of its slices."""
    path = slices_path(Path(config["cache_dir"]), series)
    if not path.is_file():
        cache_path(Path(config["cache_dir"]), series).unlink(missing_ok=True)
    volume = fetch(config, series)
    slices = json.loads(path.read_text())
    return volume, [(str(uid), int(frame)) for uid, frame in slices]


def fetch(config: Config, series: str) -> Volume:
    """The series' volume, from the cache or else from ingest (then cached, with the UIDs
    of its slices)."""
    import grpc

    from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
    from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc

    path = cache_path(Path(config["cache_dir"]), series)
    if path.is_file():
        cached: Volume = np.load(path)
        return cached
    limit = int(config["max_message_bytes"])
    options = [("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(config["ingest_target"], options=options) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        header: Any = None
        chunks: list[bytes] = []
        stream = stub.GetSeriesPixels(
            ingest_pb.GetSeriesPixelsRequest(name=series), timeout=config["fetch_deadline_seconds"]
        )
        for message in stream:
            if message.HasField("header"):
                header = message.header
            chunks.append(message.data)
    if header is None:
        raise RuntimeError(f"ingest sent no volume header for {series}")
    volume = np.frombuffer(b"".join(chunks), dtype="<f4").reshape(tuple(header.shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    # An ingest without frame numbers serves single-frame slices only.
    frames = list(header.frame_numbers) or [1] * len(header.sop_instance_uids)
    _write_json(
        slices_path(path.parent, series), list(zip(header.sop_instance_uids, frames, strict=True))
    )
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    with partial.open("wb") as out:
        np.save(out, volume)
    partial.replace(path)
    return volume.astype(np.float32)


def network_inputs(volume: Volume, spatial_dims: int) -> list[Volume]:
    """What a network sees of a (slices, rows, columns[, samples]) volume, as inference hands
    it over: each slice as (1, columns, rows) for a 2D network, the whole volume as
    (1, columns, rows, slices) for a 3D one; see the module docstring."""
    array = volume.mean(axis=-1) if volume.ndim == 4 else volume
    if spatial_dims == 2:
        return [np.ascontiguousarray(plane.T[None], dtype=np.float32) for plane in array]
    return [np.ascontiguousarray(array.transpose(2, 1, 0)[None], dtype=np.float32)]


def labels_on_image(
    labels: Volume, label_slices: Sequence[Slice], image: Volume, image_slices: Sequence[Slice]
) -> Volume:
    """The label volume on the image's slices, matched by instance and frame: (slices, rows,
    columns) like the image, 0 on slices the labels do not cover."""
    where = {uid: k for k, uid in enumerate(label_slices)}
    if not set(where) <= set(image_slices) or labels.shape[1:3] != image.shape[1:3]:
        raise ValueError(
            "the label series does not segment its image series: its slices name other "
            "instances, or differ in rows and columns"
        )
    placed = np.zeros(image.shape[:3], dtype=np.float32)
    for k, uid in enumerate(image_slices):
        if uid in where:
            placed[k] = labels[where[uid]]
    return placed


def segmentation_records(
    config: Config, item: Mapping[str, Any], spatial_dims: int, group: int
) -> list[dict[str, Any]]:
    """The (image, label) records of one item: one per slice (2D) or the volume (3D), each
    with the item's `group` (validation measures Dice per volume)."""
    image, image_slices = fetch_with_slices(config, item["series"])
    labels, label_slices = fetch_with_slices(config, item["label_series"])
    placed = labels_on_image(labels, label_slices, image, image_slices)
    classes = len(config["class_names"])
    highest = int(placed.max(initial=0))
    if highest >= classes or placed.min(initial=0) < 0:
        raise ValueError(
            f"a label series holds label {highest}, but the dataset names {classes} labels "
            f"(0 to {classes - 1}): give the dataset one class name per segment number"
        )
    return [
        {"image": picture, "label": label, "group": group}
        for picture, label in zip(
            network_inputs(image, spatial_dims), network_inputs(placed, spatial_dims), strict=True
        )
    ]


def classification_records(
    config: Config, item: Mapping[str, Any], spatial_dims: int, group: int
) -> list[dict[str, Any]]:
    """The records of one item: each slice (2D) or the volume (3D) with the item's class,
    and its `group` (validation averages a series' slices, as Predict does)."""
    volume = fetch(config, item["series"])
    return [
        {"image": picture, "label": item["label_index"], "group": group}
        for picture in network_inputs(volume, spatial_dims)
    ]


# Training ----------------------------------------------------------------------------


def preprocessing(image_size: Sequence[int]) -> list[dict[str, Any]]:
    """The array transforms every image goes through, as MONAI configs (for metadata.json)."""
    return [
        {"_target_": "ScaleIntensity", "minv": 0.0, "maxv": 1.0},
        {"_target_": "Resize", "spatial_size": list(image_size)},
    ]


class Reporter:
    """Sends progress to the job's Redis stream (rank 0 only)."""

    def __init__(self, config: Config, enabled: bool) -> None:
        from medimg_training import progress

        self.enabled = enabled
        self.stream = progress.stream(config["job_id"])
        self.max_entries = progress.MAX_ENTRIES
        self.encode = progress.encode
        if enabled:
            import redis

            url = os.environ.get("MEDIMG_TRAINING_REDIS_URL")
            if not url:
                raise RuntimeError(
                    "MEDIMG_TRAINING_REDIS_URL is unset: the workers report progress to the "
                    "training service's Redis (the pod template takes it from the Secret "
                    "medimg-redis, the local launcher passes the service's own)"
                )
            self.client: Any = redis.Redis.from_url(url, socket_timeout=5)

    def report(self, values: Mapping[str, Any]) -> None:
        if self.enabled:
            fields = self.encode({"state": "running", "time": time.time(), **values})
            self.client.xadd(self.stream, fields, maxlen=self.max_entries, approximate=True)


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(value))
    partial.replace(path)


def latest_checkpoint(job_dir: Path) -> Path | None:
    pointer = job_dir / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    return job_dir / "checkpoints" / str(json.loads(pointer.read_text())["file"])


def train(  # noqa: PLR0912, PLR0915 - one loop, read top to bottom
    config: Config, rank: int, world: int
) -> dict[str, float]:
    import torch
    import torch.distributed as dist
    from monai.data.dataset import CacheDataset
    from monai.transforms.compose import Compose
    from monai.transforms.intensity.dictionary import ScaleIntensityd
    from monai.transforms.spatial.dictionary import Resized
    from monai.transforms.utility.dictionary import EnsureTyped
    from monai.utils.misc import set_determinism
    from torch.utils.data import DataLoader, DistributedSampler

    from medimg_training import networks

    spec = config["spec"]
    job_dir = Path(config["job_dir"])
    image_size = list(spec["image_size"])
    seed = int(spec["seed"])
    set_determinism(seed=seed)
    gpus = int(spec["resources"]["gpus"])
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if gpus else "cpu")

    segmenting = config.get("task") == "segmentation"

    def records(split: str) -> list[dict[str, Any]]:
        chosen = [item for item in config["items"] if item["split"] == split]
        of_item = segmentation_records if segmenting else classification_records
        return [record for group, item in enumerate(chosen)
                for record in of_item(config, item, len(image_size), group)]  # fmt: skip

    keys = ["image", "label"] if segmenting else ["image"]
    transform = Compose(
        [
            ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
            Resized(keys=keys, spatial_size=image_size, mode=["area", "nearest"][: len(keys)]),
            EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
        ]
    )
    with span("training.load_data") as loading:
        train_set = CacheDataset(records("train"), transform, cache_rate=1.0, progress=False)
        validation_set = CacheDataset(
            records("validation"), transform, cache_rate=1.0, progress=False
        )
        loading.set_attribute("medimg.training.train_records", len(train_set))
        loading.set_attribute("medimg.training.validation_records", len(validation_set))
    per_rank = int(spec["batch_size"]) // world
    # The same sampler for one process or many: rank r's k-th batch is the r-th share of
    # the one process's k-th batch, so DDP with the same global batch follows the same path.
    sampler: DistributedSampler[Any] = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed
    )
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=0)
    epochs = int(spec["epochs"])
    steps_per_epoch = math.ceil(len(sampler) / per_rank)
    total_steps = epochs * steps_per_epoch
    if spec["max_steps"]:
        total_steps = min(total_steps, int(spec["max_steps"]))

    torch.manual_seed(seed)
    model = networks.build(spec["network"]["name"], config["network_arguments"]).to(device)
    optimizer_class = getattr(torch.optim, spec["optimizer"]["name"])
    optimizer = optimizer_class(
        model.parameters(),
        lr=spec["optimizer"]["learning_rate"],
        weight_decay=spec["optimizer"]["weight_decay"],
    )
    scheduler: Any = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
        if spec["schedule"] == "cosine"
        else None
    )
    step, metrics = 0, {}
    checkpoint = latest_checkpoint(job_dir) if config["resume"] else None
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        metrics = {k: float(v) for k, v in json.loads(state["metrics"]).items()}
    core = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if gpus else None
        )
    loss_function = loss_of(spec["loss"])
    amp = bool(spec["mixed_precision"])
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    reporter = Reporter(config, enabled=rank == 0)
    every = int(spec["checkpoint_every_steps"])

    def save() -> None:
        if rank != 0:
            return
        with span("training.checkpoint", {"medimg.training.step": step}):
            directory = job_dir / "checkpoints"
            directory.mkdir(parents=True, exist_ok=True)
            name = f"step-{step}.pt"
            state = {
                "model": core.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "step": step,
                "metrics": json.dumps(metrics),
            }
            torch.save(state, directory / f"{name}.tmp")
            (directory / f"{name}.tmp").replace(directory / name)
            _write_json(directory / "latest.json", {"file": name, "step": step})

    started, images_done = time.monotonic(), 0
    latest: dict[str, Any] = {"epoch": step // steps_per_epoch + 1, "epochs": epochs,
                              "step": step, "total_steps": total_steps}  # fmt: skip
    start_epoch, skip = divmod(step, steps_per_epoch)
    for epoch in range(start_epoch, epochs):
        if step >= total_steps:
            break
        with span(
            "training.epoch", {"medimg.training.epoch": epoch + 1, "medimg.training.epochs": epochs}
        ) as epoch_span:
            losses: list[float] = []
            sampler.set_epoch(epoch)
            model.train()
            for index, batch in enumerate(loader):
                if epoch == start_epoch and index < skip:
                    continue
                if step >= total_steps:
                    break
                images = batch["image"].to(device)
                labels = torch.as_tensor(batch["label"]).to(device)
                labels = labels if segmenting else labels.long()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    loss = loss_function(model(images), labels)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                shown = loss.detach().float().clone()
                if world > 1:
                    dist.all_reduce(shown)
                    shown /= world
                images_done += images.shape[0] * world
                elapsed = max(time.monotonic() - started, 1e-9)
                rate = images_done / elapsed
                seconds_per_step = elapsed / max(step - start_epoch * steps_per_epoch - skip, 1)
                latest = {
                        "epoch": epoch + 1, "epochs": epochs, "step": step,
                        "total_steps": total_steps, "loss": float(shown),
                        "metrics": metrics, "images_per_second": rate,
                        "eta_seconds": seconds_per_step * (total_steps - step),
                }  # fmt: skip
                losses.append(float(shown))
                reporter.report(latest)
                if every and step % every == 0:
                    save()
            if rank == 0:
                measure = validate_segmentation if segmenting else validate
                metrics = measure(core, validation_set, device, len(config["class_names"]))
                reporter.report({**latest, "metrics": metrics})
                epoch_span.set_attributes(
                    {f"medimg.training.metric.{name}": value for name, value in metrics.items()}
                )
            if losses:
                epoch_span.set_attribute("medimg.training.loss", sum(losses) / len(losses))
            epoch_span.set_attribute("medimg.training.step", step)
            if world > 1:
                dist.barrier()
            if not every:
                save()
    return metrics


def loss_of(name: str) -> Any:
    """The loss of the spec: on logits, against class indices (classification) or a label
    map of one channel (segmentation, one-hot and softmax inside the loss)."""
    import torch
    from monai.losses.dice import DiceCELoss, DiceLoss

    if name == "DiceLoss":
        return DiceLoss(to_onehot_y=True, softmax=True)
    if name == "DiceCELoss":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    return torch.nn.CrossEntropyLoss()


def validate_segmentation(model: Any, dataset: Any, device: Any, classes: int) -> dict[str, float]:
    """Dice over the validation split (MONAI `DiceMetric`, labels other than 0), per volume
    (a 2D network's slices are stacked back into theirs) and averaged: `dice`, and with
    several labels `dice_<label>` per label. Empty if there is nothing to measure."""
    import torch
    from monai.metrics.meandice import DiceMetric

    if len(dataset) == 0:
        return {}
    model.eval()
    groups: dict[int, tuple[list[Any], list[Any]]] = {}
    with torch.no_grad():
        for record in dataset:
            logits = model(record["image"][None].to(device))
            predicted, truth = groups.setdefault(int(record["group"]), ([], []))
            predicted.append(logits.float().argmax(dim=1, keepdim=True).cpu())
            truth.append(record["label"][None].cpu())
    model.train()
    metric = DiceMetric(include_background=False, reduction="mean_batch", num_classes=classes)
    for predicted, truth in groups.values():
        if len(predicted) > 1:  # a 2D network's slices, stacked back into their volume
            metric(y_pred=torch.stack(predicted, dim=-1), y=torch.stack(truth, dim=-1))
        else:
            metric(y_pred=predicted[0], y=truth[0])
    per_label = metric.aggregate()
    assert isinstance(per_label, torch.Tensor)
    values = [float(v) for v in per_label.reshape(-1)]
    found = [v for v in values if math.isfinite(v)]
    if not found:
        return {}
    metrics = {"dice": sum(found) / len(found)}
    if len(values) > 1:
        metrics.update({f"dice_{k + 1}": v for k, v in enumerate(values) if math.isfinite(v)})
    return metrics


def validate(model: Any, dataset: Any, device: Any, classes: int) -> dict[str, float]:
    """Accuracy and macro AUC over the validation split's series (empty if it has none),
    each scored as Predict scores it: the mean of its slices' probabilities."""
    import torch
    from monai.metrics.rocauc import compute_roc_auc

    if len(dataset) == 0:
        return {}
    model.eval()
    groups: dict[int, tuple[list[Any], int]] = {}
    with torch.no_grad():
        for record in dataset:
            logits = model(record["image"][None].to(device))
            scores, _ = groups.setdefault(int(record["group"]), ([], int(record["label"])))
            scores.append(torch.softmax(logits.float(), dim=1)[0].cpu())
    model.train()
    predicted = torch.stack([torch.stack(scores).mean(dim=0) for scores, _ in groups.values()])
    labels = [label for _, label in groups.values()]
    truth = torch.tensor(labels)
    metrics = {"accuracy": float((predicted.argmax(dim=1) == truth).float().mean())}
    if len(set(labels)) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one_hot = torch.nn.functional.one_hot(truth, classes)
            auc = compute_roc_auc(predicted, one_hot, average="macro")
        if isinstance(auc, float) and math.isfinite(auc):
            metrics["auc"] = auc
    return metrics


# Entry -------------------------------------------------------------------------------


@contextlib.contextmanager
def tracing(config: Config, rank: int, world: int) -> Iterator[None]:
    """The worker's root span, a child of the launching span (`TRACEPARENT`), exported to
    `MEDIMG_TRAINING_OTLP_ENDPOINT` and flushed on the way out; nothing without an endpoint.
    An exception leaving it is recorded as `span` records one."""
    endpoint = os.environ.get("MEDIMG_TRAINING_OTLP_ENDPOINT")
    if not endpoint:
        yield
        return
    from medimg_core import telemetry

    telemetry.configure_tracing("training-worker", to_console=False, otlp_endpoint=endpoint)
    parent = TraceContextTextMapPropagator().extract(
        {"traceparent": os.environ.get("TRACEPARENT", "")}
    )
    attributes: dict[str, str | int] = {
        "medimg.training.job": str(config["job_id"]),
        "medimg.training.dataset": str(config["dataset"]),
        "medimg.training.rank": rank,
        "medimg.training.world_size": world,
    }
    try:
        with span("training.worker", attributes, parent):
            yield
    finally:
        provider = trace.get_tracer_provider()
        if isinstance(provider, TracerProvider):
            # Exports what the batch processor still holds: a short job's spans too.
            provider.shutdown()


class Stopped(BaseException):
    """SIGTERM (a cancel, a deadline, a deleted pod) raised in the main thread: the worker
    unwinds, so that its spans are exported, then dies of the signal as it did before."""


def _stopped(signum: int, frame: object) -> None:
    # Once: a second SIGTERM (a cancel that also reaches the runner's own stop) would
    # interrupt the unwinding itself, the export of the spans among it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped


def main(config_path: Path) -> None:
    signal.signal(signal.SIGTERM, _stopped)
    try:
        run(config_path)
    except Stopped:
        # The launchers read a signal death as one: the same exit status as without this.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def run(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    job_dir = Path(config["job_dir"])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    import torch

    from medimg_core import cpus

    # Processes on this node: torchrun's LOCAL_WORLD_SIZE; a PyTorchJob's pod runs one. The
    # pod's CPU limit, not the node's cores, is what they share.
    torch.set_num_threads(max(1, cpus.available() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    distributed = world > 1
    try:
        with tracing(config, rank, world):
            if distributed:
                import torch.distributed as dist

                backend = "nccl" if int(config["spec"]["resources"]["gpus"]) else "gloo"
                # MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK: set by torchrun, or by the
                # Kubeflow training operator in each pod of a PyTorchJob.
                dist.init_process_group(backend, init_method="env://")
            if rank == 0:
                with span("training.fetch"):
                    for item in config["items"]:
                        fetch(config, item["series"])
                        if item.get("label_series"):
                            fetch(config, item["label_series"])
            if distributed:
                dist.barrier()
            metrics = train(config, rank, world)
            if rank == 0:
                from medimg_training import bundle

                with span("training.export"):
                    bundle.export(config, job_dir / "bundle", metrics)
                _write_json(job_dir / "result.json", {"metrics": metrics})
            if distributed:
                # No rank tears the group down while another still works in it: gloo can
                # abort a process whose peer is still connected (seen under load).
                dist.barrier()
    except Stopped:
        raise
    except BaseException as error:
        _write_json(
            job_dir / f"error-rank{rank}.json",
            {"type": type(error).__name__, "message": str(error)[:2000],
             "where": traceback.format_exc(limit=3)[-2000:]},
        )  # fmt: skip
        raise
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
