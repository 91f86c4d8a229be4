"""The ingest pipeline on real PostgreSQL, Redis and files: per-file results, de-identified
objects, the index, quarantine, the sealed identity link, events and the audit hook."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import asyncpg
import pydicom
import pytest
import redis.asyncio as aioredis
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from medimg_core.audit import Access
from medimg_core.errors import InvalidArgument, Unavailable
from medimg_ingest import deid
from medimg_ingest.deid.keyed import replacement_uid
from medimg_ingest.objects import LocalObjectStore, ObjectStore
from medimg_ingest.pipeline import (
    INSTANCE_STORED_STREAM,
    Outcome,
    Pipeline,
    Result,
    collect_files,
    sweep_orphans,
)
from services.ingest.tests.support import (
    DEID_KEY,
    POLICY,
    VAULT,
    MakePipeline,
    Recorded,
    dicom_file,
)


def stored_name(data: bytes) -> str:
    """The resource name the pipeline gives `data`: its UIDs replaced under DEID_KEY."""
    original = pydicom.dcmread(BytesIO(data))
    study, series, sop = (
        replacement_uid(DEID_KEY, str(original.get(k)))
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    return f"studies/{study}/series/{series}/instances/{sop}"


async def stream(pairs: Iterable[tuple[bytes, bool]]) -> AsyncIterator[tuple[bytes, bool]]:
    for pair in pairs:
        yield pair


# --- collect_files ------------------------------------------------------------------------


async def test_chunks_are_joined_until_last_chunk() -> None:
    pairs = [(b"ab", False), (b"cd", False), (b"e", True), (b"fg", True), (b"h", True)]
    assert await collect_files(stream(pairs), 100) == [b"abcde", b"fg", b"h"]


async def test_an_empty_last_chunk_ends_the_file() -> None:
    pairs = [(b"ab", False), (b"", True), (b"cd", False), (b"", True)]
    assert await collect_files(stream(pairs), 100) == [b"ab", b"cd"]


async def test_trailing_bytes_end_a_file() -> None:
    pairs = [(b"ab", True), (b"cd", False), (b"ef", False)]
    assert await collect_files(stream(pairs), 100) == [b"ab", b"cdef"]


async def test_an_empty_file_is_passed_on_for_validation() -> None:
    assert await collect_files(stream([(b"", True)]), 100) == [b""]


@pytest.mark.parametrize("pairs", [[], [(b"", False)], [(b"", False), (b"", False)]])
async def test_an_empty_stream_is_refused(pairs: list[tuple[bytes, bool]]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await collect_files(stream(pairs), 100)
    assert caught.value.reason == "EMPTY_UPLOAD"


async def test_the_limit_is_per_file() -> None:
    pairs = [(b"ab", False), (b"cd", True), (b"efgh", True)]
    assert await collect_files(stream(pairs), 4) == [b"abcd", b"efgh"]


@pytest.mark.parametrize(
    ("pairs", "index"),
    [
        ([(b"abc", False), (b"de", True)], 0),
        ([(b"abcde", True)], 0),
        ([(b"ab", True), (b"cde", False), (b"fg", False)], 1),
    ],
)
async def test_a_file_over_the_limit_is_refused(
    pairs: list[tuple[bytes, bool]], index: int
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await collect_files(stream(pairs), 4)
    assert caught.value.reason == "INSTANCE_TOO_LARGE"
    assert caught.value.metadata == {"index": str(index), "limit": "4"}


async def test_the_limit_stops_reading_the_stream() -> None:
    consumed = []

    async def endless() -> AsyncIterator[tuple[bytes, bool]]:
        while True:
            consumed.append(1)
            yield b"x" * 10, False

    with pytest.raises(InvalidArgument):
        await collect_files(endless(), 100)
    assert len(consumed) == 11


# --- Pipeline.ingest ----------------------------------------------------------------------


def stored_files(objects: LocalObjectStore) -> list[Path]:
    return sorted(p for p in objects.root.rglob("*") if p.is_file())


async def announced(events: aioredis.Redis) -> list[dict[str, str]]:
    entries = await events.xrange(INSTANCE_STORED_STREAM) or []
    return [{str(k): str(v) for k, v in (fields or {}).items()} for _, fields in entries]


async def test_a_new_instance_is_de_identified_stored_indexed_audited_and_announced(
    pipeline: tuple[Pipeline, Recorded],
    pool: asyncpg.Pool,
    objects: LocalObjectStore,
    events: aioredis.Redis,
) -> None:
    ingest, recorded = pipeline
    data = dicom_file("CT_small.dcm")
    original = pydicom.dcmread(BytesIO(data))
    [result] = await ingest.ingest([data])
    assert (result.outcome, result.instance) == (Outcome.STORED, stored_name(data))
    assert result.patient_pseudonym.startswith("ANON-")

    row = await pool.fetchrow("SELECT * FROM instances")
    assert row is not None
    kept = objects.get(row["object_key"])
    assert ObjectStore.key_for(kept) == (row["object_key"], row["sha256"])
    assert stored_files(objects) == [objects.root / row["object_key"]]
    clean = pydicom.dcmread(BytesIO(kept))
    assert clean.PatientID == result.patient_pseudonym != original.PatientID
    assert str(original.PatientName) not in kept.decode("latin-1")
    assert clean.PatientIdentityRemoved == "YES"
    assert clean.file_meta.ImplementationClassUID == (
        "2.25.304611008311148645742061647993512004849"
    )
    study = await pool.fetchrow("SELECT * FROM studies")
    assert study is not None
    assert study["patient_pseudonym"] == result.patient_pseudonym
    assert study["study_date"] is not None and study["study_date"].strftime("%Y%m%d") == (
        clean.StudyDate
    )
    assert await pool.fetchval("SELECT modality FROM series") == "CT"
    assert await announced(events) == [{"instance": result.instance}]
    # Audited before the index made it visible, with its pseudonym.
    assert [(a.resource, a.patient_pseudonym) for a in recorded.accesses] == [
        (result.instance, result.patient_pseudonym)
    ]
    assert recorded.indexed_before == [0]
    # The way back to the patient is sealed, and opens with the vault's key only.
    sealed = await pool.fetchval(
        "SELECT sealed FROM identities WHERE patient_pseudonym = $1", result.patient_pseudonym
    )
    assert VAULT.open(result.patient_pseudonym, sealed, VAULT.key_id) == original.PatientID
    assert original.PatientID.encode() not in sealed
    with pytest.raises(ValueError):
        VAULT.open("ANON-SOMEONEELSE", sealed, VAULT.key_id)


async def test_the_second_upload_is_a_duplicate(
    pipeline: tuple[Pipeline, Recorded],
    pool: asyncpg.Pool,
    objects: LocalObjectStore,
    events: aioredis.Redis,
) -> None:
    ingest, _ = pipeline
    data = dicom_file("CT_small.dcm")
    [first] = await ingest.ingest([data])
    [again] = await ingest.ingest([data])
    assert (again.outcome, again.instance) == (Outcome.DUPLICATE, first.instance)
    assert await pool.fetchval("SELECT count(*) FROM instances") == 1
    assert len(stored_files(objects)) == 1
    assert await announced(events) == [{"instance": first.instance}]


async def test_the_same_uid_with_other_content_is_a_conflict(
    pipeline: tuple[Pipeline, Recorded], pool: asyncpg.Pool
) -> None:
    ingest, _ = pipeline
    data = dicom_file("CT_small.dcm")
    changed = pydicom.dcmread(BytesIO(data))
    changed.InstanceNumber = 99
    out = BytesIO()
    changed.save_as(out, enforce_file_format=True)
    [first] = await ingest.ingest([data])
    [second] = await ingest.ingest([out.getvalue()])
    assert (second.outcome, second.reason) == (Outcome.CONFLICT, "INSTANCE_CONFLICT")
    assert second.instance == first.instance
    assert await pool.fetchval("SELECT instance_number FROM instances") != 99


async def test_a_batch_gives_each_file_its_own_result(
    pipeline: tuple[Pipeline, Recorded], pool: asyncpg.Pool, events: aioredis.Redis
) -> None:
    ingest, _ = pipeline
    [ct] = await ingest.ingest([dicom_file("CT_small.dcm")])
    results = await ingest.ingest(
        [
            dicom_file("MR_small.dcm"),
            dicom_file("CT_small.dcm"),
            b"GIF89a",
            dicom_file("rtplan.dcm"),
        ]
    )
    assert [r.outcome for r in results] == [
        Outcome.STORED, Outcome.DUPLICATE, Outcome.REJECTED, Outcome.STORED
    ]  # fmt: skip
    assert (results[2].reason, results[2].instance) == ("NOT_DICOM", "")
    assert await pool.fetchval("SELECT count(*) FROM instances") == 3
    names = [e["instance"] for e in await announced(events)]
    assert names == [ct.instance, results[0].instance, results[3].instance]
    for entry in await announced(events):
        assert set(entry) == {"instance"}  # a resource name, nothing else (no PHI)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"not a DICOM file at all", "NOT_DICOM"),
        (b"", "EMPTY_FILE"),
        (dicom_file("CT_small.dcm")[:200], "MALFORMED_DICOM"),
        (dicom_file("CT_small.dcm")[:-10], "TRUNCATED_FILE"),
    ],
)
async def test_a_refused_file_leaves_nothing_behind(
    *,
    pipeline: tuple[Pipeline, Recorded],
    pool: asyncpg.Pool,
    objects: LocalObjectStore,
    events: aioredis.Redis,
    bad: bytes,
    reason: str,
) -> None:
    ingest, recorded = pipeline
    [result] = await ingest.ingest([bad])
    assert result == Result(Outcome.REJECTED, reason=reason, message=result.message)
    assert "file 0" in result.message
    for table in ("instances", "series", "studies", "identities"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    assert stored_files(objects) == []
    assert await announced(events) == []
    assert recorded.accesses == []


# As in the service (the suite turns warnings into errors, which would refuse it earlier).
@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR")
async def test_a_file_that_cannot_be_written_back_fails_alone(
    pipeline: tuple[Pipeline, Recorded], pool: asyncpg.Pool, objects: LocalObjectStore
) -> None:
    """pydicom's SC_rgb_jpeg.dcm: implicit VR elements under an explicit transfer syntax."""
    ingest, _ = pipeline
    bad, good = await ingest.ingest([dicom_file("SC_rgb_jpeg.dcm"), dicom_file("CT_small.dcm")])
    assert (bad.outcome, bad.reason) == (Outcome.REJECTED, "UNENCODABLE_DATASET")
    assert good.outcome is Outcome.STORED
    assert await pool.fetchval("SELECT count(*) FROM instances") == 1
    assert len(stored_files(objects)) == 1


