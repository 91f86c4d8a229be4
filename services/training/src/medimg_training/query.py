"""Datasets from a query on ingest's index: the series a query finds, labelled by a rule.

The query runs in ingest (its study and series searches, with DICOM's matching rules) when
a dataset version is created; the series it finds become the version's items, sorted by
name, so the version is frozen: running the same query later creates a new version and
never changes an old one. Classification labels come from an index attribute of each
series (Modality, BodyPartExamined, SeriesDescription). Segmentation pairs each image
series with the SEG series of its study whose label slices belong to it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from medimg_core.errors import InvalidArgument
from medimg_training.datasets import (
    MAX_ITEMS,
    Found,
    Item,
    Probe,
    SeriesName,
    Task,
)

#: Index attributes a label rule may take a class from, with their DICOM tags.
ATTRIBUTES = {
    "Modality": "00080060",
    "BodyPartExamined": "00180015",
    "SeriesDescription": "0008103E",
}
#: The modality of DICOM Segmentation series.
SEG = "SEG"
_DATE = re.compile(r"(\d{8})?(-(\d{8})?)?")


@dataclass(frozen=True)
class Query:
    """Series to find; every field narrows, an empty one matches everything (see the proto's
    DatasetQuery)."""

    modalities: tuple[str, ...] = ()
    study_date: str = ""
    body_part_examined: str = ""
    series_description: str = ""
    patient_pseudonyms: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}  # fmt: skip


@dataclass(frozen=True)
class IndexSeries:
    """One series as ingest's index holds it (de-identified values)."""

    study_uid: str
    series_uid: str
    modality: str
    body_part_examined: str = ""
    series_description: str = ""

    @property
    def name(self) -> SeriesName:
        return SeriesName(f"studies/{self.study_uid}/series/{self.series_uid}")

    def attribute(self, keyword: str) -> str:
        return {
            "Modality": self.modality,
            "BodyPartExamined": self.body_part_examined,
            "SeriesDescription": self.series_description,
        }[keyword]


class Index(Protocol):
    """Ingest's search, as QIDO-RS keys (DICOM keywords) to matching studies and series."""

    async def studies(self, keys: Mapping[str, str]) -> list[str]:
        """Study Instance UIDs of the matching studies, all pages."""
        ...

    async def series(self, study_uid: str, keys: Mapping[str, str]) -> list[IndexSeries]:
        """The matching series of one study, all pages."""
        ...


def check(query: Query, attribute: str, task: Task | None) -> None:
    """Refuses a query or label rule that cannot be run, before ingest is asked."""
    if task is Task.CLASSIFICATION and attribute not in ATTRIBUTES:
        raise InvalidArgument(
            "INVALID_LABEL_RULE",
            f"label_rule.attribute must be one of {', '.join(ATTRIBUTES)} for classification",
        )
    if task is Task.SEGMENTATION and attribute:
        raise InvalidArgument(
            "INVALID_LABEL_RULE",
            "a segmentation label rule takes no attribute: each image series is paired with "
            "the SEG series of its study that segments it",
        )
    match = _DATE.fullmatch(query.study_date.strip())
    if query.study_date and (match is None or query.study_date.strip() == "-"):
        raise InvalidArgument(
            "INVALID_QUERY",
            "query.study_date is YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-",
        )
    texts = [*query.modalities, *query.patient_pseudonyms]
    if any(not value or "," in value or "\\" in value for value in texts):
        raise InvalidArgument(
            "INVALID_QUERY", "modalities and patient_pseudonyms are values without , or \\"
        )


def matches(pattern: str, value: str) -> bool:
    """DICOM matching of one text key (PS3.4 C.2.2.2): exact, or `*` and `?` wildcards."""
    if not pattern or pattern == "*":
        return True
    expression = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(expression, value, flags=re.DOTALL) is not None


