"""Re-seals every pseudonym-to-patient link with the current identity key, after a rotation.

Run it where ingest runs, with ingest's own settings (the database URL and the key files;
the key that sealed a row must be the current key or listed among the previous ones):

    kubectl -n medimg exec deploy/ingest -c ingest -- python -m medimg_ingest.rekey --check
    kubectl -n medimg exec deploy/ingest -c ingest -- python -m medimg_ingest.rekey

It works in batches, one transaction each, and only on rows not sealed with the current
key yet, so it can be stopped and run again at any time. Each re-sealed link is audited
(an update of `patients/{pseudonym}`) before its batch commits, with ingest's workload as
the actor and `medimg_ingest.rekey` as the method: the command runs with ingest's own
certificate, and the person who ran it is in the Kubernetes API audit log (`kubectl exec`).
A row that does not open stops the run, and nothing of its batch is written. Patient IDs
exist only in memory between opening and re-sealing: nothing here prints or logs one.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import asyncpg

from medimg.audit.v1.audit_service_pb2 import ACTION_UPDATE
from medimg_core import calls, channels, db
from medimg_core import redis as medimg_redis
from medimg_core.audit import Access, AuditClient
from medimg_core.errors import MedimgError
from medimg_core.identity import Principal
from medimg_core.settings import load_settings
from medimg_ingest.identities import BrokenSeal, IdentityVault, UnknownIdentityKey
from medimg_ingest.settings import IngestSettings

#: The method the command's audit events name.
COMMAND = "medimg_ingest.rekey"

#: Records the accesses in the audit log before a batch commits (AuditClient.report).
Report = Callable[[Sequence[Access]], Awaitable[object]]


@dataclass
class Resealed:
    """What a run did: links re-sealed by the key id that had sealed them, and links that
    were on the current key already when it started."""

    current_key_id: str
    already_current: int = 0
    by_key_id: Counter[str] = field(default_factory=Counter)
    batches: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_key_id.values())

    def summary(self) -> str:
        moved = ", ".join(f"{n} from key id {k}" for k, n in sorted(self.by_key_id.items()))
        return (
            f"re-sealed {self.total} identity links with key id {self.current_key_id} "
            f"in {self.batches} batches{f' ({moved})' if moved else ''}; "
            f"{self.already_current} were on it already"
        )


class ResealStopped(Exception):
    """A link that does not open stopped the run; its batch was not written."""

    def __init__(self, pseudonym: str, key_id: str, cause: MedimgError, done: Resealed) -> None:
        super().__init__(
            f"patients/{pseudonym} (sealed with key id {key_id}) does not open: "
            f"{cause.message}. Its batch was not written; {done.total} links re-sealed "
            "before it stay re-sealed"
        )
        self.pseudonym = pseudonym
        self.key_id = key_id
        self.reason = cause.reason
        self.done = done


async def reseal(
    pool: asyncpg.Pool, vault: IdentityVault, *, report: Report, batch_size: int = 500
) -> Resealed:
    """Moves every link not sealed with `vault.key_id` to it, `batch_size` rows per
    transaction, in pseudonym order. Raises ResealStopped at the first link that does not
    open (nothing of its batch written)."""
    if batch_size < 1:
        raise ValueError("the batch size must be at least 1")
    done = Resealed(vault.key_id)
    done.already_current = await pool.fetchval(
        "SELECT count(*) FROM identities WHERE key_id = $1", vault.key_id
    )
    after = ""
    while True:
        async with pool.acquire() as conn, conn.transaction():
            # Locked, so that a second run at the same time waits, then skips these rows
            # (PostgreSQL re-checks the key id of a row it waited for).
            rows = await conn.fetch(
                "SELECT patient_pseudonym, key_id, sealed FROM identities "
                "WHERE key_id <> $1 AND patient_pseudonym > $2 "
                "ORDER BY patient_pseudonym LIMIT $3 FOR UPDATE",
                vault.key_id,
                after,
                batch_size,
            )
            if not rows:
                return done
            pseudonyms = [row["patient_pseudonym"] for row in rows]
            resealed = [_resealed(vault, row, done) for row in rows]
            await report(
                [Access(ACTION_UPDATE, f"patients/{p}", patient_pseudonym=p) for p in pseudonyms]
            )
            await conn.execute(
                "UPDATE identities AS i SET key_id = $1, sealed = u.sealed "
                "FROM unnest($2::text[], $3::bytea[]) AS u(pseudonym, sealed) "
                "WHERE i.patient_pseudonym = u.pseudonym",
                vault.key_id,
                pseudonyms,
                resealed,
            )
        # Counted once committed, so the counts say what is written.
        done.by_key_id.update(row["key_id"] for row in rows)
        done.batches += 1
        after = pseudonyms[-1]


def _resealed(vault: IdentityVault, row: asyncpg.Record, done: Resealed) -> bytes:
    pseudonym, key_id = row["patient_pseudonym"], row["key_id"]
    try:
        patient_id = vault.open(pseudonym, bytes(row["sealed"]), key_id)
    except (UnknownIdentityKey, BrokenSeal) as error:
        raise ResealStopped(pseudonym, key_id, error, done) from None
    return vault.seal(pseudonym, patient_id)


async def links_by_key_id(pool: asyncpg.Pool) -> dict[str, int]:
    """How many links each key id sealed."""
    rows = await pool.fetch(
        "SELECT key_id, count(*) AS links FROM identities GROUP BY key_id ORDER BY key_id"
    )
    return {row["key_id"]: row["links"] for row in rows}


def describe(counts: dict[str, int], vault: IdentityVault) -> str:
    """`--check`'s answer: the links per key id, and whether each key is loaded."""
    lines = [f"current identity key id {vault.key_id}"]
    for key_id, links in counts.items():
        state = (
            "current"
            if key_id == vault.key_id
            else "previous, loaded"
            if key_id in vault.key_ids
            else "NOT LOADED: these links do not open"
        )
        lines.append(f"  key id {key_id}: {links} links ({state})")
    if not counts:
        lines.append("  no links")
    return "\n".join(lines)


