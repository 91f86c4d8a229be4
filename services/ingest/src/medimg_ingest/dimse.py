"""The DIMSE door: a pynetdicom SCP for PACS and modalities (AE title MEDIMG by default).

- C-ECHO answers.
- C-STORE accepts every storage SOP class in every transfer syntax pynetdicom knows, and
  sends each instance through the same pipeline as the other doors. Success (0000) once
  the instance is durable, indexed and audited (also for a duplicate, or one held in
  quarantine: it is kept); C000 with the reason in Error Comment when it is refused (not
  valid, undecodable pixels, a conflicting instance); A700 when the platform cannot take
  it now (the database or audit is down), which tells the sender to try again later.
- C-FIND at STUDY and SERIES level (Study Root and Patient Root) on the index.

pynetdicom runs each association in its own thread; the handlers hand their work to the
service's event loop and wait for it, so the pipeline, the index and audit are the same
objects every door uses. What came in over DIMSE is audited like any other access; the
calling AE title is not an identity (DIMSE has no authentication here): restrict the port
to the PACS and modalities by network policy, as hospitals do.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import queue
import select
import ssl
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import asyncpg
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from medimg_core.audit import Access, Action
from medimg_core.errors import InvalidArgument
from medimg_ingest import search
from medimg_ingest.pipeline import Outcome, Result

log = logging.getLogger(__name__)
# pynetdicom logs each association and request at INFO (and identifiers, PHI among them, at
# DEBUG): a log line per instance costs CPU the pipeline needs, and says nothing ours do not.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

T = TypeVar("T")
SUCCESS = 0x0000
PENDING = 0xFF00
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
#: Seconds a handler waits for the pipeline before telling the sender to retry.
WAIT_SECONDS = 120
#: Seconds an association's DUL thread waits for the peer's next PDU or a primitive to send
#: before it looks at its timers and whether it is being stopped. pynetdicom's polls every
#: millisecond instead: a thread per association waking a thousand times a second, each time
#: taking the GIL from the pipeline.
DUL_WAIT_SECONDS = 0.05
#: Seconds an association's reactor waits for the next DIMSE message, or a release or an
#: abort, before it looks at its DUL and idle timer. pynetdicom's sleeps a millisecond and
#: then looks without waiting, a thousand wakeups a second per association, each taking the
#: GIL from the pipeline; waiting on the queue takes each message the moment it is decoded.
REACTOR_WAIT_SECONDS = 0.05
#: Put on an association's DIMSE message queue to end its reactor's wait (not a message).
_WAKE: Any = object()


class DimseServer:
    def __init__(
        self,
        *,
        ingest: Callable[[Sequence[bytes]], Awaitable[list[Result]]],
        pool: asyncpg.Pool,
        report: Callable[[Sequence[Access]], Awaitable[object]],
        ae_title: str,
        host: str,
        port: int,
        max_associations: int = 10,
    ) -> None:
        self._ingest = ingest
        self._pool = pool
        self._report = report
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ae = AE(ae_title=ae_title)
        self._ae.maximum_pdu_size = 0  # no limit on what we receive
        # Past it, an association request is rejected (transient, "local limit exceeded").
        self._ae.maximum_associations = max_associations
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            self._ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        for sop_class in (
            Verification,
            StudyRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelFind,
        ):
            self._ae.add_supported_context(sop_class)
        self._address = (host, port)
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.server_address[1]
        return port

    def start(self) -> None:
        """Listens; associations are served in threads until `stop`."""
        self._loop = asyncio.get_running_loop()
        self._server = self._ae.start_server(
            self._address,
            block=False,
            contexts=[_Supported.of(context) for context in self._ae.supported_contexts],
            evt_handlers=[
                (evt.EVT_CONN_OPEN, _wait_instead_of_polling),
                (evt.EVT_C_ECHO, lambda event: SUCCESS),
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_C_FIND, self._find),
            ],
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _run(self, work: Awaitable[T]) -> T:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(_awaited(work), self._loop)
        return future.result(WAIT_SECONDS)

    def _store(self, event: Any) -> int | Dataset:
        try:
            [result] = self._run(self._ingest([event.encoded_dataset(include_meta=True)]))
        except Exception as error:  # noqa: BLE001 - the platform cannot take it now: A700
            log.warning("C-STORE not taken", extra={"fields": {"error": type(error).__name__}})
            return OUT_OF_RESOURCES
        if result.outcome in (Outcome.STORED, Outcome.DUPLICATE, Outcome.QUARANTINED):
            return SUCCESS
        status = Dataset()
        status.Status = CANNOT_UNDERSTAND
        status.ErrorComment = (result.reason or "REFUSED")[:64]
        return status

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        identifier: Dataset = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", "")).upper()
        try:
            if level == "STUDY":
                matches = self._run(self._studies(identifier))
            elif level == "SERIES":
                matches = self._run(self._series(identifier))
            else:
                yield IDENTIFIER_DOES_NOT_MATCH, None
                return
        except InvalidArgument:
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        except Exception as error:  # noqa: BLE001 - answered with a failure status
            log.warning("C-FIND failed", extra={"fields": {"error": type(error).__name__}})
            yield UNABLE_TO_PROCESS, None
            return
        for match in matches:
            if event.is_cancelled:
                return
            yield PENDING, _answer(identifier, match)

    async def _studies(self, identifier: Dataset) -> list[dict[str, Any]]:
        query = search.StudyQuery(
            patient_id=_text(identifier, "PatientID"),
            study_uids=_uids(identifier, "StudyInstanceUID"),
            study_date=_text(identifier, "StudyDate"),
            accession_number=_text(identifier, "AccessionNumber"),
            study_id=_text(identifier, "StudyID"),
            study_description=_text(identifier, "StudyDescription"),
            modalities=_uids(identifier, "ModalitiesInStudy"),
            limit=search.MAX_RESULTS,
        )
        studies = await search.find_studies(self._pool, query)
        await self._report([Access(Action.ACTION_READ, "studies")])
        return [
            {
                "QueryRetrieveLevel": "STUDY",
                "StudyInstanceUID": s.study_uid,
                "PatientID": s.patient_id,
                "PatientName": s.patient_id,
                "StudyDate": s.study_date.strftime("%Y%m%d") if s.study_date else "",
                "StudyTime": s.study_time,
                "AccessionNumber": s.accession_number,
                "StudyID": s.study_id,
                "StudyDescription": s.study_description,
                "ModalitiesInStudy": s.modalities,
                "NumberOfStudyRelatedSeries": s.series_count,
                "NumberOfStudyRelatedInstances": s.instance_count,
            }
            for s in studies
        ]

    async def _series(self, identifier: Dataset) -> list[dict[str, Any]]:
        number = _text(identifier, "SeriesNumber")
        query = search.SeriesQuery(
            study_uid=_text(identifier, "StudyInstanceUID"),
            series_uids=_uids(identifier, "SeriesInstanceUID"),
            modality=_text(identifier, "Modality"),
            series_number=int(number) if number.isdigit() else None,
            series_description=_text(identifier, "SeriesDescription"),
            limit=search.MAX_RESULTS,
        )
        series = await search.find_series(self._pool, query)
        await self._report([Access(Action.ACTION_READ, f"studies/{query.study_uid or '-'}/series")])
        return [
            {
                "QueryRetrieveLevel": "SERIES",
                "StudyInstanceUID": s.study_uid,
                "SeriesInstanceUID": s.series_uid,
                "Modality": s.modality,
                "SeriesNumber": s.series_number if s.series_number is not None else "",
                "SeriesDescription": s.series_description,
                "BodyPartExamined": s.body_part_examined,
                "NumberOfSeriesRelatedInstances": s.instance_count,
            }
            for s in series
        ]


def _wait_instead_of_polling(event: Any) -> None:
    """Makes a new association's two threads wait for work instead of polling (see
    DUL_WAIT_SECONDS and REACTOR_WAIT_SECONDS)."""
    _dul_waits_for_work(event.assoc.dul)
    # The reactor (Association._run_reactor) is the only caller of get_msg(block=False). It
    # looks for a release or an abort after each wait: the DUL's other indications (A-RELEASE,
    # A-ABORT, A-P-ABORT) end its wait too, so that a release is answered at once.
    dimse = event.assoc.dimse
    blocking = dimse.get_msg
    indications: queue.Queue[Any] = event.assoc.dul.to_user_queue
    indicate = indications.put

    def indicate_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        indicate(item, block, timeout)
        dimse.msg_queue.put(_WAKE)

    def get_msg(block: bool = False) -> tuple[Any, Any]:
        if block:
            while (item := blocking(block=True)) is _WAKE:
                pass
            return item  # type: ignore[no-any-return]
        try:
            item = dimse.msg_queue.get(timeout=REACTOR_WAIT_SECONDS)
        except queue.Empty:
            return None, None
        return (None, None) if item is _WAKE else item

    indications.put = indicate_and_wake  # type: ignore[method-assign]
    dimse.get_msg = get_msg


def _dul_waits_for_work(dul: Any) -> None:
    """Has the DUL thread (pynetdicom's DULServiceProvider.run_reactor) wait, when it has
    nothing to do, until the peer's socket is readable or a primitive is queued to send (a
    pipe written after each), up to DUL_WAIT_SECONDS. The wait goes in front of
    `_process_recv_primitive`, which the loop calls first on every turn."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    # Closed once nothing can write to the pipe or wait on it: the thread's loop holds `dul`.
    weakref.finalize(dul, _close_all, wake_read, wake_write).atexit = False
    outgoing: queue.Queue[Any] = dul.to_provider_queue
    put, process = outgoing.put, dul._process_recv_primitive

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        with contextlib.suppress(BlockingIOError):  # a full pipe wakes it already
            os.write(wake_write, b"\0")

    def wait_then_process() -> bool:
        connection = getattr(dul.socket, "socket", None)
        # Sta1: the connection is gone, and the association stops the loop next (stop_dul
        # sets a flag and waits for the thread): no waiting then.
        idle = (
            outgoing.empty()
            and dul.event_queue.empty()
            and dul.state_machine.current_state != "Sta1"
        )
        # TLS may hold decrypted bytes that select() cannot see.
        buffered = isinstance(connection, ssl.SSLSocket) and connection.pending()
        if idle and connection is not None and not buffered:
            with contextlib.suppress(OSError, ValueError):  # closed: the loop sees it next
                select.select([connection, wake_read], [], [], DUL_WAIT_SECONDS)
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_read, 4096):
                    pass
        return bool(process())

    outgoing.put = put_and_wake  # type: ignore[method-assign]
    dul._process_recv_primitive = wait_then_process
    # What the loop still sleeps after a turn with nothing done (and stop_dul between looks
    # at the thread): pynetdicom's own 1 ms, now after each wait rather than instead of it.
    dul._run_loop_delay = 0.001


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


