"""The gRPC face of training: thin, over `datasets`, `jobs`, `runner` and `registry`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Executor
from datetime import datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, json_format

from medimg.training.v1 import training_service_pb2 as pb
from medimg.training.v1 import training_service_pb2_grpc as pb_grpc
from medimg_core import calls, pagination, timestamps
from medimg_core.audit import Access, Action, AuditClient, Kind
from medimg_core.calls import Context
from medimg_core.errors import InvalidArgument, Unavailable
from medimg_core.identity import Role
from medimg_training import datasets, jobs, leader, progress, query, registry, specs
from medimg_training.datasets import SeriesName, Task
from medimg_training.jobs import State
from medimg_training.leader import Leadership
from medimg_training.runner import Runner
from medimg_training.settings import TrainingSettings

_USERS = frozenset({Role("researcher"), Role("ml-engineer"), Role("admin")})
_ENGINEERS = frozenset({Role("ml-engineer"), Role("admin")})
POLICY = {
    "CreateDataset": _ENGINEERS,
    "GetDataset": _USERS,
    "ListDatasets": _USERS,
    "CreateTrainingJob": _ENGINEERS,
    "ListTrainingJobs": _USERS,
    "GetTrainingJob": _USERS,
    "CancelTrainingJob": _ENGINEERS,
    "ResumeTrainingJob": _ENGINEERS,
    "WatchTrainingJob": _USERS,
    "ListModels": _USERS,
    "ListModelVersions": _USERS,
    "GetModelVersion": _USERS,
    "SetModelAlias": _ENGINEERS,
    "PromoteModelVersion": _ENGINEERS,
}
_TASKS = {pb.TASK_CLASSIFICATION: Task.CLASSIFICATION, pb.TASK_SEGMENTATION: Task.SEGMENTATION}
_SPLITS = {
    datasets.Split.TRAIN: pb.SPLIT_TRAIN,
    datasets.Split.VALIDATION: pb.SPLIT_VALIDATION,
    datasets.Split.TEST: pb.SPLIT_TEST,
}
_STATES = {
    State.QUEUED: pb.TrainingJob.STATE_QUEUED,
    State.RUNNING: pb.TrainingJob.STATE_RUNNING,
    State.SUCCEEDED: pb.TrainingJob.STATE_SUCCEEDED,
    State.FAILED: pb.TrainingJob.STATE_FAILED,
    State.CANCELLED: pb.TrainingJob.STATE_CANCELLED,
}


def who() -> str:
    """The user behind the call, or the calling workload's name."""
    call = calls.current()
    if call is None:
        return "unknown"
    return call.principal.user or call.principal.workload_name


def _dataset(found: datasets.Dataset) -> pb.Dataset:
    message = pb.Dataset(
        name=found.name,
        version=found.version,
        task=next(k for k, v in _TASKS.items() if v is found.task),
        class_names=found.class_names,
        items=[
            pb.DatasetItem(
                series=i.series,
                label=i.label,
                label_series=i.label_series,
                patient_pseudonym=i.patient_pseudonym,
                split=_SPLITS[i.split] if i.split else pb.SPLIT_UNSPECIFIED,
            )
            for i in found.items
        ],
        split_fractions=pb.SplitFractions(
            train=found.fractions[0], validation=found.fractions[1], test=found.fractions[2]
        ),
        split_seed=found.split_seed,
        split_counts=list(found.counts),
        creator=found.creator,
        create_time=timestamps.to_proto(found.create_time),
        description=found.description,
    )
    if found.query:  # made from a query: the query and rule it was made by
        json_format.ParseDict(dict(found.query["query"]), message.query)
        json_format.ParseDict(dict(found.query["label_rule"]), message.label_rule)
    return message


def _query(given: pb.DatasetQuery) -> query.Query:
    return query.Query(
        modalities=tuple(given.modalities),
        study_date=given.study_date,
        body_part_examined=given.body_part_examined,
        series_description=given.series_description,
        patient_pseudonyms=tuple(given.patient_pseudonyms),
    )