async def test_one_instance_twice_in_a_batch(
    pipeline: tuple[Pipeline, Recorded], events: aioredis.Redis
) -> None:
    ingest, _ = pipeline
    data = dicom_file("CT_small.dcm")
    first, second = await ingest.ingest([data, data])
    assert (first.outcome, second.outcome) == (Outcome.STORED, Outcome.DUPLICATE)
    assert await announced(events) == [{"instance": first.instance}]


async def test_possible_burned_in_text_goes_to_quarantine_unless_allowed(
    make_pipeline: MakePipeline, pool: asyncpg.Pool, events: aioredis.Redis
) -> None:
    ultrasound = dicom_file("US1_UNCR.dcm")  # no Burned In Annotation: US often burns in
    held, _ = make_pipeline()
    [result] = await held.ingest([ultrasound])
    assert (result.outcome, result.reason) == (Outcome.QUARANTINED, "BURNED_IN_ANNOTATION")
    assert await pool.fetchval("SELECT count(*) FROM instances") == 0
    assert await pool.fetchval("SELECT count(*) FROM quarantined_instances") == 1
    assert await announced(events) == []
    allowed, _ = make_pipeline(policy=deid.Policy(allow_burned_in=True))
    [result] = await allowed.ingest([ultrasound])
    assert result.outcome is Outcome.STORED