async def _awaited(work: Awaitable[T]) -> T:
    return await work


def _text(identifier: Dataset, keyword: str) -> str:
    value = identifier.get(keyword)
    return "" if value is None else str(value).strip()


def _uids(identifier: Dataset, keyword: str) -> list[str]:
    """A list-of-values key (UIDs, ModalitiesInStudy); empty, or `*`, matches everything."""
    value = identifier.get(keyword)
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, MultiValue) else str(value).split("\\")
    return [str(v).strip() for v in items if str(v).strip() not in ("", "*")]


def _answer(identifier: Dataset, match: dict[str, Any]) -> Dataset:
    """The identifier's keys, filled in from the match (keys it did not ask for are left out)."""
    answer = Dataset()
    for element in identifier:
        keyword = element.keyword
        if keyword in match:
            setattr(answer, keyword, match[keyword])
        elif keyword and keyword != "SpecificCharacterSet":
            setattr(answer, keyword, element.value if keyword == "QueryRetrieveLevel" else None)
    answer.QueryRetrieveLevel = match["QueryRetrieveLevel"]
    if "SpecificCharacterSet" in identifier:
        answer.SpecificCharacterSet = "ISO_IR 192"
    return answer


class _Supported(PresentationContext):
    """A supported presentation context whose deep copy shares its UIDs.

    pynetdicom deep-copies every supported context for each association it accepts: for
    every storage SOP class in every transfer syntax, 7,650 UID objects rebuilt one by one,
    about 37 ms holding the GIL while every other association and the pipeline wait. UIDs
    are immutable strings, so a copy may share them; the copy's list is its own."""

    @classmethod
    def of(cls, context: PresentationContext) -> _Supported:
        supported = cls()
        supported.__dict__.update(context.__dict__)
        supported._transfer_syntax = list(context.transfer_syntax)
        return supported

    def __deepcopy__(self, memo: dict[int, Any]) -> _Supported:
        duplicate = copy.copy(self)
        duplicate._transfer_syntax = list(self._transfer_syntax)
        return duplicate
