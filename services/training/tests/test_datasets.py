"""Datasets: splits by patient, refusals, immutable versions in PostgreSQL."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import asyncpg
import pytest

from medimg_core.errors import InvalidArgument, NotFound
from medimg_training import datasets
from medimg_training.datasets import Item, SeriesName, Split, Task, split_of
from services.training.tests.support import CLASSES, probe_of, series_table


def test_a_split_is_decided_per_patient_and_deterministic() -> None:
    fractions = (0.6, 0.2, 0.2)
    patients = [f"p{i}" for i in range(2000)]
    first = {p: split_of(p, "seed", fractions) for p in patients}
    assert first == {p: split_of(p, "seed", fractions) for p in patients}
    shares = {s: sum(1 for v in first.values() if v is s) / len(patients) for s in Split}
    assert shares[Split.TRAIN] == pytest.approx(0.6, abs=0.05)
    assert shares[Split.VALIDATION] == pytest.approx(0.2, abs=0.05)
    # Another seed deals the patients again.
    assert first != {p: split_of(p, "other", fractions) for p in patients}


async def test_no_pseudonym_is_in_two_splits(pool: asyncpg.Pool, tmp_path: Path) -> None:
    items, pseudonyms = series_table(40, tmp_path)
    # Several series per patient: 40 series of 10 patients.
    pseudonyms = {series: f"patient-{i % 10}" for i, series in enumerate(pseudonyms)}
    created = await datasets.create(
        pool,
        probe_of(pseudonyms),
        dataset_id="many",
        task=Task.CLASSIFICATION,
        class_names=CLASSES,
        items=items,
        fractions=(0.5, 0.25, 0.25),
        split_seed="",
        creator="max",
    )
    splits: dict[str, set[Split]] = defaultdict(set)
    for item in created.items:
        assert item.split is not None
        splits[item.patient_pseudonym].add(item.split)
    assert len(splits) == 10
    assert all(len(found) == 1 for found in splits.values())
    assert sum(created.counts) == 40
    assert created.split_seed == datasets.DEFAULT_SEED


async def test_versions_are_numbered_and_immutable(pool: asyncpg.Pool, tmp_path: Path) -> None:
    items, pseudonyms = series_table(4, tmp_path)
    arguments = {
        "dataset_id": "small",
        "task": Task.CLASSIFICATION,
        "class_names": CLASSES,
        "fractions": None,
        "split_seed": "s",
        "creator": "max",
    }
    first = await datasets.create(pool, probe_of(pseudonyms), items=items, **arguments)  # type: ignore[arg-type]
    second = await datasets.create(pool, probe_of(pseudonyms), items=items[:2], **arguments)  # type: ignore[arg-type]
    assert (first.name, second.name) == (
        "datasets/small/versions/1",
        "datasets/small/versions/2",
    )
    assert len((await datasets.get(pool, first.name)).items) == 4
    with pytest.raises(asyncpg.RaiseError, match="immutable"):
        await pool.execute("UPDATE dataset_items SET label = 'MR'")
    with pytest.raises(asyncpg.RaiseError, match="immutable"):
        await pool.execute("DELETE FROM datasets")
    with pytest.raises(NotFound) as caught:
        await datasets.get(pool, "datasets/small/versions/3")
    assert caught.value.reason == "DATASET_NOT_FOUND"


GOOD = [Item(SeriesName("studies/1/series/2"), "CT")]


@pytest.mark.parametrize(
    ("dataset_id", "task", "classes", "items", "fractions", "reason"),
    [
        ("ok", Task.CLASSIFICATION, CLASSES, [], None, "EMPTY_DATASET"),
        ("Bad_Id", Task.CLASSIFICATION, CLASSES, GOOD, None, "INVALID_DATASET_ID"),
        ("ok", None, CLASSES, GOOD, None, "TASK_REQUIRED"),
        ("ok", Task.CLASSIFICATION, ("CT",), GOOD, None, "TOO_FEW_CLASSES"),
        ("ok", Task.CLASSIFICATION, ("US", "XA"), GOOD, None, "UNKNOWN_LABEL"),
        ("ok", Task.CLASSIFICATION, CLASSES, [Item(SeriesName("x"), "CT")], None, "INVALID_SERIES"),
        ("ok", Task.CLASSIFICATION, CLASSES, GOOD * 2, None, "DUPLICATE_SERIES"),
        ("ok", Task.CLASSIFICATION, CLASSES, GOOD, (0.5, 0.5, 0.5), "INVALID_SPLIT_FRACTIONS"),
        ("ok", Task.SEGMENTATION, (), GOOD, None, "LABEL_SERIES_REQUIRED"),
    ],
)
def test_a_bad_dataset_is_refused_with_a_reason(  # noqa: PLR0917 - parametrized
    dataset_id: str,
    task: Task | None,
    classes: tuple[str, ...],
    items: list[Item],
    fractions: tuple[float, float, float] | None,
    reason: str,
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        datasets.check_request(dataset_id, task, classes, items, fractions)
    assert caught.value.reason == reason