async def test_concurrent_uploads_of_one_instance_create_it_once(
    pipeline: tuple[Pipeline, Recorded], pool: asyncpg.Pool, events: aioredis.Redis
) -> None:
    ingest, _ = pipeline
    data = dicom_file("MR_small.dcm")
    results = await asyncio.gather(*(ingest.ingest([data]) for _ in range(5)))
    assert sorted(r[0].outcome.value for r in results) == ["duplicate"] * 4 + ["stored"]
    assert await pool.fetchval("SELECT count(*) FROM instances") == 1
    assert len(await announced(events)) == 1


async def test_a_redis_outage_does_not_fail_a_stored_upload(
    make_pipeline: MakePipeline,
    pool: asyncpg.Pool,
    unused_tcp_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{unused_tcp_port}/0", socket_connect_timeout=1
    )
    try:
        ingest, _ = make_pipeline(events=down)
        [result] = await ingest.ingest([dicom_file("CT_small.dcm")])
        assert result.outcome is Outcome.STORED
    finally:
        await down.aclose()
    assert await pool.fetchval("SELECT count(*) FROM instances") == 1
    assert any(r.message == "instance events not published" for r in caplog.records)


async def test_the_sweep_removes_what_a_crash_left_and_nothing_else(
    pipeline: tuple[Pipeline, Recorded],
    pool: asyncpg.Pool,
    objects: LocalObjectStore,
    executor: ThreadPoolExecutor,
) -> None:
    ingest, _ = pipeline
    [stored] = await ingest.ingest([dicom_file("CT_small.dcm")])
    indexed = await pool.fetchval("SELECT object_key FROM instances")
    hour_ago = time.time() - 3600
    # What a crash between store and index leaves: an object nothing points at, and a
    # temporary file of a write that never finished; both old.
    orphan, _ = ObjectStore.key_for(b"orphan")
    objects.put(orphan, b"orphan")
    (objects.root / orphan).with_name(".incoming-x").write_bytes(b"half")
    recent, _ = ObjectStore.key_for(b"an upload about to index")
    objects.put(recent, b"an upload about to index")
    rewritten, _ = ObjectStore.key_for(b"old, then written again")
    objects.put(rewritten, b"old, then written again")
    for path in [*stored_files(objects)]:
        if path.name != Path(recent).name:
            os.utime(path, (hour_ago, hour_ago))
    objects.put(rewritten, b"old, then written again")  # a retry: fresh again

    assert await sweep_orphans(pool, objects, executor, grace_seconds=60) == 2
    left = {str(p.relative_to(objects.root)) for p in stored_files(objects)}
    assert left == {indexed, recent, rewritten}
    assert objects.get(indexed)  # the indexed object stays, however old
    assert stored.outcome is Outcome.STORED


