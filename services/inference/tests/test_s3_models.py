"""The model repository on S3, against a real S3 API on a socket (moto's server): models
listed there beside the local ones, versions fetched whole and served, fetched once and
again only when S3 holds other files, a version rewritten mid-fetch, hostile keys, and an
S3 that cannot be reached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from medimg_cli.testing import free_port, new_bucket
from medimg_cli.testing import s3_client as make_client
from medimg_core.errors import FailedPrecondition, MedimgError, NotFound, Unavailable
from medimg_core.s3 import S3Location
from medimg_core.settings import load_settings
from medimg_inference.app import repository
from medimg_inference.backends import BackendOptions
from medimg_inference.repository import ModelName, ModelRepository, ModelVersion
from medimg_inference.s3_models import S3_CACHE, S3Models
from medimg_inference.serving import ModelServer
from medimg_inference.settings import InferenceSettings
from services.inference.tests.support import (
    TORCHSCRIPT_DEPRECATED,
    TrainedClassifier,
    classifier_metadata,
    write_bundle,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = [
    pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED),
    pytest.mark.usefixtures("aws_credentials"),
]

PREFIX = "models/"


@dataclass
class Site:
    """A bucket with a model repository under PREFIX, and a replica's local repository."""

    raw: S3Client  # the test's own client, to write to the bucket
    bucket: str
    root: Path  # the local repository
    remote: S3Models
    calls: list[str]  # the S3 operations `remote` called

    def upload(self, name: str, version: int, model_files: dict[str, Path | bytes]) -> None:
        """Writes a classifier bundle locally (support.write_bundle), then each file to S3."""
        bundle = write_bundle(
            self.root.parent / "upload", name, version, classifier_metadata(), model_files
        )
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                self.put(
                    f"{name}/{version}/{path.relative_to(bundle).as_posix()}", path.read_bytes()
                )

    def put(self, key: str, body: bytes) -> None:
        self.raw.put_object(Bucket=self.bucket, Key=PREFIX + key, Body=body)

    def repository(self) -> ModelRepository:
        return ModelRepository(self.root, self.remote)

    def copies(self, name: str, version: int) -> list[str]:
        """The local copies of a version fetched from S3 (staging directories included)."""
        home = self.root / S3_CACHE / name / str(version)
        return sorted(entry.name for entry in home.iterdir()) if home.exists() else []


@pytest.fixture
def site(s3_endpoint: str, tmp_path: Path) -> Site:
    raw = make_client(s3_endpoint)
    bucket = new_bucket(raw, versioned=False)
    calls: list[str] = []
    client = make_client(s3_endpoint)
    client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    root = tmp_path / "repository"
    return Site(
        raw, bucket, root, S3Models(S3Location(bucket, PREFIX), client, root / S3_CACHE), calls
    )


def test_models_on_s3_are_listed_beside_the_local_ones(site: Site) -> None:
    for version in (1, 3):
        site.upload("chest", version, {"model.ts": b"x"})
    site.upload("brain", 1, {"model.ts": b"x"})
    site.put("brain/latest/readme.txt", b"not a version")
    site.put(".hidden/1/x", b"not a model")
    write_bundle(site.root, "chest", 2, classifier_metadata(), {"model.ts": b"x"})
    write_bundle(site.root, "local-only", 1, classifier_metadata(), {"model.ts": b"x"})
    repo = site.repository()

    assert repo.model_names() == ["brain", "chest", "local-only"]
    assert repo.versions("chest") == [1, 2, 3]
    assert repo.versions("brain") == [1]
    assert repo.latest_version("chest") == 3
    with pytest.raises(NotFound) as missing:
        repo.versions("lung")
    assert missing.value.reason == "MODEL_NOT_FOUND"
    assert "GetObject" not in site.calls  # listing fetches nothing


