"""Who is calling: XFCC parsing, the gateway's user header, and when that header is believed."""

from __future__ import annotations

import base64
import json

import pytest

from medimg_core.errors import Unauthenticated
from medimg_core.identity import (
    USER_HEADER,
    XFCC_HEADER,
    Principal,
    Role,
    SpiffeId,
    principal_from_metadata,
    spiffe_id,
    user_from_payload,
    workload_from_xfcc,
)

GATEWAY = spiffe_id("medimg.local", "medimg", "gateway")
INGEST = spiffe_id("medimg.local", "medimg", "ingest")
AUDIT = spiffe_id("medimg.local", "medimg", "audit")


def payload(claims: object) -> str:
    """The gateway's header: base64url of the JWT payload, without padding."""
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")


# --- XFCC ---------------------------------------------------------------------------------


def test_spiffe_id_and_workload_name() -> None:
    assert GATEWAY == "spiffe://medimg.local/ns/medimg/sa/gateway"
    assert Principal(INGEST).workload_name == "ingest"
    assert Principal(SpiffeId("not-a-spiffe-id")).workload_name == "not-a-spiffe-id"


def test_xfcc_single_element() -> None:
    value = f"By={AUDIT};Hash=0a1b2c;URI={INGEST}"
    assert workload_from_xfcc(value) == INGEST


def test_xfcc_uri_only_as_the_sidecars_send_it() -> None:
    assert workload_from_xfcc(f"URI={INGEST}") == INGEST


def test_xfcc_key_is_case_insensitive_and_value_may_be_quoted() -> None:
    assert workload_from_xfcc(f'uri="{INGEST}"') == INGEST


def test_xfcc_quoted_subject_with_semicolon() -> None:
    value = f'By={AUDIT};Hash=0a;Subject="CN=ingest;OU=medimg";URI={INGEST}'
    assert workload_from_xfcc(value) == INGEST


def test_xfcc_quoted_subject_with_comma() -> None:
    value = f'By={AUDIT};Hash=0a;Subject="CN=ingest,OU=medimg;O=x";URI={INGEST}'
    assert workload_from_xfcc(value) == INGEST


def test_xfcc_several_elements_takes_the_last_nearest() -> None:
    value = f"By={INGEST};URI={GATEWAY},By={AUDIT};URI={INGEST}"
    assert workload_from_xfcc(value) == INGEST


def test_xfcc_uri_in_an_earlier_element_is_not_used() -> None:
    value = f"By={AUDIT};URI={GATEWAY},By={AUDIT};Hash=0a"
    with pytest.raises(Unauthenticated) as caught:
        workload_from_xfcc(value)
    assert caught.value.reason == "MISSING_CALLER_IDENTITY"


