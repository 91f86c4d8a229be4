"""Study and series searches on the index, with DICOM's matching rules: what C-FIND and
QIDO-RS both answer from.

Matching, as PS3.4 C.2.2.2 defines it for the keys the index holds: a single value
matches exactly; `*` and `?` are wildcards in text keys; a date key may be a range
(`20260101-20261231`, `-20261231`, `20260101-`); a UID key may list several UIDs. An
empty key matches everything. Every value here is de-identified: Patient ID is the
pseudonym.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

import asyncpg

from medimg_core.errors import InvalidArgument

MAX_RESULTS = 1000


@dataclass(frozen=True)
class StudyQuery:
    patient_id: str = ""
    study_uids: Sequence[str] = ()
    study_date: str = ""  # a date or a range
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    modalities: Sequence[str] = ()  # ModalitiesInStudy: any of them
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class SeriesQuery:
    study_uid: str = ""
    series_uids: Sequence[str] = ()
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class InstanceQuery:
    study_uid: str = ""
    series_uid: str = ""
    sop_instance_uids: Sequence[str] = ()
    sop_class_uids: Sequence[str] = ()
    modality: str = ""
    instance_number: int | None = None
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class StudyRecord:
    study_uid: str
    patient_id: str
    study_date: date | None
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    modalities: list[str] = field(default_factory=list)
    series_count: int = 0
    instance_count: int = 0


@dataclass(frozen=True)
class SeriesRecord:
    study_uid: str
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    instance_count: int


class _Where:
    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.args: list[object] = []

    def add(self, clause: str, *values: object) -> None:
        """`clause` with {} for each value's placeholder."""
        placeholders = []
        for value in values:
            self.args.append(value)
            placeholders.append(f"${len(self.args)}")
        self.clauses.append(clause.format(*placeholders))

    def text(self, column: str, value: str) -> None:
        if not value or value == "*":
            return
        if "*" in value or "?" in value:
            escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            self.add(f"{column} LIKE {{}}", escaped.replace("*", "%").replace("?", "_"))
        else:
            self.add(f"{column} = {{}}", value)

    def sql(self) -> str:
        return " AND ".join(self.clauses) or "true"


def date_range(value: str) -> tuple[date | None, date | None]:
    """(first, last) of a DICOM date or date range; InvalidArgument if it is neither."""
    text = value.strip()
    first, dash, last = text.partition("-")
    try:
        start = _date(first) if first else None
        end = _date(last) if last else None
    except ValueError:
        raise InvalidArgument(
            "INVALID_DATE", "dates are YYYYMMDD, ranges YYYYMMDD-YYYYMMDD", key="StudyDate"
        ) from None
    if not dash:
        end = start
    if start is not None and end is not None and end < start:
        raise InvalidArgument("INVALID_DATE", "a date range must not end before it starts")
    return start, end


def _date(text: str) -> date:
    return datetime.strptime(text.replace(".", ""), "%Y%m%d").date()


def _page(limit: int, offset: int) -> tuple[int, int]:
    if limit < 0 or offset < 0:
        raise InvalidArgument("INVALID_PAGE", "limit and offset must not be negative")
    return min(limit or MAX_RESULTS, MAX_RESULTS), offset


async def find_studies(pool: asyncpg.Pool, query: StudyQuery) -> list[StudyRecord]:
    """Matching studies, oldest study date first (then by UID), one page."""
    where = _Where()
    where.text("s.patient_pseudonym", query.patient_id)
    where.text("s.accession_number", query.accession_number)
    where.text("s.study_id", query.study_id)
    where.text("s.study_description", query.study_description)
    if query.study_uids:
        where.add("s.study_uid = ANY({})", list(query.study_uids))
    if query.study_date:
        start, end = date_range(query.study_date)
        if start is not None:
            where.add("s.study_date >= {}", start)
        if end is not None:
            where.add("s.study_date <= {}", end)
    if query.modalities:
        where.add(
            "EXISTS (SELECT 1 FROM series m WHERE m.study_uid = s.study_uid "
            "AND m.modality = ANY({}))",
            list(query.modalities),
        )
    limit, offset = _page(query.limit, query.offset)
    where.args += [limit, offset]
    rows = await pool.fetch(
        "SELECT s.*, "
        "  (SELECT coalesce(array_agg(DISTINCT se.modality ORDER BY se.modality), '{}') "
        "     FROM series se WHERE se.study_uid = s.study_uid) AS modalities, "
        "  (SELECT count(*) FROM series se WHERE se.study_uid = s.study_uid) AS series_count, "
        "  (SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid) AS instance_count "
        f"FROM studies s WHERE {where.sql()} "
        f"ORDER BY s.study_date NULLS LAST, s.study_uid "
        f"LIMIT ${len(where.args) - 1} OFFSET ${len(where.args)}",
        *where.args,
    )
    return [_study(r) for r in rows]


