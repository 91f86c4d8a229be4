"""Datasets from a query on the index: what the query finds, how it is labelled, paired and
frozen into versions, and what is refused. The index here is a table searched with DICOM's
matching rules for the keys ingest takes (the cross-service test asks ingest itself)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from medimg_core.errors import InvalidArgument
from medimg_training import datasets, query
from medimg_training.datasets import Found, Pseudonym, SeriesName, Task
from medimg_training.query import IndexSeries, Query, matches
from services.training.tests.support import probe_of, segmentation_table


@dataclass
class Study:
    uid: str
    patient: str
    date: str
    series: list[IndexSeries] = field(default_factory=list)


@dataclass
class Index:
    """Studies and their series in memory, searched as ingest searches its index."""

    table: list[Study]

    async def studies(self, keys: Mapping[str, str]) -> list[str]:
        first, dash, last = keys.get("StudyDate", "").partition("-")
        last = last if dash else first
        wanted = [m for m in keys.get("ModalitiesInStudy", "").split(",") if m]
        return [
            s.uid
            for s in self.table
            if matches(keys.get("PatientID", ""), s.patient)
            and (not first or s.date >= first)
            and (not last or s.date <= last)
            and (not wanted or any(series.modality in wanted for series in s.series))
        ]

    async def series(self, study_uid: str, keys: Mapping[str, str]) -> list[IndexSeries]:
        study = next(s for s in self.table if s.uid == study_uid)
        return [
            s
            for s in study.series
            if matches(keys.get("Modality", ""), s.modality)
            and matches(keys.get("SeriesDescription", ""), s.series_description)
        ]


def index_of() -> Index:
    """Four patients: CT chest, MR head and CT head studies over 2025 and 2026."""
    table = [
        ("1.1", "p1", "20250110", [("CT", "CHEST", "thorax 1mm"), ("SR", "", "report")]),
        ("1.2", "p1", "20260110", [("MR", "HEAD", "T1 axial"), ("MR", "HEAD", "T2 axial")]),
        ("2.1", "p2", "20260301", [("CT", "HEAD", "head 5mm"), ("CT", "", "scout")]),
        ("3.1", "p3", "20260401", [("MR", "KNEE", "PD sag")]),
        ("4.1", "p4", "20261201", [("CT", "CHEST", "thorax 2mm")]),
    ]
    studies = []
    for uid, patient, date, series in table:
        found = [IndexSeries(uid, f"{uid}.{k}", *values) for k, values in enumerate(series)]
        studies.append(Study(uid, patient, date, found))
    return Index(studies)


async def test_a_query_finds_series_by_study_and_series_keys() -> None:
    index = index_of()
    everything = await query.found_series(index, Query())
    assert len(everything) == 8
    assert [s.name for s in everything] == sorted(s.name for s in everything)
    ct_2026 = await query.found_series(index, Query(modalities=("CT",), study_date="20260101-"))
    assert [s.series_uid for s in ct_2026] == ["2.1.0", "2.1.1", "4.1.0"]
    heads = await query.found_series(index, Query(body_part_examined="HEAD"))
    assert [s.series_uid for s in heads] == ["1.2.0", "1.2.1", "2.1.0"]
    p1_t1 = await query.found_series(
        index, Query(patient_pseudonyms=("p1", "p3"), series_description="*T1*")
    )
    assert [s.series_uid for s in p1_t1] == ["1.2.0"]
    several = await query.found_series(
        index, Query(modalities=("CT", "MR"), study_date="-20260315")
    )
    assert [s.series_uid for s in several] == ["1.1.0", "1.2.0", "1.2.1", "2.1.0", "2.1.1"]


async def test_classes_come_from_an_attribute() -> None:
    index = index_of()
    items, names = await query.classified(index, Query(), "Modality", ())
    # SR is a class like any other value; series without a value would be left out.
    assert names == ("CT", "MR", "SR")
    assert len(items) == 8
    items, names = await query.classified(index, Query(), "BodyPartExamined", ("CHEST", "HEAD"))
    assert names == ("CHEST", "HEAD")
    assert [(i.series.rsplit("/", 1)[1], i.label) for i in items] == [
        ("1.1.0", "CHEST"),
        ("1.2.0", "HEAD"),
        ("1.2.1", "HEAD"),
        ("2.1.0", "HEAD"),
        ("4.1.0", "CHEST"),
    ]


async def test_each_version_freezes_what_the_query_found(pool: asyncpg.Pool) -> None:
    index = index_of()
    pseudonyms = {
        f"studies/{study.uid}/series/{s.series_uid}": study.patient
        for study in index.table
        for s in study.series
    }
    wanted = Query(modalities=("CT", "MR"))

    async def version() -> datasets.Dataset:
        items, names = await query.classified(index, wanted, "Modality", ())
        return await datasets.create(
            pool,
            probe_of(pseudonyms),
            dataset_id="by-query",
            task=Task.CLASSIFICATION,
            class_names=names,
            items=items,
            fractions=(0.5, 0.5, 0.0),
            split_seed="q",
            creator="max",
            query=query.stored(wanted, "Modality"),
        )

    first = await version()
    # New data arrives in the index; the same query again is a new version.
    index.table.append(Study("5.1", "p5", "20261231", [IndexSeries("5.1", "5.1.0", "MR")]))
    pseudonyms["studies/5.1/series/5.1.0"] = "p5"
    second = await version()
    assert (first.version, second.version) == (1, 2)
    assert len(first.items) == 7 and len(second.items) == 8
    again = await datasets.get(pool, first.name)
    assert [i.series for i in again.items] == [i.series for i in first.items]
    assert again.query == {
        "query": {"modalities": ["CT", "MR"], "study_date": "", "body_part_examined": "",
                  "series_description": "", "patient_pseudonyms": []},
        "label_rule": {"attribute": "Modality"},
    }  # fmt: skip
    # Splits stay by patient: p1's CT and MR series are in one split.
    p1 = {i.split for i in again.items if i.patient_pseudonym == "p1"}
    assert len(p1) == 1


async def test_image_series_are_paired_with_the_seg_that_segments_them(tmp_path: Path) -> None:
    items, pseudonyms, volumes = segmentation_table(3, tmp_path)
    studies = []
    for item in items:
        study, series = item.series.split("/")[1], item.series.split("/")[3]
        seg = item.label_series.split("/")[3]
        studies.append(
            Study(study, pseudonyms[item.series], "20260101",
                  [IndexSeries(study, series, "CT"), IndexSeries(study, seg, "SEG")])
        )  # fmt: skip
    # A fourth CT study has no SEG: it is left out.
    studies.append(Study("9", "p9", "20260101", [IndexSeries("9", "9.1", "CT")]))
    pseudonyms["studies/9/series/9.1"] = "p9"
    volumes["studies/9/series/9.1"] = ((3, 128, 128), ["9.1.0", "9.1.1", "9.1.2"])
    index = Index(studies)
    probe = query.memoized(probe_of(pseudonyms, volumes))

    paired = await query.paired(index, Query(modalities=("CT",)), probe)

    assert [(i.series, i.label_series) for i in paired] == [
        (i.series, i.label_series) for i in items
    ]
    # A second SEG of the same slices in the first study makes its pairing ambiguous.
    studies[0].series.append(IndexSeries(studies[0].uid, "2.0.3", "SEG"))
    pseudonyms["studies/2.0/series/2.0.3"] = pseudonyms[items[0].series]
    volumes["studies/2.0/series/2.0.3"] = volumes[items[0].label_series]
    with pytest.raises(InvalidArgument) as caught:
        await query.paired(index, Query(), query.memoized(probe_of(pseudonyms, volumes)))
    assert caught.value.reason == "AMBIGUOUS_LABEL_SERIES"


async def test_a_probe_asks_once_per_series() -> None:
    asked: list[str] = []

    async def probe(series: SeriesName) -> Found:
        asked.append(series)
        return Found(Pseudonym("p"))

    once = query.memoized(probe)
    for _ in range(3):
        await once(SeriesName("studies/1/series/2"))
    assert asked == ["studies/1/series/2"]


@pytest.mark.parametrize(
    ("wanted", "attribute", "task", "reason"),
    [
        (Query(), "PatientName", Task.CLASSIFICATION, "INVALID_LABEL_RULE"),
        (Query(), "", Task.CLASSIFICATION, "INVALID_LABEL_RULE"),
        (Query(), "Modality", Task.SEGMENTATION, "INVALID_LABEL_RULE"),
        (Query(study_date="2026-01-01"), "Modality", Task.CLASSIFICATION, "INVALID_QUERY"),
        (Query(study_date="-"), "Modality", Task.CLASSIFICATION, "INVALID_QUERY"),
        (Query(modalities=("CT,MR",)), "Modality", Task.CLASSIFICATION, "INVALID_QUERY"),
        (Query(patient_pseudonyms=("",)), "Modality", Task.CLASSIFICATION, "INVALID_QUERY"),
    ],
)
def test_a_bad_query_or_rule_is_refused(
    wanted: Query, attribute: str, task: Task, reason: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        query.check(wanted, attribute, task)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [("CT", "CT", True), ("CT", "CTA", False), ("*T1*", "T1 axial", True),
     ("T?", "T1", True), ("T?", "T12", False), ("a.b", "axb", False), ("", "x", True)],
)  # fmt: skip
def test_dicom_wildcards(pattern: str, value: str, expected: bool) -> None:
    assert matches(pattern, value) is expected
