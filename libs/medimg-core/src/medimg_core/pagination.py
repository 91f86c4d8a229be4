"""Page sizes and opaque page tokens for every List method (AIP-158)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from medimg_core.errors import InvalidArgument


def page_size(requested: int, *, default: int, maximum: int = 1000) -> int:
    if requested < 0:
        raise InvalidArgument("INVALID_PAGE_SIZE", "page_size must not be negative")
    return default if requested == 0 else min(requested, maximum)


def encode_token(position: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position, separators=(",", ":")).encode()).decode()


def decode_token(token: str, *keys: str) -> dict[str, Any] | None:
    """The position a token stands for, or None for the first page."""
    if not token:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (binascii.Error, ValueError) as error:
        raise InvalidArgument(
            "INVALID_PAGE_TOKEN", "page_token is not one this API gave"
        ) from error
    if not isinstance(position, dict) or set(position) != set(keys):
        raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not one this API gave")
    return position