# --- group commit -------------------------------------------------------------------------


def distinct_copies(name: str, count: int) -> list[bytes]:
    """`count` copies of a corpus file, each with a SOP Instance UID of its own."""
    template = pydicom.dcmread(BytesIO(dicom_file(name)))
    copies = []
    for _ in range(count):
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        out = BytesIO()
        template.save_as(out, enforce_file_format=True)
        copies.append(out.getvalue())
    return copies


class Gated(Recorded):
    """An audit hook that holds each report until the gate opens, and refuses the reports
    that name a refused instance (as audit refuses an event)."""

    def __init__(self, pool: asyncpg.Pool, refused: Iterable[str] = ()) -> None:
        super().__init__(pool)
        self.reports: list[list[str]] = []
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.refused = set(refused)

    async def __call__(self, accesses: Sequence[Access]) -> None:
        self.reports.append([a.resource for a in accesses])
        self.entered.set()
        await self.gate.wait()
        if self.refused & {a.resource for a in accesses}:
            raise Unavailable("AUDIT_UNAVAILABLE", "the audit log refused to record the access")
        await super().__call__(accesses)


@pytest.fixture
def gated(
    pool: asyncpg.Pool, objects: ObjectStore, events: aioredis.Redis, executor: ThreadPoolExecutor
) -> Callable[..., tuple[Pipeline, Gated]]:
    def make(refused: Iterable[str] = ()) -> tuple[Pipeline, Gated]:
        audit = Gated(pool, refused)
        pipeline = Pipeline(
            pool=pool, objects=objects, events=events, executor=executor, report=audit,
            policy=POLICY, deid_key=DEID_KEY, vault=VAULT,
        )  # fmt: skip
        return pipeline, audit

    return make