def progress_message(job_id: str, values: Mapping[str, Any], state: State) -> pb.TrainingProgress:
    message = pb.TrainingProgress(
        training_job=f"trainingJobs/{job_id}",
        state=_STATES[state],
        epoch=int(values.get("epoch", 0)),
        epochs=int(values.get("epochs", 0)),
        step=int(values.get("step", 0)),
        total_steps=int(values.get("total_steps", 0)),
        loss=float(values.get("loss", 0.0)),
        metrics=dict(values.get("metrics", {})),
        images_per_second=float(values.get("images_per_second", 0.0)),
    )
    if "eta_seconds" in values:
        message.eta.CopyFrom(duration_pb2.Duration(seconds=int(values["eta_seconds"])))
    if "time" in values:
        message.report_time.FromNanoseconds(int(float(values["time"]) * 1e9))
    return message


def _spec(spec: Mapping[str, Any]) -> pb.TrainingJobSpec:
    return json_format.ParseDict(dict(spec), pb.TrainingJobSpec(), ignore_unknown_fields=True)


def _job(job: jobs.Job) -> pb.TrainingJob:
    message = pb.TrainingJob(
        name=job.name,
        spec=_spec(job.spec),
        state=_STATES[job.state],
        create_time=timestamps.to_proto(job.create_time),
        error_reason=job.error_reason,
        error_message=job.error_message,
        progress=progress_message(job.job_id, job.progress, job.state),
        model_version=job.model_version,
        creator=job.creator,
        attempts=job.attempts,
    )
    if job.start_time:
        message.start_time.CopyFrom(timestamps.to_proto(job.start_time))
    if job.end_time:
        message.end_time.CopyFrom(timestamps.to_proto(job.end_time))
    return message


def _version(version: registry.Version) -> pb.ModelVersion:
    return pb.ModelVersion(
        name=version.name,
        version=version.version,
        training_job=f"trainingJobs/{version.job_id}",
        dataset=version.dataset,
        spec=_spec(version.spec),
        code_version=version.code_version,
        metrics=dict(version.metrics),
        creator=version.creator,
        bundle_uri=version.bundle_uri,
        sha256=version.sha256,
        aliases=version.aliases,
        create_time=timestamps.to_proto(version.create_time),
    )


def _model(model: registry.Model) -> pb.RegisteredModel:
    return pb.RegisteredModel(
        name=model.name,
        latest_version=model.latest_version,
        aliases=dict(model.aliases),
        create_time=timestamps.to_proto(model.create_time),
    )


