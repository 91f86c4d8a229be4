"""Page sizes and page tokens (AIP-158)."""

from __future__ import annotations

import base64

import pytest

from medimg_core.errors import InvalidArgument
from medimg_core.pagination import decode_token, encode_token, page_size


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(0, 50), (1, 1), (50, 50), (999, 999), (1000, 1000), (1001, 1000), (2**31 - 1, 1000)],
)
def test_page_size(requested: int, expected: int) -> None:
    assert page_size(requested, default=50) == expected


def test_page_size_with_its_own_maximum() -> None:
    assert page_size(500, default=10, maximum=100) == 100
    assert page_size(0, default=10, maximum=100) == 10


@pytest.mark.parametrize("requested", [-1, -(2**31)])
def test_negative_page_size_is_invalid(requested: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        page_size(requested, default=50)
    assert caught.value.reason == "INVALID_PAGE_SIZE"


def test_token_round_trip() -> None:
    position = {"t": "2024-01-02T03:04:05+00:00", "s": "1.2.3"}
    token = encode_token(position)
    assert token
    assert "1.2.3" not in token  # opaque to the caller
    assert decode_token(token, "t", "s") == position
    assert decode_token(token, "s", "t") == position


def test_empty_token_is_the_first_page() -> None:
    assert decode_token("", "after") is None


@pytest.mark.parametrize(
    "token",
    [
        "%%%",
        "abc",  # bad padding
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'"after"').decode(),
        encode_token({"before": 1}),
        encode_token({"after": 1, "extra": 2}),
        encode_token({}),
        "é",
    ],
)
def test_foreign_token_is_invalid(token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_token(token, "after")
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert caught.value.code.name == "INVALID_ARGUMENT"