async def found_series(index: Index, query: Query) -> list[IndexSeries]:
    """The series of the query, by name: studies by patient, date and modality first, then
    their series by modality and description; body part is matched here on what the index
    answers (its series search takes no such key)."""
    study_uids: set[str] = set()
    for patient in query.patient_pseudonyms or ("",):
        keys = {"PatientID": patient, "StudyDate": query.study_date.strip(),
                "ModalitiesInStudy": ",".join(query.modalities)}  # fmt: skip
        study_uids.update(await index.studies({k: v for k, v in keys.items() if v}))
    found: dict[str, IndexSeries] = {}
    for study in sorted(study_uids):
        for modality in query.modalities or ("",):
            keys = {"Modality": modality, "SeriesDescription": query.series_description}
            for series in await index.series(study, {k: v for k, v in keys.items() if v}):
                if matches(query.body_part_examined, series.body_part_examined):
                    found[series.name] = series
        if len(found) > MAX_ITEMS:
            raise InvalidArgument(
                "TOO_MANY_ITEMS", f"the query finds more than {MAX_ITEMS} series; narrow it"
            )
    return [found[name] for name in sorted(found)]


async def classified(
    index: Index, query: Query, attribute: str, class_names: Sequence[str]
) -> tuple[list[Item], tuple[str, ...]]:
    """Items labelled by the attribute's value, and the class names: those given (series of
    other values are left out), or else the values found, sorted (series without a value are
    left out)."""
    series = [s for s in await found_series(index, query) if s.modality != SEG]
    values = [s.attribute(attribute) for s in series]
    names = tuple(class_names) or tuple(sorted({v for v in values if v}))
    items = [Item(s.name, value) for s, value in zip(series, values, strict=True) if value in names]
    return items, names


async def paired(index: Index, query: Query, probe: Probe) -> list[Item]:
    """Image series each paired with the SEG series of its study whose label slices are
    slices of it; image series without one are left out, one with two is refused."""
    images = [s for s in await found_series(index, query) if s.modality != SEG]
    items: list[Item] = []
    for study in sorted({s.study_uid for s in images}):
        seg_names = [s.name for s in await index.series(study, {"Modality": SEG})]
        segs = [await probe(name) for name in seg_names]
        for image in (s for s in images if s.study_uid == study):
            found = await probe(image.name)
            labels = [
                name for name, seg in zip(seg_names, segs, strict=True) if _segments(seg, found)
            ]
            if len(labels) > 1:
                raise InvalidArgument(
                    "AMBIGUOUS_LABEL_SERIES",
                    f"{image.name} is segmented by {len(labels)} SEG series "
                    f"({', '.join(labels)}): list the pairs as items instead",
                )
            if labels:
                items.append(Item(image.name, label_series=labels[0]))
    return items


def _segments(labels: Found, image: Found) -> bool:
    return (
        bool(labels.slices)
        and set(labels.slices) <= set(image.slices)
        and labels.pseudonym == image.pseudonym
    )


async def resolve(
    index: Index,
    probe: Probe,
    query: Query,
    *,
    attribute: str,
    task: Task | None,
    class_names: Sequence[str],
) -> tuple[list[Item], tuple[str, ...]]:
    """The items and class names of a dataset given as a query and a label rule."""
    if task is None:
        raise InvalidArgument("TASK_REQUIRED", "say the task: classification or segmentation")
    check(query, attribute, task)
    if task is Task.CLASSIFICATION:
        return await classified(index, query, attribute, class_names)
    return await paired(index, query, probe), tuple(class_names)


def memoized(probe: Probe) -> Probe:
    """The probe, asking ingest once per series (resolution and creation both look)."""
    seen: dict[SeriesName, Found] = {}

    async def once(series: SeriesName) -> Found:
        if series not in seen:
            seen[series] = await probe(series)
        return seen[series]

    return once


def stored(query: Query, attribute: str) -> dict[str, Any]:
    """The query and rule as the dataset version keeps them."""
    return {"query": query.as_json(), "label_rule": {"attribute": attribute}}
