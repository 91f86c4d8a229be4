"""S3 (or an S3-compatible store) as the services use it: a bucket and key prefix named by an
`s3://bucket[/prefix]` URL, one client per store, and S3's errors put in words.

Credentials always come from the standard AWS chain (environment, IRSA web identity, ...),
never from medimg's settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens, letter or digit at
#: both ends (the general-purpose bucket rules, less the rarer exceptions).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix ("" or ending in "/") that every key is put under."""

    bucket: str
    prefix: str = ""

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