def _study(r: asyncpg.Record) -> StudyRecord:
    return StudyRecord(
        study_uid=r["study_uid"],
        patient_id=r["patient_pseudonym"],
        study_date=r["study_date"],
        study_time=r["study_time"],
        accession_number=r["accession_number"],
        study_id=r["study_id"],
        study_description=r["study_description"],
        modalities=list(r["modalities"]),
        series_count=r["series_count"],
        instance_count=r["instance_count"],
    )


async def find_series(pool: asyncpg.Pool, query: SeriesQuery) -> list[SeriesRecord]:
    """Matching series, by study then series number, one page."""
    where = _Where()
    if query.study_uid:
        where.add("se.study_uid = {}", query.study_uid)
    if query.series_uids:
        where.add("se.series_uid = ANY({})", list(query.series_uids))
    where.text("se.modality", query.modality)
    where.text("se.series_description", query.series_description)
    if query.series_number is not None:
        where.add("se.series_number = {}", query.series_number)
    limit, offset = _page(query.limit, query.offset)
    where.args += [limit, offset]
    rows = await pool.fetch(
        "SELECT se.*, (SELECT count(*) FROM instances i WHERE i.series_uid = se.series_uid) "
        f"AS instance_count FROM series se WHERE {where.sql()} "
        "ORDER BY se.study_uid, se.series_number NULLS LAST, se.series_uid "
        f"LIMIT ${len(where.args) - 1} OFFSET ${len(where.args)}",
        *where.args,
    )
    return [_series(r) for r in rows]


def _series(r: asyncpg.Record) -> SeriesRecord:
    return SeriesRecord(
        study_uid=r["study_uid"],
        series_uid=r["series_uid"],
        modality=r["modality"],
        series_number=r["series_number"],
        series_description=r["series_description"],
        body_part_examined=r["body_part_examined"],
        instance_count=r["instance_count"],
    )


@dataclass(frozen=True)
class InstanceRecord:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str
    patient_id: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    object_key: str
    sha256: str


async def find_instances(pool: asyncpg.Pool, query: InstanceQuery) -> list[InstanceRecord]:
    """Matching instances, by study, series, instance number, one page."""
    where = _Where()
    if query.study_uid:
        where.add("i.study_uid = {}", query.study_uid)
    if query.series_uid:
        where.add("i.series_uid = {}", query.series_uid)
    if query.sop_instance_uids:
        where.add("i.sop_instance_uid = ANY({})", list(query.sop_instance_uids))
    if query.sop_class_uids:
        where.add("i.sop_class_uid = ANY({})", list(query.sop_class_uids))
    where.text("se.modality", query.modality)
    if query.instance_number is not None:
        where.add("i.instance_number = {}", query.instance_number)
    limit, offset = _page(query.limit, query.offset)
    where.args += [limit, offset]
    rows = await pool.fetch(
        "SELECT i.*, se.modality, s.patient_pseudonym FROM instances i "
        "JOIN series se USING (series_uid) JOIN studies s ON s.study_uid = i.study_uid "
        f"WHERE {where.sql()} "
        "ORDER BY i.study_uid, i.series_uid, i.instance_number NULLS LAST, i.sop_instance_uid "
        f"LIMIT ${len(where.args) - 1} OFFSET ${len(where.args)}",
        *where.args,
    )
    return [
        InstanceRecord(
            study_uid=r["study_uid"],
            series_uid=r["series_uid"],
            sop_instance_uid=r["sop_instance_uid"],
            sop_class_uid=r["sop_class_uid"],
            transfer_syntax=r["transfer_syntax"],
            modality=r["modality"],
            patient_id=r["patient_pseudonym"],
            instance_number=r["instance_number"],
            rows=r["rows"],
            columns=r["columns"],
            number_of_frames=r["number_of_frames"],
            object_key=r["object_key"],
            sha256=r["sha256"],
        )
        for r in rows
    ]
