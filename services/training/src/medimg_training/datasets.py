"""Datasets: labelled series, split by patient pseudonym, stored as immutable versions.

A split is decided per patient, never per series, so that no patient's images are both
trained on and measured on: the pseudonym and the dataset's split seed are hashed
(sha256) to a number in [0, 1), which falls into train, validation or test by the
cumulative fractions. The same seed and pseudonym always give the same split, whatever
else is in the dataset.

A segmentation item pairs an image series with a label series (a DICOM SEG that ingest
serves as a label volume on the image's grid); both are looked up in ingest, and the
label series must be of the same patient and segment slices of the image series. Class
names of a segmentation dataset name the label values, from 0 (no segment).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, NewType

import asyncpg

from medimg_core.errors import InvalidArgument, NotFound

DatasetName = NewType("DatasetName", str)
SeriesName = NewType("SeriesName", str)
Pseudonym = NewType("Pseudonym", str)


@dataclass(frozen=True)
class Found:
    """What ingest says of a series: its patient, and the volume it serves (shape (slices,
    rows, columns[, samples]); the SOP Instance UID of each slice, for a label volume the
    image slice each label slice belongs to). Shape and slices may be unknown (empty)."""

    pseudonym: Pseudonym
    shape: tuple[int, ...] = ()
    slices: tuple[str, ...] = ()


#: Looks a series up in ingest, or raises NotFound (SERIES_NOT_FOUND).
Probe = Callable[[SeriesName], Awaitable[Found]]

DATASET_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
_SERIES = re.compile(r"studies/[^/]+/series/[^/]+")
_NAME = re.compile(r"datasets/([a-z][a-z0-9-]{0,62})/versions/([1-9][0-9]{0,8})")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
DEFAULT_SEED = "medimg"
#: The label names of a segmentation dataset that names none: label 0 and label 1.
DEFAULT_SEGMENT_NAMES = ("background", "foreground")
MAX_ITEMS = 100_000


class Task(StrEnum):
    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"


class Split(StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


SPLITS = (Split.TRAIN, Split.VALIDATION, Split.TEST)


@dataclass(frozen=True)
class Item:
    series: SeriesName
    label: str = ""
    label_series: str = ""
    patient_pseudonym: Pseudonym = Pseudonym("")
    split: Split | None = None


@dataclass(frozen=True)
class Dataset:
    dataset_id: str
    version: int
    task: Task
    class_names: tuple[str, ...]
    items: tuple[Item, ...]
    fractions: tuple[float, float, float]
    split_seed: str
    creator: str
    create_time: datetime
    description: str = ""
    counts: tuple[int, int, int] = field(default=(0, 0, 0))
    #: The query and label rule the items were found by (empty: a list of series).
    query: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def name(self) -> DatasetName:
        return DatasetName(f"datasets/{self.dataset_id}/versions/{self.version}")


def split_of(pseudonym: str, seed: str, fractions: Sequence[float]) -> Split:
    """The split of a patient: deterministic in (seed, pseudonym)."""
    digest = hashlib.sha256(f"{seed}\0{pseudonym}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    train, validation, _ = fractions
    if point < train:
        return Split.TRAIN
    if point < train + validation:
        return Split.VALIDATION
    return Split.TEST


def parse_name(name: str) -> tuple[str, int]:
    match = _NAME.fullmatch(name)
    if not match:
        raise InvalidArgument(
            "INVALID_NAME", "a dataset name looks like datasets/{dataset}/versions/{version}"
        )
    return match[1], int(match[2])


def check_id(dataset_id: str) -> None:
    if not DATASET_ID.fullmatch(dataset_id):
        raise InvalidArgument(
            "INVALID_DATASET_ID",
            "dataset_id is 1 to 63 lower-case letters, digits and hyphens, from a letter",
        )


def check_request(  # noqa: PLR0912 - one check per rule, in order
    dataset_id: str,
    task: Task | None,
    class_names: Sequence[str],
    items: Sequence[Item],
    fractions: Sequence[float] | None,
) -> tuple[float, float, float]:
    """Refuses a dataset that cannot be built, before anything is looked up or stored."""
    check_id(dataset_id)
    if task is None:
        raise InvalidArgument("TASK_REQUIRED", "say the task: classification or segmentation")
    if not items:
        raise InvalidArgument("EMPTY_DATASET", "a dataset needs at least one item")
    if len(items) > MAX_ITEMS:
        raise InvalidArgument("TOO_MANY_ITEMS", f"a dataset holds at most {MAX_ITEMS} items")
    seen: set[str] = set()
    for index, item in enumerate(items):
        if not _SERIES.fullmatch(item.series):
            raise InvalidArgument(
                "INVALID_SERIES",
                f"items[{index}].series must look like studies/{{study}}/series/{{series}}",
                index=index,
            )
        if item.series in seen:
            raise InvalidArgument(
                "DUPLICATE_SERIES", f"items[{index}]: {item.series} is listed twice", index=index
            )
        seen.add(item.series)
    if task is Task.CLASSIFICATION or class_names:
        if len(class_names) < 2:
            raise InvalidArgument(
                "TOO_FEW_CLASSES",
                f"a {task} dataset needs at least two class_names"
                + (
                    " (label 0, no segment, and one per segment)"
                    if task is Task.SEGMENTATION
                    else ""
                ),
            )
        if len(set(class_names)) != len(class_names) or not all(class_names):
            raise InvalidArgument("INVALID_CLASS_NAMES", "class_names must be distinct, not empty")
    if task is Task.CLASSIFICATION:
        for index, item in enumerate(items):
            if item.label not in class_names:
                raise InvalidArgument(
                    "UNKNOWN_LABEL",
                    f"items[{index}].label {item.label!r} is not one of class_names",
                    index=index,
                )
    else:
        for index, item in enumerate(items):
            if not _SERIES.fullmatch(item.label_series):
                raise InvalidArgument(
                    "LABEL_SERIES_REQUIRED",
                    f"items[{index}].label_series must name the segmentation series",
                    index=index,
                )
            if item.label_series == item.series:
                raise InvalidArgument(
                    "LABEL_SERIES_REQUIRED",
                    f"items[{index}].label_series is the image series itself",
                    index=index,
                )
    chosen = tuple(fractions) if fractions else DEFAULT_FRACTIONS
    if len(chosen) != 3 or any(f < 0 for f in chosen) or abs(sum(chosen) - 1) > 1e-6:
        raise InvalidArgument(
            "INVALID_SPLIT_FRACTIONS", "split fractions must be >= 0 and add up to 1"
        )
    if chosen[0] == 0:
        raise InvalidArgument("INVALID_SPLIT_FRACTIONS", "the train fraction must be above 0")
    return (float(chosen[0]), float(chosen[1]), float(chosen[2]))


async def create(
    pool: asyncpg.Pool,
    probe: Probe,
    *,
    dataset_id: str,
    task: Task | None,
    class_names: Sequence[str],
    items: Sequence[Item],
    fractions: Sequence[float] | None,
    split_seed: str,
    creator: str,
    description: str = "",
    query: Mapping[str, Any] | None = None,
) -> Dataset:
    """Checks, looks up every series in ingest, splits, and stores the next version."""
    chosen = check_request(dataset_id, task, class_names, items, fractions)
    assert task is not None
    if task is Task.SEGMENTATION and not class_names:
        class_names = DEFAULT_SEGMENT_NAMES
    seed = split_seed or DEFAULT_SEED
    placed: list[Item] = []
    for item in items:
        found = await probe(item.series)
        pseudonym = found.pseudonym
        if task is Task.SEGMENTATION:
            check_pair(item, found, await probe(SeriesName(item.label_series)))
        placed.append(
            Item(
                series=item.series,
                label=item.label if task is Task.CLASSIFICATION else "",
                label_series=item.label_series if task is Task.SEGMENTATION else "",
                patient_pseudonym=pseudonym,
                split=split_of(pseudonym, seed, chosen),
            )
        )
    async with pool.acquire() as conn, conn.transaction():
        # One creator of a dataset's next version at a time.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", dataset_id)
        version = await conn.fetchval(
            "SELECT coalesce(max(version), 0) + 1 FROM datasets WHERE dataset_id = $1", dataset_id
        )
        await conn.execute(
            """INSERT INTO datasets (dataset_id, version, task, class_names, fractions,
                                     split_seed, description, creator, query)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            dataset_id,
            version,
            task.value,
            list(class_names),
            list(chosen),
            seed,
            description,
            creator,
            json.dumps(dict(query or {})),
        )
        await conn.executemany(
            """INSERT INTO dataset_items (dataset_id, version, position, series, label,
                                          label_series, patient_pseudonym, split)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            [
                (
                    dataset_id,
                    version,
                    position,
                    item.series,
                    item.label,
                    item.label_series,
                    item.patient_pseudonym,
                    str(item.split),
                )
                for position, item in enumerate(placed)
            ],
        )
    return await get(pool, f"datasets/{dataset_id}/versions/{version}")


def check_pair(item: Item, image: Found, labels: Found) -> None:
    """Refuses a label series of another patient, or one that does not segment the image
    series: label slices that name instances outside it, or another number of rows and
    columns. (Unknown shapes and slices are not compared.)"""
    if labels.pseudonym != image.pseudonym:
        raise InvalidArgument(
            "LABEL_SERIES_OTHER_PATIENT",
            f"{item.label_series} is not of the same patient as {item.series}",
        )
    if image.slices and labels.slices and not set(labels.slices) <= set(image.slices):
        raise InvalidArgument(
            "LABEL_SERIES_MISMATCH",
            f"{item.label_series} does not segment {item.series}: its label slices belong to "
            "other instances",
        )
    if image.shape[1:3] and labels.shape[1:3] and image.shape[1:3] != labels.shape[1:3]:
        raise InvalidArgument(
            "LABEL_SERIES_MISMATCH",
            f"{item.label_series} is {labels.shape[1]}x{labels.shape[2]} where {item.series} "
            f"is {image.shape[1]}x{image.shape[2]} (rows x columns)",
        )


async def get(pool: asyncpg.Pool, name: str, *, with_items: bool = True) -> Dataset:
    dataset_id, version = parse_name(name)
    row = await pool.fetchrow(
        "SELECT * FROM datasets WHERE dataset_id = $1 AND version = $2", dataset_id, version
    )
    if row is None:
        raise NotFound("DATASET_NOT_FOUND", f"{name} does not exist")
    items = await pool.fetch(
        "SELECT * FROM dataset_items WHERE dataset_id = $1 AND version = $2 ORDER BY position",
        dataset_id,
        version,
    )
    return _dataset(row, items, with_items=with_items)


async def list_page(
    pool: asyncpg.Pool, *, after: tuple[datetime, str, int] | None, limit: int
) -> tuple[list[Dataset], bool]:
    rows = await pool.fetch(
        """SELECT d.*, (SELECT array_agg(split) FROM dataset_items i
                        WHERE i.dataset_id = d.dataset_id AND i.version = d.version) AS splits
           FROM datasets d
           WHERE $1::timestamptz IS NULL
              OR (d.create_time, d.dataset_id, d.version) < ($1, $2, $3)
           ORDER BY d.create_time DESC, d.dataset_id DESC, d.version DESC
           LIMIT $4""",
        after[0] if after else None,
        after[1] if after else "",
        after[2] if after else 0,
        limit + 1,
    )
    found = [_dataset(row, [], with_items=False, splits=row["splits"] or []) for row in rows]
    return found[:limit], len(found) > limit


def _dataset(
    row: asyncpg.Record,
    items: Sequence[asyncpg.Record],
    *,
    with_items: bool,
    splits: Sequence[str] | None = None,
) -> Dataset:
    placed = tuple(
        Item(
            series=SeriesName(i["series"]),
            label=i["label"],
            label_series=i["label_series"],
            patient_pseudonym=Pseudonym(i["patient_pseudonym"]),
            split=Split(i["split"]),
        )
        for i in items
    )
    names = list(splits) if splits is not None else [str(i.split) for i in placed]
    fractions = tuple(row["fractions"])
    return Dataset(
        dataset_id=row["dataset_id"],
        version=row["version"],
        task=Task(row["task"]),
        class_names=tuple(row["class_names"]),
        items=placed if with_items else (),
        fractions=(fractions[0], fractions[1], fractions[2]),
        split_seed=row["split_seed"],
        creator=row["creator"],
        create_time=row["create_time"],
        description=row["description"],
        counts=(names.count("train"), names.count("validation"), names.count("test")),
        query=MappingProxyType(json.loads(row["query"])),
    )
