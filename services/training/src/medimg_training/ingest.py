"""Training's calls to ingest, through the sidecar: a series looked up (the header of its
volume, `GetSeriesPixels`), and the index searched (QIDO-RS over gRPC: `SearchStudies`,
`SearchSeries`, with the query as the gateway would pack it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.api import httpbody_pb2
from google.protobuf import any_pb2

from medimg.envoy import transcoder_pb2
from medimg.ingest.v1 import ingest_service_pb2 as ingest_pb
from medimg.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from medimg_core import deadlines
from medimg_core.errors import InvalidArgument, NotFound, Unavailable
from medimg_training.datasets import Found, Pseudonym, SeriesName
from medimg_training.query import IndexSeries

#: Results per search page (ingest answers at most 1000).
PAGE = 1000


class IngestProbe:
    """Looks series up through ingest's GetSeriesPixels: the volume header only."""

    def __init__(self, channel: grpc.aio.Channel, default_deadline: float) -> None:
        self._stub = ingest_grpc.IngestServiceStub(channel)
        self._deadline = default_deadline

    async def __call__(self, series: SeriesName) -> Found:
        call = self._stub.GetSeriesPixels(
            ingest_pb.GetSeriesPixelsRequest(name=series),
            timeout=deadlines.timeout(self._deadline),
        )
        try:
            async for message in call:
                header = message.header
                return Found(
                    Pseudonym(header.patient_pseudonym),
                    tuple(header.shape),
                    tuple(header.sop_instance_uids),
                )
        except grpc.aio.AioRpcError as error:
            raise _mapped(error, series) from error
        finally:
            call.cancel()  # the header is all that is needed
        raise Unavailable("INGEST_UNAVAILABLE", f"ingest sent no volume for {series}")


class IngestIndex:
    """Ingest's study and series searches (see `query.Index`)."""

    def __init__(self, channel: grpc.aio.Channel, default_deadline: float) -> None:
        self._stub = ingest_grpc.IngestServiceStub(channel)
        self._deadline = default_deadline

    async def studies(self, keys: Mapping[str, str]) -> list[str]:
        rows = await self._all(
            lambda body: self._stub.SearchStudies(
                ingest_pb.SearchStudiesRequest(http_body=body),
                timeout=deadlines.timeout(self._deadline),
            ),
            keys,
        )
        return [_text(row, "0020000D") for row in rows]

    async def series(self, study_uid: str, keys: Mapping[str, str]) -> list[IndexSeries]:
        rows = await self._all(
            lambda body: self._stub.SearchSeries(
                ingest_pb.SearchSeriesRequest(study=study_uid, http_body=body),
                timeout=deadlines.timeout(self._deadline),
            ),
            keys,
        )
        return [
            IndexSeries(
                study_uid=_text(row, "0020000D"),
                series_uid=_text(row, "0020000E"),
                modality=_text(row, "00080060"),
                body_part_examined=_text(row, "00180015"),
                series_description=_text(row, "0008103E"),
            )
            for row in rows
        ]

    async def _all(
        self, search: Callable[[httpbody_pb2.HttpBody], Any], keys: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while True:
            params = {**keys, "limit": str(PAGE), "offset": str(len(rows))}
            try:
                answer = await search(_query_body(params))
            except grpc.aio.AioRpcError as error:
                raise _mapped(error, "the query", invalid="INVALID_QUERY") from error
            page = json.loads(answer.data or b"[]")
            rows += page
            if len(page) < PAGE:
                return rows


def _query_body(params: Mapping[str, str]) -> httpbody_pb2.HttpBody:
    """The query parameters as the gateway's transcoder packs them for ingest."""
    unknown = transcoder_pb2.UnknownQueryParams(
        key={k: transcoder_pb2.UnknownQueryParams.Values(values=[v]) for k, v in params.items()}
    )
    packed = any_pb2.Any()
    packed.Pack(unknown)
    return httpbody_pb2.HttpBody(extensions=[packed])


def _text(row: Mapping[str, Any], tag: str) -> str:
    values = row.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _mapped(
    error: grpc.aio.AioRpcError, what: str, *, invalid: str = "INVALID_SERIES"
) -> Exception:
    if error.code() == grpc.StatusCode.NOT_FOUND:
        return NotFound("SERIES_NOT_FOUND", f"{what} is not in ingest's index", series=what)
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(invalid, f"ingest refused {what}: {error.details()}")
    return Unavailable("INGEST_UNAVAILABLE", f"ingest could not be asked about {what}")