async def test_a_version_on_s3_is_fetched_and_served(
    site: Site, classifier: TrainedClassifier
) -> None:
    site.upload("patches", 1, {"model.ts": classifier.torchscript})
    site.upload("patches", 2, {"model.onnx": classifier.onnx})
    server = ModelServer(site.repository(), BackendOptions(intra_op_threads=1))
    patches = classifier.patches[:5]
    try:
        for version, source in ((1, classifier.torchscript), (2, classifier.onnx)):
            config = await server.load("patches", version)
            outputs = await server.infer("patches", version, {"patch": patches})
            np.testing.assert_allclose(
                outputs["probabilities"], classifier.expected(patches), atol=1e-5
            )
            assert config.path.parent == site.root / S3_CACHE / "patches" / str(version)
            assert config.execution.model_file.read_bytes() == source.read_bytes()
    finally:
        await server.close()


def test_a_version_is_fetched_once_and_again_when_s3_holds_other_files(site: Site) -> None:
    site.upload("chest", 1, {"model.ts": b"weights-a"})
    repo = site.repository()
    first = repo.config("chest", 1)
    assert site.calls.count("GetObject") == 2  # metadata.json and model.ts
    site.calls.clear()

    again = repo.config("chest", 1)
    assert again.path == first.path
    assert "GetObject" not in site.calls  # one listing says the copy is current

    site.put("chest/1/models/model.ts", b"weights-b")
    replaced = repo.config("chest", 1)
    assert replaced.path != first.path
    assert replaced.execution.model_file.read_bytes() == b"weights-b"
    assert site.copies("chest", 1) == [replaced.path.name]  # the older copy is gone


def test_copies_of_the_two_versions_read_last_are_kept(site: Site) -> None:
    for version in (1, 2, 3):
        site.upload("chest", version, {"model.ts": f"weights {version}".encode()})
    repo = site.repository()
    for version in (1, 2, 3):
        repo.config("chest", version)
    assert sorted(path.name for path in (site.root / S3_CACHE / "chest").iterdir()) == ["2", "3"]

    site.calls.clear()
    again = repo.config("chest", 1)  # a rollback: fetched again
    assert site.calls.count("GetObject") == 2
    assert again.execution.model_file.read_bytes() == b"weights 1"
    assert sorted(path.name for path in (site.root / S3_CACHE / "chest").iterdir()) == ["1", "3"]


def test_a_local_version_is_read_from_disk_not_s3(site: Site) -> None:
    site.upload("chest", 1, {"model.ts": b"on s3"})
    local = write_bundle(site.root, "chest", 1, classifier_metadata(), {"model.ts": b"promoted"})
    assert site.repository().config("chest", 1).path == local
    assert "GetObject" not in site.calls


def test_a_version_rewritten_while_it_is_fetched_fails_and_leaves_no_copy(
    site: Site, s3_endpoint: str
) -> None:
    site.upload("chest", 1, {"model.ts": b"old weights"})
    uploader = make_client(s3_endpoint)
    rewritten: list[str] = []

    def rewrite_once(params: dict[str, Any], **_: Any) -> None:
        # After the listing, before model.ts is read: an upload replaces it.
        if params["Key"].endswith("model.ts") and not rewritten:
            rewritten.append(params["Key"])
            uploader.put_object(Bucket=site.bucket, Key=params["Key"], Body=b"new weights")

    site.remote._client.meta.events.register("before-parameter-build.s3.GetObject", rewrite_once)
    repo = site.repository()
    with pytest.raises(Unavailable) as changing:
        repo.config("chest", 1)
    assert changing.value.reason == "MODEL_VERSION_CHANGING"
    assert "load it again" in changing.value.message
    assert site.copies("chest", 1) == []  # nothing half-fetched is left

    config = repo.config("chest", 1)  # the upload is complete: fetched whole
    assert config.execution.model_file.read_bytes() == b"new weights"


def test_a_staging_directory_left_by_a_crash_is_removed(site: Site) -> None:
    site.upload("chest", 1, {"model.ts": b"x"})
    crashed = site.root / S3_CACHE / "chest" / "1" / ".fetching-crashed"
    (crashed / "models").mkdir(parents=True)
    (crashed / "models" / "model.ts").write_bytes(b"half")
    config = site.repository().config("chest", 1)
    assert site.copies("chest", 1) == [config.path.name]


