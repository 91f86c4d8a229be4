"""Where the registry keeps the bundles of model versions: `<model>/<version>/` under a local
directory (`<object_dir>/models`), or under an S3 prefix (`model_store_url`), the layout of
the inference service's model repository, so that inference can serve the registry's
bucket as its repository on S3.

A bundle is placed inside the registration's transaction and removed again if that does
not commit; a version left behind by a registration that never committed is replaced by
the next one to take its number.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from medimg_core import s3
from medimg_core.errors import Unavailable
from medimg_core.s3 import S3Location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from medimg_training.settings import TrainingSettings


class BundleStore(Protocol):
    def place(self, bundle: Path, model: str, version: int) -> str:
        """Stores the bundle directory as `version` of `model`; returns its location (a
        path, or an s3:// URI). Blocking."""
        ...

    def remove(self, location: str, bundle: Path) -> None:
        """Undoes `place`, leaving the bundle where it was. Blocking."""
        ...


class LocalBundles(BundleStore):
    """A directory on the training volume; bundles are moved into it (one file system)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def place(self, bundle: Path, model: str, version: int) -> str:
        target = self.root / model / str(version)
        if target.exists():  # left by a registration whose transaction did not commit
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        bundle.rename(target)
        return str(target)

    def remove(self, location: str, bundle: Path) -> None:
        Path(location).rename(bundle)


class S3Bundles(BundleStore):
    """An S3 prefix; bundles are uploaded, each file with its SHA-256, and the job's copy
    stays with the job's files."""

    def __init__(self, location: S3Location, client: S3Client) -> None:
        self.location = location
        self._client = client

    def place(self, bundle: Path, model: str, version: int) -> str:
        where = self.location.child(model, str(version))
        try:
            # Files left by a registration that did not commit must not mix with these.
            s3.delete_prefix(self._client, where.bucket, where.prefix)
            s3.upload_tree(self._client, where.bucket, where.prefix, bundle)
        except (ClientError, BotoCoreError) as error:
            raise self._unavailable("store", error) from error
        return where.url

    def remove(self, location: str, bundle: Path) -> None:
        prefix = S3Location.parse(location).prefix
        try:
            s3.delete_prefix(self._client, self.location.bucket, prefix)
        except (ClientError, BotoCoreError) as error:
            raise self._unavailable("remove", error) from error

    def _unavailable(self, action: str, error: ClientError | BotoCoreError) -> Unavailable:
        return Unavailable(
            "MODEL_STORE_UNAVAILABLE",
            f"S3 could not {action} the bundle in {self.location.url}: {s3.reason(error)}",
        )


def open_bundle_store(settings: TrainingSettings) -> BundleStore:
    """S3 when `model_store_url` is set, else `<object_dir>/models`."""
    if settings.model_store_url:
        client = s3.client(endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        return S3Bundles(S3Location.parse(settings.model_store_url), client)
    return LocalBundles(settings.object_dir / "models")