@pytest.mark.parametrize(
    "value",
    [
        f"By={AUDIT};Hash=0a1b2c",
        "URI=https://example.org/not-spiffe",
        "URI=spiffe://medimg.local/sa/ingest",
        "",
        f'Subject="URI={INGEST}"',
    ],
)
def test_xfcc_without_spiffe_uri_is_unauthenticated(value: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        workload_from_xfcc(value)
    assert caught.value.reason == "MISSING_CALLER_IDENTITY"
    assert caught.value.code.name == "UNAUTHENTICATED"


# --- the user payload ---------------------------------------------------------------------


def test_user_payload_valid() -> None:
    subject, roles = user_from_payload(payload({"sub": "dr-who", "roles": ["clinician", "admin"]}))
    assert subject == "dr-who"
    assert roles == frozenset({Role("clinician"), Role("admin")})


def test_user_payload_padded_is_accepted_too() -> None:
    value = base64.urlsafe_b64encode(json.dumps({"sub": "a", "roles": []}).encode()).decode()
    assert user_from_payload(value) == ("a", frozenset())


def test_user_payload_roles_default_to_none() -> None:
    assert user_from_payload(payload({"sub": "dr-who"})) == ("dr-who", frozenset())


def test_user_payload_unknown_roles_are_dropped() -> None:
    _, roles = user_from_payload(payload({"sub": "x", "roles": ["root", "auditor", "Admin"]}))
    assert roles == frozenset({Role("auditor")})


@pytest.mark.parametrize(
    "value",
    [
        "%%%not base64%%%",
        "a",  # one base64 character is never a whole byte
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
        payload(["sub", "x"]),
        payload("sub"),
        payload(42),
        payload({"roles": ["clinician"]}),
        payload({"sub": "", "roles": []}),
        payload({"sub": 7, "roles": []}),
        payload({"sub": "x", "roles": "clinician"}),
        payload({"sub": "x", "roles": {"clinician": True}}),
        payload({"sub": "x", "roles": None}),
    ],
)
def test_user_payload_malformed(value: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        user_from_payload(value)
    assert caught.value.reason == "MALFORMED_USER_CLAIMS"


def test_user_payload_roles_that_are_not_strings() -> None:
    with pytest.raises(Unauthenticated) as caught:
        user_from_payload(payload({"sub": "x", "roles": [["admin"], "clinician"]}))
    assert caught.value.reason == "MALFORMED_USER_CLAIMS"


# --- principal_from_metadata --------------------------------------------------------------


def test_principal_of_a_workload() -> None:
    principal = principal_from_metadata({XFCC_HEADER: f"URI={INGEST}"}, GATEWAY)
    assert principal == Principal(INGEST)
    assert principal.user is None
    assert principal.roles == frozenset()


def test_principal_of_a_user_through_the_gateway() -> None:
    metadata = {
        XFCC_HEADER: f"By={INGEST};URI={GATEWAY}",
        USER_HEADER: payload({"sub": "dr-who", "roles": ["clinician", "wizard"]}),
    }
    principal = principal_from_metadata(metadata, GATEWAY)
    assert principal == Principal(GATEWAY, "dr-who", frozenset({Role("clinician")}))
    assert principal.has_any_role([Role("clinician"), Role("admin")])
    assert not principal.has_any_role([Role("admin")])


def test_user_header_from_a_workload_other_than_the_gateway_is_ignored() -> None:
    metadata = {
        XFCC_HEADER: f"URI={INGEST}",
        USER_HEADER: payload({"sub": "mallory", "roles": ["admin"]}),
    }
    principal = principal_from_metadata(metadata, GATEWAY)
    assert principal == Principal(INGEST)
    assert principal.user is None
    assert principal.roles == frozenset()


def test_malformed_user_header_from_another_workload_is_ignored_too() -> None:
    metadata = {XFCC_HEADER: f"URI={INGEST}", USER_HEADER: "%%%"}
    assert principal_from_metadata(metadata, GATEWAY) == Principal(INGEST)


def test_no_xfcc_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated) as caught:
        principal_from_metadata({USER_HEADER: payload({"sub": "x", "roles": []})}, GATEWAY)
    assert caught.value.reason == "MISSING_CALLER_IDENTITY"


def test_empty_xfcc_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated) as caught:
        principal_from_metadata({XFCC_HEADER: ""}, GATEWAY)
    assert caught.value.reason == "MISSING_CALLER_IDENTITY"


def test_gateway_without_user_header_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated) as caught:
        principal_from_metadata({XFCC_HEADER: f"URI={GATEWAY}"}, GATEWAY)
    assert caught.value.reason == "MISSING_USER"


def test_the_gateway_alone_is_a_workload_only_where_no_user_is_required() -> None:
    metadata = {XFCC_HEADER: f"URI={GATEWAY}"}
    assert principal_from_metadata(metadata, GATEWAY, user_required=False) == Principal(GATEWAY)
    # A user the gateway forwards is still read, and still verified, where none is required.
    metadata[USER_HEADER] = payload({"sub": "alice", "roles": ["auditor"]})
    assert principal_from_metadata(metadata, GATEWAY, user_required=False).user == "alice"


def test_gateway_with_malformed_user_header_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated) as caught:
        principal_from_metadata({XFCC_HEADER: f"URI={GATEWAY}", USER_HEADER: "%%%"}, GATEWAY)
    assert caught.value.reason == "MALFORMED_USER_CLAIMS"


def test_gateway_of_another_trust_domain_is_just_a_workload() -> None:
    foreign_gateway = spiffe_id("evil.example", "medimg", "gateway")
    metadata = {
        XFCC_HEADER: f"URI={foreign_gateway}",
        USER_HEADER: payload({"sub": "mallory", "roles": ["admin"]}),
    }
    principal = principal_from_metadata(metadata, GATEWAY)
    assert principal.user is None
    assert principal.workload == foreign_gateway