async def run(settings: IngestSettings, *, check: bool, batch_size: int) -> int:
    """The command: 0 when every link is on the current key, 1 otherwise."""
    vault = IdentityVault.from_file(
        settings.identity_key_file, settings.previous_identity_key_files
    )
    async with AsyncExitStack() as resources:
        pool = await db.connect(settings.database_url, max_size=2)
        resources.push_async_callback(pool.close)
        if check:
            counts = await links_by_key_id(pool)
            print(describe(counts, vault))
            return 0 if set(counts) <= {vault.key_id} else 1
        # Audited as ingest itself audits, with the same spool while audit is down, and
        # as ingest's workload: no RPC here names a caller.
        calls.enter(calls.Call(COMMAND, Principal(settings.spiffe("ingest"))))
        events = medimg_redis.connect(settings.redis_url)
        resources.push_async_callback(events.aclose)
        audit_channel = channels.outbound(settings.audit_target, settings)
        resources.push_async_callback(audit_channel.close, None)
        audit = await resources.enter_async_context(
            AuditClient.for_service(
                audit_channel, service="ingest", settings=settings, redis=events
            )
        )
        try:
            done = await reseal(pool, vault, report=audit.report, batch_size=batch_size)
        except ResealStopped as stopped:
            print(f"medimg_ingest.rekey: stopped: {stopped}", file=sys.stderr)
            return 1
        print(done.summary())
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medimg_ingest.rekey",
        description="Re-seal every pseudonym-to-patient link with the current identity key "
        "(MEDIMG_INGEST_IDENTITY_KEY_FILE), opening each with the key that sealed it "
        "(MEDIMG_INGEST_PREVIOUS_IDENTITY_KEY_FILES).",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only count the links per key id; exit 1 if any is not on the current key",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="links per transaction")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    settings = load_settings(IngestSettings)
    return asyncio.run(run(settings, check=args.check, batch_size=args.batch_size))


if __name__ == "__main__":
    sys.exit(main())
