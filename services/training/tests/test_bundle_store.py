"""The registry's bundles on S3, against a real S3 API on a socket (moto's server) and the
real training database: a registered version uploaded where inference's model repository
on S3 reads it, with each file's SHA-256; leftovers of a registration that did not commit
replaced; S3 failures named."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import asyncpg
import pytest

from medimg_cli.testing import free_port, new_bucket
from medimg_cli.testing import s3_client as make_client
from medimg_core.bundles import bundle_digest
from medimg_core.errors import Unavailable
from medimg_core.s3 import S3Location
from medimg_training import jobs, registry
from medimg_training.bundle_store import LocalBundles, S3Bundles, open_bundle_store
from medimg_training.settings import TrainingSettings

pytestmark = pytest.mark.usefixtures("aws_credentials")

PREFIX = "models/"


def a_bundle(directory: Path, weights: bytes = b"weights") -> Path:
    (directory / "configs").mkdir(parents=True)
    (directory / "configs" / "metadata.json").write_text('{"version": "0.1.0"}')
    (directory / "models").mkdir()
    (directory / "models" / "model.ts").write_bytes(weights)
    return directory


def keys(s3_endpoint: str, bucket: str) -> list[str]:
    listed = make_client(s3_endpoint).list_objects_v2(Bucket=bucket)
    return sorted(entry["Key"] for entry in listed.get("Contents", []))


async def test_a_registered_version_is_uploaded_where_inference_reads_it(
    pool: asyncpg.Pool, s3_endpoint: str, tmp_path: Path
) -> None:
    bucket = new_bucket(make_client(s3_endpoint), versioned=True)
    store = S3Bundles(S3Location(bucket, PREFIX), make_client(s3_endpoint))
    job = await jobs.create(pool, {"model": "chest-s3", "dataset": "ct-or-mr"}, "max")
    bundle = a_bundle(tmp_path / "bundle")
    digest = bundle_digest(bundle)

    name = await registry.register(
        pool, job, bundle, store, metrics={"accuracy": 1.0}, code_version="test", sha256=digest
    )
    again = await registry.register(
        pool, job, bundle, store, metrics={"accuracy": 1.0}, code_version="test", sha256=digest
    )

    assert name == again == "registeredModels/chest-s3/versions/1"  # once per job
    version = await registry.get_version(pool, name)
    assert version.bundle_uri == f"s3://{bucket}/models/chest-s3/1/"
    assert version.sha256 == digest
    assert keys(s3_endpoint, bucket) == [
        "models/chest-s3/1/configs/metadata.json",
        "models/chest-s3/1/models/model.ts",
    ]
    head = make_client(s3_endpoint).head_object(
        Bucket=bucket, Key="models/chest-s3/1/models/model.ts", ChecksumMode="ENABLED"
    )
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(b"weights").digest()).decode()
    assert (bundle / "models" / "model.ts").is_file()  # the job keeps its copy


def test_leftovers_of_a_registration_that_did_not_commit_are_replaced(
    s3_endpoint: str, tmp_path: Path
) -> None:
    client = make_client(s3_endpoint)
    bucket = new_bucket(client, versioned=False)
    store = S3Bundles(S3Location(bucket, PREFIX), client)
    first = store.place(a_bundle(tmp_path / "first", b"old"), "chest", 1)
    client.put_object(Bucket=bucket, Key="models/chest/1/models/extra.bin", Body=b"old")

    second = store.place(a_bundle(tmp_path / "second", b"new"), "chest", 1)

    assert first == second == f"s3://{bucket}/models/chest/1/"
    assert keys(s3_endpoint, bucket) == [
        "models/chest/1/configs/metadata.json",
        "models/chest/1/models/model.ts",
    ]
    store.remove(second, tmp_path / "second")
    assert keys(s3_endpoint, bucket) == []


def test_s3_failures_are_unavailable_with_their_reason(s3_endpoint: str, tmp_path: Path) -> None:
    bundle = a_bundle(tmp_path / "bundle")
    no_bucket = S3Bundles(S3Location("medimg-no-such-bucket", PREFIX), make_client(s3_endpoint))
    with pytest.raises(Unavailable) as missing:
        no_bucket.place(bundle, "chest", 1)
    assert missing.value.reason == "MODEL_STORE_UNAVAILABLE"
    assert "NoSuchBucket" in missing.value.message

    closed = make_client(
        f"http://127.0.0.1:{free_port()}", retries={"max_attempts": 1}, connect_timeout=1
    )
    with pytest.raises(Unavailable) as unreachable:
        S3Bundles(S3Location("medimg-bucket", PREFIX), closed).place(bundle, "chest", 1)
    assert "EndpointConnectionError" in unreachable.value.message


def test_the_settings_choose_the_store(settings: TrainingSettings, s3_endpoint: str) -> None:
    local = open_bundle_store(settings)
    assert isinstance(local, LocalBundles)
    assert local.root == settings.object_dir / "models"

    on_s3 = settings.model_copy(
        update={"model_store_url": "s3://medimg-models/site-a", "s3_endpoint_url": s3_endpoint}
    )
    store = open_bundle_store(on_s3)
    assert isinstance(store, S3Bundles)
    assert store.location == S3Location("medimg-models", "site-a/")
    with pytest.raises(ValueError, match="not a valid S3 bucket name"):
        TrainingSettings.model_validate({
            **settings.model_dump(), "model_store_url": "s3://Not_A_Bucket"
        })  # fmt: skip
