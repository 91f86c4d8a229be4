"""The local object store: content-addressed, atomic, durable, and harmless to write twice."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from medimg_core.errors import DataLoss
from medimg_ingest.objects import LocalObjectStore, ObjectStore


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_key_is_the_content_hash() -> None:
    data = b"DICM and some bytes"
    digest = hashlib.sha256(data).hexdigest()
    assert ObjectStore.key_for(data) == (f"instances/{digest[:2]}/{digest}.dcm", digest)
    assert ObjectStore.key_for(data) == ObjectStore.key_for(bytes(data))
    assert ObjectStore.key_for(data)[0] != ObjectStore.key_for(data + b"!")[0]
    assert LocalObjectStore.key_for(data) == ObjectStore.key_for(data)


def test_put_then_get(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    data = bytes(range(256)) * 100
    key, _ = store.key_for(data)
    store.put(key, data)
    assert store.get(key) == data
    assert (tmp_path / "objects" / key).read_bytes() == data


def test_no_temporary_file_is_left(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    keys = []
    for i in range(5):
        data = f"object {i}".encode()
        key, _ = store.key_for(data)
        store.put(key, data)
        keys.append(key)
    assert files_under(tmp_path) == sorted(keys)


def test_put_twice_is_harmless(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    data = b"the same bytes"
    key, _ = store.key_for(data)
    store.put(key, data)
    os.utime(tmp_path / key, (0, 0))
    first = (tmp_path / key).stat()
    store.put(key, data)
    second = (tmp_path / key).stat()
    assert store.get(key) == data
    assert first.st_ino == second.st_ino  # not written again
    assert second.st_mtime > first.st_mtime  # but fresh, so no orphan sweep takes it now
    assert files_under(tmp_path) == [key]


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    with pytest.raises(TypeError):
        store.put("instances/ab/broken.dcm", "not bytes")  # type: ignore[arg-type]
    assert files_under(tmp_path) == []


def test_get_of_an_unknown_key_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        LocalObjectStore(tmp_path).get("instances/00/nothing.dcm")


def test_the_root_is_created(tmp_path: Path) -> None:
    LocalObjectStore(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_a_read_is_checked_against_the_stored_hash(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    key, digest = store.key_for(b"pixels")
    store.put(key, b"pixels")
    assert store.get_verified(key, digest) == b"pixels"
    (tmp_path / key).write_bytes(b"pixelz")  # a bit flipped on disk
    with pytest.raises(DataLoss) as caught:
        store.get_verified(key, digest)
    assert caught.value.reason == "OBJECT_CORRUPTED"
