"""The promotion hook: a model version promoted in the training registry is copied into this
replica's repository, loaded and served.

Training publishes each promotion on the Redis stream `medimg:training:model-promoted`, with
the string fields `model` (the repository's directory name), `version` (a positive integer),
`alias` (e.g. "production"), `bundle` (the bundle directory's URI: `file:///abs/path`, or
`s3://bucket/prefix/<model>/<version>/` where training keeps its bundles on S3) and `sha256`
(medimg_core.bundles.bundle_digest of the bundle). A replica acts on the promotions to the
alias it serves. A bundle on its file system is copied into a temporary directory beside
its target `<repository>/<model>/<version>`, its digest checked, and renamed into place. A
bundle on S3 must lie in the replica's model repository on S3 (the training bucket, as
MEDIMG_INFERENCE_MODEL_REPOSITORY_URL): it is fetched like any version there and its digest
checked. Then the version is loaded (ModelServer switches versions without failing a
request; a failed load leaves the old version serving).

The stream only says that something changed: anyone who can write to Redis can write to
it. So before a replica installs anything it asks the training registry, through the mesh
(mTLS, the sidecar's RBAC), for that model version, and acts only if the registry holds it,
the alias points at it now, and its bundle and digest are the promotion's. A forged or
stale entry is refused; a registry that cannot be reached is waited out.

Every replica acts on every promotion, so each reads the stream on its own with XREAD from
where it left off (no consumer group: nothing is consumed for the others). At start it
applies the latest promotion of each model that is not loaded yet. A bad entry is logged
(model, version, entry id and reason: no PHI) and skipped; Redis being away is waited out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import unquote, urlsplit

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from medimg.training.v1 import training_service_pb2 as training_pb
from medimg.training.v1 import training_service_pb2_grpc as training_grpc
from medimg_core.bundles import bundle_digest, manifest
from medimg_core.errors import FailedPrecondition, InvalidArgument, MedimgError
from medimg_core.s3 import S3Location
from medimg_inference.repository import (
    ModelName,
    ModelRepository,
    ModelVersion,
    check_model_name,
)
from medimg_inference.s3_models import S3Models
from medimg_inference.serving import ModelServer

log = logging.getLogger(__name__)

PROMOTION_STREAM = "medimg:training:model-promoted"
FIELDS = ("model", "version", "alias", "bundle", "sha256")
_HEX = frozenset("0123456789abcdef")
# Entries read per XREVRANGE page at start, and per XREAD.
_PAGE = 500


#: Where a promoted bundle is: a directory on this file system, or a prefix on S3.
BundleLocation = Path | S3Location


@dataclass(frozen=True)
class Promotion:
    """One promotion event, checked."""

    model: ModelName
    version: ModelVersion
    alias: str
    bundle: BundleLocation
    sha256: str


def parse_promotion(fields: Mapping[str, str]) -> Promotion:
    """The promotion in a stream entry's fields; INVALID_ARGUMENT with a reason otherwise."""
    for name in FIELDS:
        if not fields.get(name):
            raise InvalidArgument(
                "PROMOTION_FIELD_MISSING", f"the promotion has no {name!r}", field=name
            )
    model = check_model_name(fields["model"])
    version = fields["version"]
    if not (version.isascii() and version.isdigit() and version[0] != "0"):
        raise InvalidArgument(
            "INVALID_PROMOTION_VERSION", "the promotion's version is not a positive integer"
        )
    sha256 = fields["sha256"]
    if len(sha256) != 64 or not set(sha256) <= _HEX:
        raise InvalidArgument(
            "INVALID_PROMOTION_DIGEST", "the promotion's sha256 is not 64 lowercase hex digits"
        )
    return Promotion(
        model,
        ModelVersion(int(version)),
        fields["alias"],
        _bundle_location(fields["bundle"]),
        sha256,
    )


