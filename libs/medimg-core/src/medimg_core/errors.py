"""The domain error hierarchy: each error knows its gRPC code and an UPPER_SNAKE reason.

Domain modules raise these; `interceptors` turns them into `google.rpc.Status`
with an `ErrorInfo` in exactly one place.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

#: The ErrorInfo domain of every medimg error.
ERROR_DOMAIN = "medimg.io"


class MedimgError(Exception):
    """A failure a caller can act on. `reason` is stable; `message` is for people."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, reason: str, message: str, **metadata: str | int) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = {key: str(value) for key, value in metadata.items()}


class InvalidArgument(MedimgError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MedimgError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MedimgError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MedimgError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(MedimgError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MedimgError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(MedimgError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(MedimgError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(MedimgError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(MedimgError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DataLoss(MedimgError):
    """Stored data that no longer matches what was stored (e.g. a content hash)."""

    code = grpc.StatusCode.DATA_LOSS