async def uploads_behind_a_commit(
    ingest: Pipeline, audit: Gated, objects: LocalObjectStore, files: Sequence[bytes]
) -> list[asyncio.Task[list[Result]]]:
    """The first file's call commits alone and is held there, while the other files are
    uploaded one per call and wait behind it; then the gate opens. The calls, in order."""
    first = asyncio.create_task(ingest.ingest(files[:1]))
    await audit.entered.wait()
    others = [asyncio.create_task(ingest.ingest([data])) for data in files[1:]]
    await all_stored(objects, len(files))
    audit.gate.set()
    return [first, *others]


async def all_stored(objects: LocalObjectStore, count: int) -> None:
    """Returns once `count` objects are stored and their calls wait for a commit."""
    for _ in range(3000):
        if len(stored_files(objects)) >= count:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # from a stored object to a waiting call: a few loop turns


async def transactions(pool: asyncpg.Pool) -> int:
    """How many transactions wrote the index's instances (rows written together share
    their transaction's id, xmin)."""
    count: int = await pool.fetchval("SELECT count(DISTINCT xmin::text) FROM instances")
    return count


async def test_concurrent_calls_share_an_audit_report_and_an_index_transaction(
    gated: Callable[..., tuple[Pipeline, Gated]],
    pool: asyncpg.Pool,
    objects: LocalObjectStore,
    events: aioredis.Redis,
) -> None:
    files = distinct_copies("CT_small.dcm", 6)
    ingest, audit = gated()
    calls = await uploads_behind_a_commit(ingest, audit, objects, files)
    results = [result for [result] in await asyncio.gather(*calls)]
    # Each call has its own result, as if it had been alone.
    assert [(r.outcome, r.instance) for r in results] == [
        (Outcome.STORED, stored_name(data)) for data in files
    ]
    assert [len(report) for report in audit.reports] == [1, 5]
    assert audit.indexed_before == [0, 1]  # each group audited before it is indexed
    assert await transactions(pool) == 2
    assert sorted(e["instance"] for e in await announced(events)) == sorted(
        r.instance for r in results
    )


async def test_a_refused_audit_report_fails_only_the_call_it_names(
    gated: Callable[..., tuple[Pipeline, Gated]], pool: asyncpg.Pool, objects: LocalObjectStore
) -> None:
    files = distinct_copies("CT_small.dcm", 6)
    ingest, audit = gated(refused={stored_name(files[3])})
    calls = await uploads_behind_a_commit(ingest, audit, objects, files)
    answers = await asyncio.gather(*calls, return_exceptions=True)
    refused = answers.pop(3)
    assert isinstance(refused, Unavailable) and refused.reason == "AUDIT_UNAVAILABLE"
    assert [a[0].outcome for a in answers if isinstance(a, list)] == [Outcome.STORED] * 5
    # The group's report was refused: each of its calls was then reported alone.
    assert [len(report) for report in audit.reports] == [1, 5, 1, 1, 1, 1, 1]
    assert len(recorded_resources := [a.resource for a in audit.accesses]) == 5
    assert stored_name(files[3]) not in recorded_resources
    indexed = await pool.fetch("SELECT sop_instance_uid FROM instances")
    assert len(indexed) == 5 and stored_name(files[3]).rsplit("/", 1)[1] not in {
        row["sop_instance_uid"] for row in indexed
    }


