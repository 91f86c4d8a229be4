"""Real pixels for the training tests: volumes of pydicom's CT and MR test files, put in
the worker's cache as ingest would have served them (float32, (slices, rows, columns))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file

from medimg_training import datasets
from medimg_training.datasets import Item, Pseudonym, SeriesName
from medimg_training.worker import cache_path

CLASSES = ("CT", "MR")


def _pixels(name: str) -> np.ndarray:
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"pydicom's wheel lacks {name}"
    return np.asarray(dcmread(path).pixel_array, dtype=np.float32)


def series_table(count: int, cache: Path) -> tuple[list[Item], dict[str, str]]:
    """`count` labelled series (CT and MR alternating, each its own patient), their volumes
    cached, and their pseudonyms."""
    images = {"CT": _pixels("CT_small.dcm"), "MR": _pixels("MR_small.dcm")}
    rng = np.random.default_rng(0)
    items: list[Item] = []
    pseudonyms: dict[str, str] = {}
    for index in range(count):
        label = CLASSES[index % 2]
        series = SeriesName(f"studies/1.2.{index}/series/1.2.{index}.1")
        volume = images[label] * rng.uniform(0.9, 1.1) + rng.normal(0, 5, images[label].shape)
        path = cache_path(cache, series)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, volume[None].astype(np.float32))
        items.append(Item(series, label))
        pseudonyms[series] = f"patient-{index:03d}"
    return items, pseudonyms


def probe_of(pseudonyms: dict[str, str]) -> datasets.Probe:
    """Pseudonyms from a table (the cross-service test asks ingest itself)."""

    async def probe(series: SeriesName) -> Pseudonym:
        return Pseudonym(pseudonyms[series])

    return probe
