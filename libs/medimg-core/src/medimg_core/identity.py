"""Who is calling: the verified workload (from Envoy's XFCC) and the end user behind it.

The service listens on 127.0.0.1 only, so the `x-forwarded-client-cert` header can
only have been set by its own sidecar, which sanitizes and sets it from the verified
client certificate. A user header is believed only when that verified caller is the
gateway, which sets it from a JWT it has validated.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NewType

from medimg_core.errors import Unauthenticated

SpiffeId = NewType("SpiffeId", str)
Role = NewType("Role", str)

#: Who a call came from when its caller could not be verified (recorded, never trusted).
UNVERIFIED = SpiffeId("unverified")

XFCC_HEADER = "x-forwarded-client-cert"
USER_HEADER = "x-medimg-jwt-payload"

#: Roles a person may hold; workloads hold none.
ROLES: frozenset[Role] = frozenset(
    Role(r) for r in ("clinician", "researcher", "ml-engineer", "auditor", "admin")
)

_SPIFFE = re.compile(r"^spiffe://(?P<domain>[^/]+)/ns/(?P<ns>[^/]+)/sa/(?P<name>[^/]+)$")


@dataclass(frozen=True)
class Principal:
    """The verified caller of one RPC."""

    workload: SpiffeId
    user: str | None = None
    roles: frozenset[Role] = field(default_factory=frozenset)

    @property
    def workload_name(self) -> str:
        """The service account name of the workload, e.g. `ingest` or `gateway`."""
        match = _SPIFFE.match(self.workload)
        return match["name"] if match else self.workload

    def has_any_role(self, roles: Iterable[Role]) -> bool:
        return not self.roles.isdisjoint(roles)


def spiffe_id(trust_domain: str, namespace: str, name: str) -> SpiffeId:
    return SpiffeId(f"spiffe://{trust_domain}/ns/{namespace}/sa/{name}")


def workload_from_xfcc(value: str) -> SpiffeId:
    """The URI SAN of the nearest client certificate in an XFCC header.

    Envoy with SANITIZE_SET sends exactly one element, e.g.
    `By=spiffe://…/sa/ingest;Hash=…;URI=spiffe://…/sa/ops`.
    """
    element = _split_outside_quotes(value, ",")[-1]
    for pair in _split_outside_quotes(element, ";"):
        key, _, raw = pair.partition("=")
        if key.strip().lower() == "uri":
            uri = raw.strip().strip('"')
            if _SPIFFE.match(uri):
                return SpiffeId(uri)
    raise Unauthenticated("MISSING_CALLER_IDENTITY", "the caller's certificate has no SPIFFE ID")


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    # XFCC values may be quoted and hold ',' and ';' (Subject DNs): split only outside quotes.
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def user_from_payload(value: str) -> tuple[str, frozenset[Role]]:
    """Subject and known roles from the gateway's base64url JWT payload header."""
    try:
        padded = value + "=" * (-len(value) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
        subject = claims["sub"]
        roles = claims.get("roles", [])
    except (binascii.Error, ValueError, KeyError, TypeError) as error:
        raise Unauthenticated(
            "MALFORMED_USER_CLAIMS", "the user's token claims are unreadable"
        ) from error
    if (
        not isinstance(subject, str)
        or not subject
        or not isinstance(roles, list)
        or not all(isinstance(r, str) for r in roles)
    ):
        raise Unauthenticated(
            "MALFORMED_USER_CLAIMS", "the user's token needs `sub` and a `roles` list"
        )
    return subject, frozenset(Role(r) for r in roles if r in ROLES)


def principal_from_metadata(
    metadata: dict[str, str], gateway: SpiffeId, *, user_required: bool = True
) -> Principal:
    """The verified caller. A call from the gateway carries its user, unless `user_required`
    is off: the gateway's own calls (its access log) have no user behind them."""
    xfcc = metadata.get(XFCC_HEADER)
    if not xfcc:
        raise Unauthenticated(
            "MISSING_CALLER_IDENTITY", "no verified client certificate: call through the sidecar"
        )
    workload = workload_from_xfcc(xfcc)
    if workload != gateway:
        return Principal(workload)
    payload = metadata.get(USER_HEADER)
    if not payload and not user_required:
        return Principal(workload)
    if not payload:
        raise Unauthenticated("MISSING_USER", "a call through the gateway needs a user token")
    user, roles = user_from_payload(payload)
    return Principal(workload, user, roles)