@pytest.mark.parametrize(
    "key",
    ["chest/1/../../escape/configs/metadata.json", "chest/1/models//model.ts", "chest/1/./x"],
)
def test_a_key_that_is_not_a_plain_path_fails_the_fetch(site: Site, key: str) -> None:
    site.upload("chest", 1, {"model.ts": b"x"})
    site.put(key, b"hostile")
    with pytest.raises(FailedPrecondition) as refused:
        site.repository().config("chest", 1)
    assert refused.value.reason == "INVALID_BUNDLE_KEY"
    assert not (site.root / S3_CACHE / "escape").exists()
    assert site.copies("chest", 1) == []


def test_a_copy_the_local_disk_cannot_hold_fails_the_fetch_and_leaves_nothing(
    site: Site,
) -> None:
    site.upload("chest", 1, {"model.ts": b"x"})
    site.put("chest/1/models/" + "w" * 300, b"a name longer than the file system takes")
    with pytest.raises(Unavailable) as failed:
        site.repository().config("chest", 1)
    assert failed.value.reason == "MODEL_FETCH_FAILED"
    assert "File name too long" in failed.value.message
    assert site.copies("chest", 1) == []


def test_folder_markers_are_not_files(site: Site) -> None:
    site.upload("chest", 1, {"model.ts": b"x"})
    site.put("chest/1/models/", b"")
    config = site.repository().config("chest", 1)
    assert sorted(p.name for p in (config.path / "models").iterdir()) == ["model.ts"]


def failure(call: Any) -> MedimgError:
    with pytest.raises(MedimgError) as caught:
        call()
    return caught.value


def test_an_s3_that_cannot_be_reached_is_unavailable_with_its_reason(
    s3_endpoint: str, tmp_path: Path
) -> None:
    root = tmp_path / "repository"
    no_bucket = S3Models(S3Location("medimg-no-such-bucket"), make_client(s3_endpoint), root)
    error = failure(ModelRepository(root, no_bucket).model_names)
    assert (type(error), error.reason) == (Unavailable, "MODEL_REPOSITORY_UNAVAILABLE")
    assert "NoSuchBucket" in error.message and "s3://medimg-no-such-bucket/" in error.message

    closed = make_client(
        f"http://127.0.0.1:{free_port()}", retries={"max_attempts": 1}, connect_timeout=1
    )
    unreachable = S3Models(S3Location("medimg-bucket"), closed, root)
    error = failure(lambda: unreachable.fetch(ModelName("chest"), ModelVersion(1)))
    assert error.reason == "MODEL_REPOSITORY_UNAVAILABLE"
    assert "EndpointConnectionError" in error.message


def test_the_settings_name_the_s3_repository(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3_endpoint: str, site: Site
) -> None:
    bucket = site.bucket
    required = {
        "MEDIMG_INFERENCE_MODEL_REPOSITORY": str(tmp_path / "repository"),
        "MEDIMG_INFERENCE_INGEST_TARGET": "127.0.0.1:1",
        "MEDIMG_INFERENCE_AUDIT_TARGET": "127.0.0.1:2",
    }
    for name, value in required.items():
        monkeypatch.setenv(name, value)
    assert repository(load_settings(InferenceSettings)).remote is None

    monkeypatch.setenv("MEDIMG_INFERENCE_MODEL_REPOSITORY_URL", f"s3://{bucket}/{PREFIX}")
    monkeypatch.setenv("MEDIMG_INFERENCE_S3_ENDPOINT_URL", s3_endpoint)
    repo = repository(load_settings(InferenceSettings))
    assert isinstance(repo.remote, S3Models)
    assert (repo.remote.location, repo.remote.cache) == (
        S3Location(bucket, PREFIX),
        tmp_path / "repository" / S3_CACHE,
    )

    monkeypatch.setenv("MEDIMG_INFERENCE_MODEL_REPOSITORY_URL", "s3://Bad_Bucket/models")
    with pytest.raises(SystemExit) as refused:
        load_settings(InferenceSettings)
    assert "not a valid S3 bucket name" in str(refused.value)