def _position(token: str, *keys: str) -> dict[str, Any] | None:
    return pagination.decode_token(token, *keys)


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        events: aioredis.Redis,
        audit: AuditClient,
        runner: Runner,
        lease: Leadership,
        probe: datasets.Probe,
        index: query.Index,
        settings: TrainingSettings,
        executor: Executor,
        gpus: int,
    ) -> None:
        self._pool = pool
        self._events = events
        self._audit = audit
        self._runner = runner
        self._lease = lease
        self._probe = probe
        self._index = index
        self._settings = settings
        self._executor = executor
        self._gpus = gpus
        self._draining = asyncio.Event()

    async def drain(self) -> None:
        """At shutdown, before the grace: watchers are told to watch again (another replica,
        or this one once back) rather than held to the end of the grace and cut, and local
        workers stop now, while the grace still covers them; their jobs stay RUNNING for the
        next leader to resume or fail (Kubernetes Jobs run on: the next leader adopts them).
        The lease goes last, once this replica's workers are gone."""
        self._draining.set()
        await self._lease.close()

    # Datasets -----------------------------------------------------------------------

    async def CreateDataset(self, request: pb.CreateDatasetRequest, context: Context) -> pb.Dataset:
        given = request.dataset
        fractions = None
        if given.HasField("split_fractions"):
            f = given.split_fractions
            fractions = (f.train, f.validation, f.test)
        task = _TASKS.get(given.task)
        class_names = list(given.class_names)
        items = [datasets.Item(SeriesName(i.series), i.label, i.label_series) for i in given.items]
        probe = query.memoized(self._probe)
        stored: dict[str, Any] | None = None
        if given.HasField("query"):
            if given.items:
                raise InvalidArgument("ITEMS_AND_QUERY", "give either items or a query, not both")
            datasets.check_id(request.dataset_id)  # before ingest is asked anything
            wanted, attribute = _query(given.query), given.label_rule.attribute
            items, names = await query.resolve(
                self._index, probe, wanted, attribute=attribute, task=task, class_names=class_names
            )
            class_names, stored = list(names), query.stored(wanted, attribute)
        elif given.HasField("label_rule"):
            raise InvalidArgument("QUERY_REQUIRED", "a label_rule labels what a query finds")
        created = await datasets.create(
            self._pool,
            probe,
            dataset_id=request.dataset_id,
            task=task,
            class_names=class_names,
            items=items,
            fractions=fractions,
            split_seed=given.split_seed,
            creator=who(),
            description=given.description,
            query=stored,
        )
        await self._audit.report([Access(Action.ACTION_CREATE, created.name)])
        return _dataset(created)

    async def GetDataset(self, request: pb.GetDatasetRequest, context: Context) -> pb.Dataset:
        found = await datasets.get(self._pool, request.name)
        await self._audit.report([Access(Action.ACTION_READ, found.name)])
        return _dataset(found)

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        size = pagination.page_size(request.page_size, default=50)
        position = _position(request.page_token, "t", "d", "v")
        after = None
        if position is not None:
            after = (datetime.fromisoformat(position["t"]), str(position["d"]), int(position["v"]))
        found, more = await datasets.list_page(self._pool, after=after, limit=size)
        token = ""
        if more:
            last = found[-1]
            token = pagination.encode_token(
                {"t": last.create_time.isoformat(), "d": last.dataset_id, "v": last.version}
            )
        return pb.ListDatasetsResponse(datasets=[_dataset(d) for d in found], next_page_token=token)

    # Jobs ---------------------------------------------------------------------------

    async def CreateTrainingJob(
        self, request: pb.CreateTrainingJobRequest, context: Context
    ) -> pb.TrainingJob:
        raw = json_format.MessageToDict(request.training_job.spec, preserving_proto_field_name=True)
        if not raw.get("dataset"):
            raise InvalidArgument("DATASET_REQUIRED", "spec.dataset names the dataset version")
        dataset = await datasets.get(self._pool, raw["dataset"])
        spec = specs.with_defaults(raw, dataset)
        specs.check(
            spec,
            dataset,
            max_processes=self._settings.max_processes_per_job,
            gpus=self._gpus,
            pod_per_process=self._settings.pod_per_process,
        )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, specs.check_network, spec, dataset)
        job = await jobs.create(self._pool, spec, who())
        await self._audit.report([Access(Action.ACTION_EXECUTE, job.name)])
        await leader.announce(self._pool, job.job_id)  # the leader may be another replica
        return _job(job)

    async def ListTrainingJobs(
        self, request: pb.ListTrainingJobsRequest, context: Context
    ) -> pb.ListTrainingJobsResponse:
        size = pagination.page_size(request.page_size, default=50)
        position = _position(request.page_token, "t", "j")
        after = None
        if position is not None:
            after = (datetime.fromisoformat(position["t"]), str(position["j"]))
        found, more = await jobs.list_page(self._pool, after=after, limit=size)
        token = ""
        if more:
            token = pagination.encode_token(
                {"t": found[-1].create_time.isoformat(), "j": found[-1].job_id}
            )
        return pb.ListTrainingJobsResponse(
            training_jobs=[_job(j) for j in found], next_page_token=token
        )

    async def GetTrainingJob(
        self, request: pb.GetTrainingJobRequest, context: Context
    ) -> pb.TrainingJob:
        return _job(await jobs.get(self._pool, jobs.parse_name(request.name)))

    async def CancelTrainingJob(
        self, request: pb.CancelTrainingJobRequest, context: Context
    ) -> pb.TrainingJob:
        job_id = jobs.parse_name(request.name)
        job = await jobs.cancel(self._pool, job_id)
        await self._audit.report([Access(Action.ACTION_UPDATE, job.name)], kind=Kind.NO_PHI)
        # Its workers stop now if this replica leads, else within a poll of the leader's
        # monitor, which reads the job's state.
        await self._runner.cancel(job_id)
        return _job(await jobs.get(self._pool, job_id))

    async def ResumeTrainingJob(
        self, request: pb.ResumeTrainingJobRequest, context: Context
    ) -> pb.TrainingJob:
        job = await jobs.resume(self._pool, jobs.parse_name(request.name))
        await self._audit.report([Access(Action.ACTION_EXECUTE, job.name)])
        await leader.announce(self._pool, job.job_id)
        return _job(job)

    async def WatchTrainingJob(
        self, request: pb.WatchTrainingJobRequest, context: Context
    ) -> AsyncIterator[pb.TrainingProgress]:
        job_id = jobs.parse_name(request.name)
        job = await jobs.get(self._pool, job_id)
        if job.state in jobs.TERMINAL:
            yield progress_message(job_id, job.progress, job.state)
            return
        stream = progress.stream(job_id)
        latest: Any = await self._events.xrevrange(stream, count=1)
        last = latest[0][0] if latest else "0-0"
        entries = latest or []
        while True:
            if self._draining.is_set():
                raise Unavailable(
                    "SERVICE_DRAINING", "the training service is shutting down: watch again"
                )
            for entry_id, fields in entries:
                last = entry_id
                values = progress.decode(fields)
                state = State(values.pop("state", "running"))
                yield progress_message(job_id, values, state)
                if state in jobs.TERMINAL:
                    return
            answer: Any = await self._events.xread({stream: last}, count=100, block=1000)
            entries = answer[0][1] if answer else []
            if not entries:
                # A quiet stream: make sure the job did not end unseen (its stream trimmed).
                job = await jobs.get(self._pool, job_id)
                if job.state in jobs.TERMINAL:
                    yield progress_message(job_id, job.progress, job.state)
                    return

    # Registry -----------------------------------------------------------------------

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        size = pagination.page_size(request.page_size, default=50)
        position = _position(request.page_token, "m")
        found, more = await registry.list_models(
            self._pool, after=str(position["m"]) if position else None, limit=size
        )
        token = pagination.encode_token({"m": found[-1].model_id}) if more else ""
        return pb.ListModelsResponse(models=[_model(m) for m in found], next_page_token=token)

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Context
    ) -> pb.ListModelVersionsResponse:
        size = pagination.page_size(request.page_size, default=50)
        position = _position(request.page_token, "v")
        found, more = await registry.list_versions(
            self._pool, request.parent, before=int(position["v"]) if position else None, limit=size
        )
        token = pagination.encode_token({"v": found[-1].version}) if more else ""
        return pb.ListModelVersionsResponse(
            model_versions=[_version(v) for v in found], next_page_token=token
        )

    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: Context
    ) -> pb.ModelVersion:
        return _version(await registry.get_version(self._pool, request.name))

    async def SetModelAlias(
        self, request: pb.SetModelAliasRequest, context: Context
    ) -> pb.RegisteredModel:
        model_id = registry.parse_model(request.name)
        await registry.set_alias(self._pool, model_id, request.alias, request.version, who())
        await self._audit.report(
            [Access(Action.ACTION_UPDATE, f"{request.name}/aliases/{request.alias}")],
            kind=Kind.PHI_WRITE,
        )
        return _model(await registry.get_model(self._pool, model_id))

    async def PromoteModelVersion(
        self, request: pb.PromoteModelVersionRequest, context: Context
    ) -> pb.ModelVersion:
        await registry.get_version(self._pool, request.name)  # NOT_FOUND before anything
        alias = request.alias or registry.DEFAULT_ALIAS
        # Recorded before the event goes out: a promotion nobody can trace must not happen.
        await self._audit.report(
            [Access(Action.ACTION_UPDATE, f"{request.name}:promote/{alias}")],
            kind=Kind.PHI_WRITE,
        )
        version = await registry.promote(self._pool, self._events, request.name, alias, who())
        return _version(version)
