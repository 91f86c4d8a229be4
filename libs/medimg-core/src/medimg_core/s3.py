"""S3 (or an S3-compatible store) as the services use it: a bucket and key prefix named by an
`s3://bucket[/prefix]` URL, one client per store, and S3's errors put in words.

Credentials always come from the standard AWS chain (environment, IRSA web identity, ...),
never from medimg's settings.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import AfterValidator

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

#: S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens, letter or digit at
#: both ends (the general-purpose bucket rules, less the rarer exceptions).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix ("" or ending in "/") that every key is put under."""

    bucket: str
    prefix: str = ""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def child(self, *names: str) -> S3Location:
        """The "directory" `names` under this one (a model's `<model>/<version>/`, say)."""
        return S3Location(self.bucket, self.prefix + "".join(f"{name}/" for name in names))

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """`s3://bucket` or `s3://bucket/some/prefix`; `ValueError` saying what is wrong."""
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise ValueError(f"{url!r} is not an s3://bucket[/prefix] URL")
        if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError(f"{url!r}: an S3 URL has only a bucket and a key prefix")
        if not _BUCKET.fullmatch(parts.netloc) or ".." in parts.netloc:
            raise ValueError(
                f"{parts.netloc!r} is not a valid S3 bucket name (3-63 lower-case letters, "
                "digits, dots and hyphens)"
            )
        prefix = parts.path.strip("/")
        if "//" in prefix:
            raise ValueError(f"{url!r}: the key prefix has an empty segment")
        return cls(parts.netloc, prefix + "/" if prefix else "")


def _parsable(url: str) -> str:
    S3Location.parse(url)  # a ValueError names what is wrong
    return url


#: A setting that holds an `s3://bucket[/prefix]` URL, refused at start with the reason.
S3Url = Annotated[str, AfterValidator(_parsable)]


def client(
    *, endpoint_url: str | None = None, region: str | None = None, connections: int = 10
) -> S3Client:
    """A client of its own (thread-safe; up to `connections` connections at once), which
    retries throttling and transient failures in S3's standard mode."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=max(connections, 10),
        ),
    )


def is_missing(error: ClientError) -> bool:
    """Whether S3 said there is no such key (GetObject says NoSuchKey; HeadObject, which has
    no body, only its status)."""
    return error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")


def reason(error: ClientError | BotoCoreError) -> str:
    """S3's error code (AccessDenied, NoSuchBucket, ...), or the kind of failure on the way
    (EndpointConnectionError, ReadTimeoutError, ...)."""
    if isinstance(error, ClientError):
        return error.response.get("Error", {}).get("Code", "unknown error")
    return type(error).__name__


def upload_tree(client: S3Client, bucket: str, prefix: str, directory: Path) -> None:
    """Puts every file under `directory` at `prefix` + its relative path (with `/`), each
    with its SHA-256, which S3 checks on arrival and keeps. Raises S3's errors as they are."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            client.put_object(
                Bucket=bucket,
                Key=prefix + path.relative_to(directory).as_posix(),
                Body=data,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode("ascii"),
            )


def delete_prefix(client: S3Client, bucket: str, prefix: str) -> None:
    """Deletes every object under `prefix` (their current versions, in a versioned bucket).
    Raises S3's errors as they are."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        keys: list[ObjectIdentifierTypeDef] = [
            {"Key": entry["Key"]} for entry in page.get("Contents", [])
        ]
        if keys:  # a page holds at most 1,000 keys, as many as one DeleteObjects takes
            answer = client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            if answer.get("Errors"):
                failed = answer["Errors"][0]
                raise ClientError(
                    {"Error": {"Code": failed.get("Code", "unknown error"), "Message": ""}},
                    "DeleteObjects",
                )