@dataclass(frozen=True)
class Registered:
    """What the training registry holds for a model version."""

    bundle: BundleLocation
    sha256: str
    aliases: frozenset[str]


class RegistryUnavailable(Exception):
    """The registry could not answer now (unreachable, timed out): ask again later."""


class Registry(Protocol):
    """Where promotions are confirmed: the training registry."""

    async def registered(self, model: ModelName, version: ModelVersion) -> Registered | None:
        """The registry's record of the version; None if it holds no such version."""
        ...


class TrainingRegistry:
    """The training service's registry, read through the mesh."""

    def __init__(self, stub: training_grpc.TrainingServiceAsyncStub, timeout: float = 10.0) -> None:
        self._stub = stub
        self._timeout = timeout

    async def registered(self, model: ModelName, version: ModelVersion) -> Registered | None:
        name = f"registeredModels/{model}/versions/{version}"
        try:
            found = await self._stub.GetModelVersion(
                training_pb.GetModelVersionRequest(name=name), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise RegistryUnavailable(error.code().name) from error
            raise FailedPrecondition(
                "REGISTRY_REFUSED", f"the registry refused to confirm: {error.code().name}"
            ) from error
        bundle = _bundle_location(found.bundle_uri)
        return Registered(bundle, found.sha256, frozenset(found.aliases))


async def confirm(promotion: Promotion, registry: Registry) -> None:
    """Checks the promotion against the registry: FAILED_PRECONDITION with a reason unless
    the registry holds the version, the alias points at it, and the bundle is the same."""
    where: dict[str, str | int] = {"model": promotion.model, "version": promotion.version}
    registered = await registry.registered(promotion.model, promotion.version)
    if registered is None:
        raise FailedPrecondition(
            "PROMOTION_NOT_REGISTERED", "the registry holds no such model version", **where
        )
    if promotion.alias not in registered.aliases:
        raise FailedPrecondition(
            "PROMOTION_NOT_CURRENT",
            f"the registry's alias {promotion.alias!r} does not point at this version",
            **where,
        )
    if (registered.bundle, registered.sha256) != (promotion.bundle, promotion.sha256):
        raise FailedPrecondition(
            "PROMOTION_MISMATCH", "the promotion's bundle or digest is not the registry's", **where
        )


def _bundle_location(uri: str) -> BundleLocation:
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        try:
            return S3Location.parse(uri)
        except ValueError as error:
            raise InvalidArgument("UNSUPPORTED_BUNDLE_URI", str(error)) from error
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or parts.query:
        raise InvalidArgument(
            "UNSUPPORTED_BUNDLE_URI",
            "the bundle URI is neither a file:///absolute/path nor an s3://bucket/prefix URI",
        )
    path = Path(unquote(parts.path))
    if not path.is_absolute() or ".." in path.parts:
        raise InvalidArgument("UNSUPPORTED_BUNDLE_URI", "the bundle path is not absolute")
    return path


def install_bundle(promotion: Promotion, repository: ModelRepository) -> Path:
    """Makes the promoted bundle a version of the repository, checked against the
    promotion's digest, and returns its local path. Blocking: call it from a thread. A
    version already in the local directory with the same digest is kept; one with another
    digest is refused (versions are immutable)."""
    target = repository.root / promotion.model / str(promotion.version)
    if target.exists():
        if bundle_digest(target) == promotion.sha256:
            return target
        raise FailedPrecondition(
            "VERSION_EXISTS",
            "the repository already holds this version with other content",
            model=promotion.model,
            version=promotion.version,
        )
    if isinstance(promotion.bundle, S3Location):
        return _fetch_from_s3(promotion, promotion.bundle, repository)
    return _copy_bundle(promotion, promotion.bundle, target)


def _fetch_from_s3(promotion: Promotion, bundle: S3Location, repository: ModelRepository) -> Path:
    """Fetches the version from the repository on S3 where the bundle lies, checked."""
    where: dict[str, str | int] = {"model": promotion.model, "version": promotion.version}
    remote = repository.remote
    if not (
        isinstance(remote, S3Models)
        and bundle == remote.location.child(promotion.model, str(promotion.version))
    ):
        raise FailedPrecondition(
            "BUNDLE_OUTSIDE_REPOSITORY",
            "the promoted bundle is on S3 but not at this model version in this replica's model "
            "repository on S3: point MEDIMG_INFERENCE_MODEL_REPOSITORY_URL at the training "
            "service's MEDIMG_TRAINING_MODEL_STORE_URL",
            **where,
        )
    fetched = remote.fetch(promotion.model, promotion.version)
    if bundle_digest(fetched) != promotion.sha256:
        raise FailedPrecondition(
            "BUNDLE_DIGEST_MISMATCH",
            "the promoted bundle's digest is not the one the promotion names",
            **where,
        )
    return fetched


def _copy_bundle(promotion: Promotion, bundle: Path, target: Path) -> Path:
    """Copies the promoted bundle to `target` atomically, refusing a copy whose digest is
    not the promotion's. Nothing is left behind on failure."""
    where: dict[str, str | int] = {"model": promotion.model, "version": promotion.version}
    if not bundle.is_dir():
        raise FailedPrecondition(
            "BUNDLE_NOT_FOUND", "the promoted bundle is not a readable directory", **where
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so the rename stays on one file system; the leading dot keeps the
    # repository from taking it for a version.
    staging = Path(tempfile.mkdtemp(prefix=f".promoting-{promotion.version}-", dir=target.parent))
    try:
        for line in manifest(bundle):
            relative = line.split("\0", 1)[0]
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle / relative, destination)
        if bundle_digest(staging) != promotion.sha256:
            raise FailedPrecondition(
                "BUNDLE_DIGEST_MISMATCH",
                "the promoted bundle's digest is not the one the promotion names",
                **where,
            )
        staging.chmod(0o755)
        # rename() fails if another writer put the target there meanwhile: never a mix.
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


async def apply_promotion(promotion: Promotion, server: ModelServer) -> None:
    """Installs the promoted bundle and makes it the version of its model that serves."""
    await asyncio.to_thread(install_bundle, promotion, server.repository)
    await server.load(promotion.model, promotion.version)


class PromotionFollower:
    """Follows the promotion stream for one replica (see the module doc). `run` is the
    task; `position` is the id of the last entry read."""

    def __init__(
        self,
        redis: aioredis.Redis,
        server: ModelServer,
        registry: Registry,
        *,
        alias: str = "production",
        stream: str = PROMOTION_STREAM,
        block_ms: int = 1000,
        retry_seconds: float = 2.0,
    ) -> None:
        self.redis = redis
        self.server = server
        self.registry = registry
        self.alias = alias
        self.stream = stream
        self.block_ms = block_ms
        self.retry_seconds = retry_seconds
        self.position: str | None = None
        #: Entries applied, skipped (other alias, already serving) and refused, for tests.
        self.applied = 0
        self.refused = 0
        self.caught_up = asyncio.Event()

    async def run(self) -> None:
        """Catches up, then follows the stream until cancelled."""
        while self.position is None:
            try:
                await self.catch_up()
            except (RedisError, OSError) as error:
                self._redis_failed(error)
                await asyncio.sleep(self.retry_seconds)
        while True:
            try:
                await self.follow_once()
            except (RedisError, OSError) as error:
                self._redis_failed(error)
                await asyncio.sleep(self.retry_seconds)
            except Exception:  # whatever an entry does, the loop goes on
                log.exception("the promotion loop failed; going on")
                await asyncio.sleep(self.retry_seconds)

    async def catch_up(self) -> None:
        """Applies the latest promotion to this alias of each model not serving it already,
        and sets the position to the stream's last entry."""
        latest: dict[ModelName, tuple[str, Promotion]] = {}
        top: str | None = None
        end = "+"
        while True:
            page: list[tuple[Any, Any]] = list(
                await self.redis.xrevrange(self.stream, max=end, min="-", count=_PAGE) or []
            )
            for raw_id, fields in page:
                entry_id = _text(raw_id)
                top = top or entry_id
                promotion = self._parse(entry_id, fields or {}, quiet=True)
                if promotion is not None and promotion.alias == self.alias:
                    latest.setdefault(promotion.model, (entry_id, promotion))
            if len(page) < _PAGE:
                break
            end = f"({_text(page[-1][0])}"
        # Newest first as read; applied oldest first, in stream order.
        for entry_id, promotion in reversed(list(latest.values())):
            if not self.server.ready(promotion.model, promotion.version):
                await self._apply(entry_id, promotion)
        self.position = top or "0-0"
        self.caught_up.set()

    async def follow_once(self) -> None:
        """Waits up to `block_ms` for new entries and acts on each, in order."""
        assert self.position is not None
        # RESP2's shape: [[stream, [[id, fields], ...]]], or None when nothing came.
        answer = cast(
            "list[tuple[Any, list[tuple[Any, Any]]]] | None",
            await self.redis.xread({self.stream: self.position}, count=_PAGE, block=self.block_ms),
        )
        for _, entries in answer or []:
            for raw_id, fields in entries:
                entry_id = _text(raw_id)
                self.position = entry_id
                promotion = self._parse(entry_id, fields or {})
                if promotion is not None and promotion.alias == self.alias:
                    await self._apply(entry_id, promotion)

    def _parse(
        self, entry_id: str, fields: Mapping[Any, Any], *, quiet: bool = False
    ) -> Promotion | None:
        try:
            return parse_promotion({_text(key): _text(value) for key, value in fields.items()})
        except MedimgError as error:
            if not quiet:
                self.refused += 1
                _log_refused(entry_id, error, fields)
            return None

    async def _apply(self, entry_id: str, promotion: Promotion) -> None:
        where = {"entry": entry_id, "model": promotion.model, "version": promotion.version}
        try:
            await self._confirm(promotion)
            await apply_promotion(promotion, self.server)
        except MedimgError as error:
            self.refused += 1
            _log_refused(entry_id, error, where)
            return
        except Exception as error:  # noqa: BLE001 - a disk error, or anything: skip, go on
            self.refused += 1
            log.warning(
                "a promotion could not be installed",
                extra={"fields": {**where, "error_type": type(error).__name__}},
            )
            return
        self.applied += 1
        log.info("promoted version serving", extra={"fields": {**where, "alias": promotion.alias}})

    async def _confirm(self, promotion: Promotion) -> None:
        """Confirms the promotion with the registry, waiting out a registry that cannot be
        reached (the promotions after this one wait too: they apply in order)."""
        while True:
            try:
                return await confirm(promotion, self.registry)
            except RegistryUnavailable as error:
                log.warning(
                    "cannot reach the registry to confirm a promotion; retrying in %.1f s",
                    self.retry_seconds,
                    extra={"fields": {"model": promotion.model, "code": str(error)}},
                )
                await asyncio.sleep(self.retry_seconds)

    def _redis_failed(self, error: BaseException) -> None:
        log.warning(
            "cannot read the promotion stream; retrying in %.1f s",
            self.retry_seconds,
            extra={"fields": {"error_type": type(error).__name__}},
        )


def _log_refused(entry_id: str, error: MedimgError, context: Mapping[Any, Any]) -> None:
    # The entry names models and versions only; the error's message says what is wrong
    # without quoting more than the model name.
    fields: dict[str, Any] = {"entry": entry_id, "reason": error.reason, "detail": error.message}
    for key in ("model", "version"):
        value = context.get(key) if key in context else context.get(key.encode())
        if value is not None:
            fields[key] = _text(value)[:128]
    log.warning("promotion skipped", extra={"fields": fields})


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