async def test_an_index_failure_fails_only_the_call_it_comes_from(
    gated: Callable[..., tuple[Pipeline, Gated]], pool: asyncpg.Pool, objects: LocalObjectStore
) -> None:
    files = distinct_copies("CT_small.dcm", 6)
    bad = stored_name(files[2]).rsplit("/", 1)[1]
    await pool.execute(
        "CREATE FUNCTION refuse_instance() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.sop_instance_uid = '{bad}' THEN RAISE EXCEPTION 'refused by the test'; "
        "END IF; RETURN NEW; END $$; "
        "CREATE TRIGGER refuse BEFORE INSERT ON instances FOR EACH ROW "
        "EXECUTE FUNCTION refuse_instance()"
    )
    ingest, audit = gated()
    calls = await uploads_behind_a_commit(ingest, audit, objects, files)
    answers = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(answers.pop(2), asyncpg.RaiseError)
    assert [a[0].outcome for a in answers if isinstance(a, list)] == [Outcome.STORED] * 5
    assert await pool.fetchval("SELECT count(*) FROM instances") == 5
    # The group's transaction failed: each of its calls was then indexed on its own.
    assert await transactions(pool) == 1 + 4


async def test_a_call_that_gives_up_before_its_group_commits_is_left_out(
    gated: Callable[..., tuple[Pipeline, Gated]], pool: asyncpg.Pool, objects: LocalObjectStore
) -> None:
    first, second = distinct_copies("CT_small.dcm", 2)
    ingest, audit = gated()
    held = asyncio.create_task(ingest.ingest([first]))
    await audit.entered.wait()
    gives_up = asyncio.create_task(ingest.ingest([second]))
    await all_stored(objects, 2)
    gives_up.cancel()
    audit.gate.set()
    [result] = await held
    with pytest.raises(asyncio.CancelledError):
        await gives_up
    assert result.outcome is Outcome.STORED
    assert audit.reports == [[result.instance]]
    assert await pool.fetchval("SELECT count(*) FROM instances") == 1
    assert len(stored_files(objects)) == 2  # unindexed: the orphan sweep's


# --- at the door: pixels and bytes --------------------------------------------------------


async def test_a_broken_compressed_file_is_refused_as_undecodable(
    pipeline: tuple[Pipeline, Recorded], objects: LocalObjectStore
) -> None:
    ingest, recorded = pipeline
    dataset = pydicom.dcmread(BytesIO(dicom_file("SC_rgb_jpeg_dcmtk.dcm")))
    [frame] = generate_frames(dataset.PixelData, number_of_frames=1)
    dataset.PixelData = encapsulate([frame[: len(frame) // 2]])
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    cut = dicom_file("MR_small.dcm")
    native = pydicom.dcmread(BytesIO(cut))
    native.PixelData = native.PixelData[:-100]
    short = BytesIO()
    native.save_as(short, enforce_file_format=True)
    results = await ingest.ingest([out.getvalue(), short.getvalue()])
    assert [(r.outcome, r.reason) for r in results] == [
        (Outcome.REJECTED, "UNDECODABLE_PIXEL_DATA"),
        (Outcome.REJECTED, "INCONSISTENT_PIXEL_DATA"),
    ]
    assert stored_files(objects) == [] and recorded.accesses == []
