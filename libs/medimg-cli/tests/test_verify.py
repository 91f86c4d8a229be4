"""The audit log verifier: RFC 6962/9162 test vectors, brute-force proofs and an in-memory log."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import json
import random
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.timestamp_pb2 import Timestamp

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medimg_cli import verify as v

# The vectors are data copied from the Certificate Transparency projects (see the README in
# rfc9162_vectors/): google/certificate-transparency cpp/merkletree/merkle_tree_test.cc, and
# transparency-dev/merkle testonly/constants.go, proof/verify_test.go and testdata/.
VECTORS = Path(__file__).parent / "rfc9162_vectors"
REFERENCE = json.loads((VECTORS / "reference_tree.json").read_text())
LEAVES = [bytes.fromhex(leaf) for leaf in REFERENCE["leaves"]]
ROOTS = [bytes.fromhex(root) for root in REFERENCE["roots"]]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def b64(text: str) -> bytes:
    return base64.b64decode(text)


# --- Hashes and tree heads -----------------------------------------------------------------


def test_leaf_and_node_hashes_match_every_perfect_subtree() -> None:
    levels = [[h(x) for x in level] for level in REFERENCE["node_hashes"]]
    assert [v.leaf_hash(leaf) for leaf in LEAVES] == levels[0]
    for below, level in itertools.pairwise(levels):
        assert [v.node_hash(below[i], below[i + 1]) for i in range(0, len(below), 2)] == level


def test_root_of_every_prefix_as_leaves_are_added() -> None:
    tree = v.CompactRange()
    assert tree.root() == ROOTS[0] == v.EMPTY_ROOT == hashlib.sha256(b"").digest()
    for size, leaf in enumerate(LEAVES, start=1):
        tree.append(v.leaf_hash(leaf))
        assert (tree.size, tree.root()) == (size, ROOTS[size])
        assert v.merkle_root(v.leaf_hash(x) for x in LEAVES[:size]) == ROOTS[size]


def test_compact_range_refuses_what_is_not_a_hash() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        v.CompactRange().append(b"short")


# --- Inclusion proofs ------------------------------------------------------------------------


def inclusion_mutations(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> list[tuple[str, tuple[bytes, int, int, list[bytes], bytes]]]:
    """Every way to spoil a good inclusion proof; each must be rejected."""
    proof = list(proof)
    cases = [
        ("leaf index - 1", (leaf, index - 1, size, proof, root)),
        ("leaf index + 1", (leaf, index + 1, size, proof, root)),
        ("leaf index ^ 2", (leaf, index ^ 2, size, proof, root)),
        ("tree size * 2", (leaf, index, size * 2, proof, root)),
        ("tree size / 2", (leaf, index, size // 2, proof, root)),
        ("wrong leaf", (b"WrongLeaf", index, size, proof, root)),
        ("other leaf hash", (v.leaf_hash(b"WrongLeaf"), index, size, proof, root)),
        ("empty-tree root", (leaf, index, size, proof, v.EMPTY_ROOT)),
        ("random root", (leaf, index, size, proof, SOME_HASH)),
        ("trailing garbage", (leaf, index, size, [*proof, b""], root)),
        ("trailing root", (leaf, index, size, [*proof, root], root)),
        ("preceding garbage", (leaf, index, size, [b"", *proof], root)),
        ("preceding root", (leaf, index, size, [root, *proof], root)),
        ("extra hash", (leaf, index, size, [*proof, SOME_HASH], root)),
    ]
    for i in range(len(proof)):
        for bit in (0, 3, 255):
            flipped = [bytearray(x) for x in proof]
            flipped[i][bit // 8] ^= 1 << (bit % 8)
            spoiled = [bytes(x) for x in flipped]
            cases.append((f"bit {bit} of hash {i}", (leaf, index, size, spoiled, root)))
    if proof:
        cases.append(("missing last hash", (leaf, index, size, proof[:-1], root)))
        cases.append(("missing first hash", (leaf, index, size, proof[1:], root)))
    if len(proof) > 1:
        cases.append(
            ("inserted hash", (leaf, index, size, [proof[0], SOME_HASH, *proof[1:]], root))
        )
    return cases


def assert_inclusion_rejected(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    for description, args in inclusion_mutations(index, size, leaf, proof, root):
        with pytest.raises(v.ProofError):
            v.verify_inclusion(*args)
            pytest.fail(f"accepted: {description}")


@pytest.mark.parametrize(
    "case", REFERENCE["inclusion_proofs"], ids=lambda c: f"{c['leaf']}-of-{c['tree_size']}"
)
def test_reference_inclusion_proofs(case: dict[str, Any]) -> None:
    index, size = case["leaf"] - 1, case["tree_size"]  # the sources count leaves from 1
    leaf, proof = v.leaf_hash(LEAVES[index]), [h(x) for x in case["path"]]
    assert v.root_from_inclusion_proof(index, size, leaf, proof) == ROOTS[size]
    v.verify_inclusion(leaf, index, size, proof, ROOTS[size])
    assert_inclusion_rejected(index, size, leaf, proof, ROOTS[size])


def _vector_files(kind: str) -> list[Path]:
    return sorted((VECTORS / kind).glob("*.json"))


@pytest.mark.parametrize("path", _vector_files("inclusion"), ids=lambda p: p.stem)
def test_transparency_dev_inclusion_vectors(path: Path) -> None:
    case = json.loads(path.read_text())
    args = (
        b64(case["leafHash"]),
        case["leafIdx"],
        case["treeSize"],
        [b64(x) for x in case["proof"] or []],
        b64(case["root"]),
    )
    if case["wantErr"]:
        with pytest.raises(v.ProofError):
            v.verify_inclusion(*args)
    else:
        v.verify_inclusion(*args)


@pytest.mark.parametrize(("index", "size"), [(0, 0), (0, 1), (1, 0), (2, 1)])
def test_inclusion_in_trees_too_small(index: int, size: int) -> None:
    for leaf, root in [(SOME_HASH, b""), (b"", v.EMPTY_ROOT), (SOME_HASH, v.EMPTY_ROOT)]:
        with pytest.raises(v.ProofError):
            v.verify_inclusion(leaf, index, size, [], root)


def test_inclusion_in_a_single_leaf_tree() -> None:
    leaf = v.leaf_hash(b"data")
    v.verify_inclusion(leaf, 0, 1, [], leaf)  # the root of one leaf is its hash
    for good_leaf, root in [(leaf, b""), (b"", leaf), (b"", b"")]:
        with pytest.raises(v.ProofError):
            v.verify_inclusion(good_leaf, 0, 1, [], root)


def test_inclusion_failures_say_why() -> None:
    proof = [h(x) for x in REFERENCE["inclusion_proofs"][1]["path"]]
    leaf = v.leaf_hash(LEAVES[0])
    with pytest.raises(v.ProofError, match="more hashes"):
        v.verify_inclusion(leaf, 0, 8, [*proof, SOME_HASH], ROOTS[8])
    with pytest.raises(v.ProofError, match="fewer hashes"):
        v.verify_inclusion(leaf, 0, 8, proof[:-1], ROOTS[8])
    with pytest.raises(v.ProofError, match="not below tree size"):
        v.verify_inclusion(leaf, 8, 8, proof, ROOTS[8])
    with pytest.raises(v.ProofError, match="another root"):
        v.verify_inclusion(leaf, 0, 8, [proof[0], SOME_HASH, proof[2]], ROOTS[8])
    with pytest.raises(v.ProofError, match="1 bytes"):
        v.verify_inclusion(leaf, 0, 8, [proof[0], b"x", proof[2]], ROOTS[8])


# --- Consistency proofs -----------------------------------------------------------------------


def consistency_mutations(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> list[tuple[str, tuple[int, int, bytes, bytes, list[bytes]]]]:
    """Every way to spoil a good, non-empty consistency proof; each must be rejected."""
    proof = list(proof)
    cases = [
        ("first size - 1", (first - 1, second, first_root, second_root, proof)),
        ("first size + 1", (first + 1, second, first_root, second_root, proof)),
        ("first size ^ 2", (first ^ 2, second, first_root, second_root, proof)),
        ("second size * 2", (first, second * 2, first_root, second_root, proof)),
        ("second size / 2", (first, second // 2, first_root, second_root, proof)),
        ("first > second", (second, first, first_root, second_root, proof)),
        ("wrong first root", (first, second, b"WrongRoot", second_root, proof)),
        ("wrong second root", (first, second, first_root, b"WrongRoot", proof)),
        ("other first root", (first, second, SOME_HASH, second_root, proof)),
        ("other second root", (first, second, first_root, SOME_HASH, proof)),
        ("swapped roots", (first, second, second_root, first_root, proof)),
        ("empty proof", (first, second, first_root, second_root, [])),
        ("trailing garbage", (first, second, first_root, second_root, [*proof, b""])),
        ("trailing first root", (first, second, first_root, second_root, [*proof, first_root])),
        ("trailing second root", (first, second, first_root, second_root, [*proof, second_root])),
        ("preceding garbage", (first, second, first_root, second_root, [b"", *proof])),
        ("preceding first root", (first, second, first_root, second_root, [first_root, *proof])),
        ("preceding second root", (first, second, first_root, second_root, [second_root, *proof])),
        ("preceding proof[0]", (first, second, first_root, second_root, [proof[0], *proof])),
        ("missing last hash", (first, second, first_root, second_root, proof[:-1])),
        ("extra hash", (first, second, first_root, second_root, [*proof, SOME_HASH])),
    ]
    for i in range(len(proof)):
        for bit in (0, 4, 255):
            flipped = [bytearray(x) for x in proof]
            flipped[i][bit // 8] ^= 1 << (bit % 8)
            spoiled = [bytes(x) for x in flipped]
            cases.append(
                (f"bit {bit} of hash {i}", (first, second, first_root, second_root, spoiled))
            )
    return cases


def assert_consistency_rejected(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    for description, args in consistency_mutations(first, second, first_root, second_root, proof):
        with pytest.raises(v.ProofError):
            v.verify_consistency(*args)
            pytest.fail(f"accepted: {description}")


@pytest.mark.parametrize(
    "case",
    REFERENCE["consistency_proofs"],
    ids=lambda c: f"{c['first_size']}-to-{c['second_size']}",
)
def test_reference_consistency_proofs(case: dict[str, Any]) -> None:
    first, second = case["first_size"], case["second_size"]
    proof = [h(x) for x in case["proof"]]
    v.verify_consistency(first, second, ROOTS[first], ROOTS[second], proof)
    if proof:
        assert_consistency_rejected(first, second, ROOTS[first], ROOTS[second], proof)


@pytest.mark.parametrize("path", _vector_files("consistency"), ids=lambda p: p.stem)
def test_transparency_dev_consistency_vectors(path: Path) -> None:
    case = json.loads(path.read_text())
    args = (
        case["size1"],
        case["size2"],
        b64(case["root1"]),
        b64(case["root2"]),
        [b64(x) for x in case["proof"] or []],
    )
    if case["wantErr"]:
        with pytest.raises(v.ProofError):
            v.verify_consistency(*args)
    else:
        v.verify_consistency(*args)


ROOT1, ROOT2 = b"don't care 1", b"don't care 2"


@pytest.mark.parametrize(
    ("args", "valid"),
    [
        ((0, 0, ROOT1, ROOT2, []), False),  # one size, two roots
        ((1, 1, ROOT1, ROOT2, []), False),
        ((0, 0, ROOT1, ROOT1, []), True),  # sizes that are always consistent
        ((0, 1, ROOT1, ROOT2, []), True),
        ((1, 1, ROOT2, ROOT2, []), True),
        ((1, 0, ROOT1, ROOT2, []), False),  # time travel to the past
        ((2, 1, ROOT1, ROOT2, []), False),
        ((1, 2, ROOT1, ROOT2, []), False),  # an empty proof where one is needed
        ((0, 0, v.EMPTY_ROOT, ROOT2, []), False),
        ((1, 1, v.EMPTY_ROOT, ROOT2, []), False),
        ((0, 0, v.EMPTY_ROOT, v.EMPTY_ROOT, [v.EMPTY_ROOT]), False),  # a proof where none is
        ((0, 1, v.EMPTY_ROOT, v.EMPTY_ROOT, [v.EMPTY_ROOT]), False),
        ((1, 1, v.EMPTY_ROOT, v.EMPTY_ROOT, [v.EMPTY_ROOT]), False),
    ],
)
def test_consistency_edge_cases(
    args: tuple[int, int, bytes, bytes, list[bytes]], valid: bool
) -> None:
    # The table of transparency-dev/merkle proof/verify_test.go TestVerifyConsistency.
    if valid:
        v.verify_consistency(*args)
    else:
        with pytest.raises(v.ProofError):
            v.verify_consistency(*args)


def test_consistency_failures_say_why() -> None:
    proof = [h(x) for x in REFERENCE["consistency_proofs"][2]["proof"]]  # 6 -> 8
    with pytest.raises(v.ProofError, match="larger than second size"):
        v.verify_consistency(8, 6, ROOTS[8], ROOTS[6], proof)
    with pytest.raises(v.ProofError, match="empty"):
        v.verify_consistency(6, 8, ROOTS[6], ROOTS[8], [])
    with pytest.raises(v.ProofError, match="fewer hashes"):
        v.verify_consistency(6, 8, ROOTS[6], ROOTS[8], proof[:-1])
    with pytest.raises(v.ProofError, match="more hashes"):
        v.verify_consistency(6, 8, ROOTS[6], ROOTS[8], [*proof, SOME_HASH])
    with pytest.raises(v.ProofError, match="first root"):
        v.verify_consistency(6, 8, ROOTS[5], ROOTS[8], proof)
    with pytest.raises(v.ProofError, match="second root"):
        v.verify_consistency(6, 8, ROOTS[6], ROOTS[7], proof)


# --- Random trees against a brute-force reference (test-only, from RFC 9162 2.1) ----------


def ref_mth(leaves: Sequence[bytes]) -> bytes:
    """MTH by the recursive definition of RFC 9162 2.1.1, over leaf hashes."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return hashlib.sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1."""
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def ref_proof(m: int, leaves: Sequence[bytes], whole: bool = True) -> list[bytes]:
    """SUBPROOF(m, D[n], b) of RFC 9162 2.1.4.1; PROOF(m, D[n]) when whole."""
    if m == len(leaves):
        return [] if whole else [ref_mth(leaves)]
    k = _split(len(leaves))
    if m <= k:
        return [*ref_proof(m, leaves[:k], whole), ref_mth(leaves[k:])]
    return [*ref_proof(m - k, leaves[k:], False), ref_mth(leaves[:k])]


def random_leaves(rng: random.Random, count: int) -> list[bytes]:
    return [v.leaf_hash(rng.randbytes(rng.randrange(0, 40))) for _ in range(count)]


def test_reference_generator_reproduces_the_published_proofs() -> None:
    leaves = [v.leaf_hash(leaf) for leaf in LEAVES]
    for case in REFERENCE["inclusion_proofs"]:
        path = ref_path(case["leaf"] - 1, leaves[: case["tree_size"]])
        assert path == [h(x) for x in case["path"]]
    for case in REFERENCE["consistency_proofs"]:
        proof = ref_proof(case["first_size"], leaves[: case["second_size"]])
        assert proof == [h(x) for x in case["proof"]]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_roots_of_random_trees(seed: int) -> None:
    rng = random.Random(seed)
    leaves = random_leaves(rng, 300)
    tree = v.CompactRange()
    for size, leaf in enumerate(leaves, start=1):
        tree.append(leaf)
        if size <= 70 or rng.random() < 0.1:
            assert tree.root() == ref_mth(leaves[:size]), size


@pytest.mark.parametrize("seed", [11, 12])
def test_every_proof_of_small_random_trees(seed: int) -> None:
    rng = random.Random(seed)
    leaves = random_leaves(rng, 33)
    roots = [v.merkle_root(leaves[:n]) for n in range(len(leaves) + 1)]
    for n in range(1, len(leaves) + 1):
        for index in range(n):
            proof = ref_path(index, leaves[:n])
            v.verify_inclusion(leaves[index], index, n, proof, roots[n])
            assert_inclusion_rejected(index, n, leaves[index], proof, roots[n])
        for m in range(1, n + 1):
            proof = ref_proof(m, leaves[:n])
            v.verify_consistency(m, n, roots[m], roots[n], proof)
            if proof:
                assert_consistency_rejected(m, n, roots[m], roots[n], proof)


@pytest.mark.parametrize("seed", [21, 22, 23, 24])
def test_proofs_of_larger_random_trees(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randrange(100, 1500)
    leaves = random_leaves(rng, n)
    root = v.merkle_root(leaves)
    for index in {0, n - 1, *rng.sample(range(n), 10)}:
        proof = ref_path(index, leaves)
        v.verify_inclusion(leaves[index], index, n, proof, root)
        assert_inclusion_rejected(index, n, leaves[index], proof, root)
    for m in {1, n - 1, n, *rng.sample(range(1, n), 10)}:
        proof = ref_proof(m, leaves)
        first_root = v.merkle_root(leaves[:m])
        v.verify_consistency(m, n, first_root, root, proof)
        if proof:
            assert_consistency_rejected(m, n, first_root, root, proof)


# --- Checkpoint notes ---------------------------------------------------------------------------


def body(
    size: int, root: bytes, origin: str = v.ORIGIN, when: str = "2026-11-23T11:02:03Z"
) -> bytes:
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\ntime {when}\n".encode()


def test_parse_checkpoint() -> None:
    note = v.parse_checkpoint(body(8, ROOTS[8], when="2026-11-23T11:02:03.123456Z"))
    assert (note.origin, note.tree_size, note.root_hash) == (v.ORIGIN, 8, ROOTS[8])
    assert note.time == dt.datetime(2026, 11, 23, 11, 2, 3, 123456, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    "bad",
    [
        body(8, ROOTS[8])[:-1],  # no final newline
        body(8, ROOTS[8]) + b"extra\n",
        body(8, ROOTS[8], origin=""),
        body(8, ROOTS[8]).replace(b"\n8\n", b"\n08\n"),
        body(8, ROOTS[8]).replace(b"\n8\n", b"\n-8\n"),
        body(8, ROOTS[8]).replace(b"\n8\n", b"\n 8\n"),
        body(8, ROOTS[8]).replace(b"\n8\n", b"\neight\n"),
        body(8, ROOTS[8][:31]),
        body(8, ROOTS[8]).replace(b"=\n", b"\n"),  # unpadded base64
        body(8, ROOTS[8]).replace(b"time ", b"timestamp "),
        body(8, ROOTS[8], when="yesterday"),
        body(8, ROOTS[8], when="2026-11-23T11:02:03"),  # no offset
        b"\xff" + body(8, ROOTS[8]),
    ],
)
def test_parse_checkpoint_refuses_malformed_bodies(bad: bytes) -> None:
    with pytest.raises(v.NoteError):
        v.parse_checkpoint(bad)


def test_key_id_is_the_hash_of_the_raw_key() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(32)).public_key()
    assert v.key_id(key) == hashlib.sha256(key.public_bytes_raw()).hexdigest()


# --- verify() against an in-memory log --------------------------------------------------------


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, "")


def stamp(when: dt.datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(when)
    return value


class FakeLog:
    """A log that keeps its tree apart from its events, so that tampering with the events
    leaves the proofs it serves as they were."""

    def __init__(self, key: Ed25519PrivateKey | None = None, history: str = "") -> None:
        self.key = key or Ed25519PrivateKey.generate()
        self.history = history  # logs of different histories hold different events
        self.events: list[pb.AuditEvent] = []
        self.tree: list[bytes] = []
        self.checkpoints: list[pb.Checkpoint] = []
        self.page_size = 7  # small pages, so paging is exercised

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    def append(self, count: int) -> None:
        for _ in range(count):
            index = len(self.tree)
            when = dt.datetime(2026, 11, 23, 11, 2, 3, 123456, tzinfo=dt.UTC) + dt.timedelta(
                seconds=index
            )
            event = pb.AuditEvent(
                name=f"auditEvents/{index}",
                event_id=str(uuid.UUID(int=index + 1)),
                actor=pb.Actor(
                    workload="spiffe://medimg.local/ns/medimg/sa/ingest",
                    user="dr-ü" if index % 2 else "",
                    roles=["researcher", "clinician"] if index % 2 else [],
                ),
                action=pb.ACTION_READ,
                outcome=pb.OUTCOME_SUCCESS,
                resource=f"studies/1.2.{index}{self.history}",
                patient_pseudonym=f"p{index}",
                service="ingest",
                method="/medimg.ingest.v1.IngestService/GetStudy",
                trace_id=f"{index:032x}",
                log_index=index,
            )
            event.event_time.CopyFrom(stamp(when))
            event.record_time.CopyFrom(stamp(when + dt.timedelta(microseconds=7)))
            # The canonical form written out by hand from the spec, not by the verifier.
            stamp_text = "%Y-%m-%dT%H:%M:%S.%fZ"
            canonical = {
                "action": "ACTION_READ",
                "actor": {
                    "roles": sorted(event.actor.roles),
                    "user": event.actor.user,
                    "workload": event.actor.workload,
                },
                "break_glass_reason": "",
                "event_id": event.event_id,
                "event_time": when.strftime(stamp_text),
                "log_index": index,
                "method": event.method,
                "outcome": "OUTCOME_SUCCESS",
                "patient_pseudonym": event.patient_pseudonym,
                "record_time": (when + dt.timedelta(microseconds=7)).strftime(stamp_text),
                "resource": event.resource,
                "service": "ingest",
                "trace_id": event.trace_id,
            }
            event.canonical = json.dumps(
                canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False
            ).encode()
            event.leaf_hash = hashlib.sha256(b"\x00" + event.canonical).digest()
            self.events.append(event)
            self.tree.append(event.leaf_hash)

    def sign(self) -> pb.Checkpoint:
        size, root = len(self.tree), ref_mth(self.tree)
        when = dt.datetime(2026, 11, 24, tzinfo=dt.UTC) + dt.timedelta(seconds=size)
        note = body(size, root, when=when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        checkpoint = pb.Checkpoint(
            name=f"checkpoints/{size}",
            tree_size=size,
            root_hash=root,
            body=note,
            signature=self.key.sign(note),
            key_id=hashlib.sha256(self.public_key.public_bytes_raw()).hexdigest(),
        )
        checkpoint.sign_time.CopyFrom(stamp(when))
        self.checkpoints.append(checkpoint)
        return checkpoint

    @property
    def stub(self) -> pb_grpc.AuditServiceAsyncStub:
        return cast("pb_grpc.AuditServiceAsyncStub", self)

    async def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, **options: object
    ) -> pb.Checkpoint:
        if not self.checkpoints:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, "no checkpoint")
        return self.checkpoints[-1]

    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, **options: object
    ) -> pb.ListCheckpointsResponse:
        start = int(request.page_token or 0)
        end = start + self.page_size
        return pb.ListCheckpointsResponse(
            checkpoints=self.checkpoints[start:end],
            next_page_token=str(end) if end < len(self.checkpoints) else "",
        )

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, **options: object
    ) -> pb.ListAuditEventsResponse:
        start = int(request.page_token or 0)
        end = start + self.page_size
        return pb.ListAuditEventsResponse(
            audit_events=self.events[start:end],
            next_page_token=str(end) if end < len(self.events) else "",
        )

    async def GetConsistencyProof(
        self, request: pb.GetConsistencyProofRequest, **options: object
    ) -> pb.ConsistencyProof:
        first, second = request.first_size, request.second_size
        return pb.ConsistencyProof(
            first_size=first, second_size=second, hashes=ref_proof(first, self.tree[:second])
        )

    async def GetInclusionProof(
        self, request: pb.GetInclusionProofRequest, **options: object
    ) -> pb.InclusionProof:
        index = int(request.name.removeprefix("auditEvents/"))
        if index >= request.tree_size:
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "not in that tree")
        return pb.InclusionProof(
            leaf_index=index,
            tree_size=request.tree_size,
            hashes=ref_path(index, self.tree[: request.tree_size]),
        )


@pytest.fixture
def log() -> FakeLog:
    log = FakeLog()
    for count in (5, 12, 1, 20):
        log.append(count)
        log.sign()
    log.append(3)  # events after the latest checkpoint are checked too
    return log


def messages(report: v.Report, check: str) -> list[str]:
    return [finding.message for finding in report.failed(check)]


async def test_an_untouched_log_verifies(log: FakeLog) -> None:
    report = await v.verify(log.stub, log.public_key, samples=5, seed=1)
    assert report.ok, report.summary()
    assert (report.checkpoints, report.tree_size, report.events) == (4, 38, 41)
    assert report.roots_compared == 4
    assert report.consistency_proofs == 3
    assert report.inclusion_proofs >= 3
    assert report.root_hash == ref_mth(log.tree[:38])
    assert "audit log verified" in report.summary()


async def test_a_modified_column_is_named(log: FakeLog) -> None:
    log.events[12].resource = "studies/other"
    report = await v.verify(log.stub, log.public_key)
    assert messages(report, "event") == [
        "event 12: field resource differs from its recorded canonical form"
    ]
    assert not report.ok


async def test_a_deleted_event_is_named(log: FakeLog) -> None:
    del log.events[17]
    report = await v.verify(log.stub, log.public_key)
    assert messages(report, "sequence") == ["event 17 missing"]
    assert "event 17 missing" in report.notes[0]


async def test_swapped_events_are_found(log: FakeLog) -> None:
    first, second = log.events[7], log.events[12]
    for event, index in ((first, 12), (second, 7)):
        event.log_index, event.name = index, f"auditEvents/{index}"
    log.events[7], log.events[12] = second, first
    report = await v.verify(log.stub, log.public_key)
    assert "event 7: field log_index differs from its recorded canonical form" in messages(
        report, "event"
    )
    assert messages(report, "root")[0] == (
        "events up to 16 do not match checkpoint 17: the log was rewritten; "
        "checkpoint 5 still matches"
    )


async def test_a_truncated_tail_is_named(log: FakeLog) -> None:
    del log.events[30:]
    report = await v.verify(log.stub, log.public_key)
    assert messages(report, "sequence") == ["log has 30 events, checkpoint says 38"]


async def test_a_rewritten_log_signed_with_another_key_is_refused(log: FakeLog) -> None:
    forger = FakeLog(history=".9")
    for count in (5, 12, 1, 20):
        forger.append(count)
        forger.sign()
    report = await v.verify(forger.stub, log.public_key)
    forged_id = forger.checkpoints[0].key_id
    assert messages(report, "signature") == [
        f"checkpoint {size} signed by unknown key {forged_id}" for size in (5, 17, 18, 38)
    ]


async def test_a_rewritten_event_with_a_matching_leaf_hash_breaks_the_roots(log: FakeLog) -> None:
    event = log.events[20]
    recorded = json.loads(event.canonical)
    recorded["resource"] = event.resource = "studies/rewritten"
    event.canonical = v.canonical_bytes(recorded)
    event.leaf_hash = v.leaf_hash(event.canonical)
    report = await v.verify(log.stub, log.public_key, samples=40)
    assert messages(report, "event") == []
    assert messages(report, "root") == [
        "events up to 37 do not match checkpoint 38: the log was rewritten; "
        "checkpoint 18 still matches"
    ]
    assert "event 20: its inclusion proof in checkpoint 38 does not verify" in " ".join(
        messages(report, "inclusion")
    )


async def test_a_leaf_hash_that_is_not_the_hash_of_the_event(log: FakeLog) -> None:
    log.events[2].leaf_hash = SOME_HASH
    report = await v.verify(log.stub, log.public_key)
    assert messages(report, "event") == ["event 2: its leaf hash is not SHA-256(0x00 || canonical)"]


async def test_a_forked_checkpoint_is_not_consistent(log: FakeLog) -> None:
    honest = log.tree[:]
    log.tree[1] = SOME_HASH  # the log signs a tree that does not extend its past
    log.sign()
    log.tree = honest
    report = await v.verify(log.stub, log.public_key)
    assert messages(report, "consistency")[0].startswith(
        "checkpoint 41 is not consistent with checkpoint 38"
    )


async def test_a_checkpoint_whose_served_fields_lie(log: FakeLog) -> None:
    log.checkpoints[1].root_hash = SOME_HASH
    log.checkpoints[2].key_id = "0" * 64
    report = await v.verify(log.stub, log.public_key)
    assert messages(report, "checkpoint") == [
        "checkpoint 17: field root_hash differs from its signed body",
        "checkpoint 18: field key_id differs from its signed body",
    ]


async def test_a_bad_signature_under_the_trusted_key_id(log: FakeLog) -> None:
    log.checkpoints[0].signature = bytes(64)
    report = await v.verify(log.stub, log.public_key)
    assert messages(report, "signature") == [
        "checkpoint 5: its signature does not verify under the trusted key"
    ]


async def test_checkpoints_across_a_signing_key_rotation(log: FakeLog) -> None:
    old = log.public_key
    log.key = Ed25519PrivateKey.generate()  # the log restarted with a new signing key
    log.sign()
    log.append(2)
    log.sign()
    new = log.public_key
    report = await v.verify(log.stub, [old, new])
    assert report.ok, report.summary()
    assert report.consistency_proofs == 5  # across the rotation too
    assert report.signed_by == {v.key_id(old): 4, v.key_id(new): 2}
    assert f"4 by key {v.key_id(old)[:16]}…" in report.summary()
    assert f"2 by key {v.key_id(new)[:16]}…" in report.summary()

    report = await v.verify(log.stub, new)  # the old key not trusted
    assert messages(report, "signature") == [
        f"checkpoint {size} signed by unknown key {v.key_id(old)}" for size in (5, 17, 18, 38)
    ]
    assert report.signed_by == {v.key_id(new): 2}

    # Each checkpoint verifies under the key its key id names, not under any trusted one.
    log.checkpoints[0].key_id = v.key_id(new)
    report = await v.verify(log.stub, [old, new])
    assert messages(report, "signature") == [
        "checkpoint 5: its signature does not verify under the trusted key"
    ]


async def test_a_log_without_checkpoints_proves_nothing() -> None:
    log = FakeLog()
    log.append(3)
    report = await v.verify(log.stub, log.public_key)
    assert messages(report, "checkpoint") == ["the log has no signed checkpoint to verify against"]


async def test_remembered_checkpoint_must_be_extended(log: FakeLog) -> None:
    kept = log.checkpoints[-1]
    log.append(4)
    log.sign()
    report = await v.verify(log.stub, log.public_key, remembered=kept)
    assert report.ok, report.summary()

    shrunk = FakeLog(log.key)
    shrunk.append(10)
    shrunk.sign()
    report = await v.verify(shrunk.stub, shrunk.public_key, remembered=kept)
    assert messages(report, "remembered") == [
        "checkpoint 10 comes after remembered checkpoint 38: the log shrank"
    ]

    forked = FakeLog(log.key, ".9")  # same key, another history: a split view
    forked.append(50)
    forked.sign()
    report = await v.verify(forked.stub, forked.public_key, remembered=kept)
    assert messages(report, "remembered")[0].startswith(
        "checkpoint 50 is not consistent with remembered checkpoint 38"
    )
    assert "do not match remembered checkpoint 38" in " ".join(messages(report, "root"))


def test_remembered_file_round_trip(tmp_path: Path, log: FakeLog) -> None:
    path = tmp_path / "audit.checkpoint"
    assert v.read_remembered(path) is None
    v.write_remembered(path, log.checkpoints[-1])
    kept = v.read_remembered(path)
    assert kept is not None
    assert (kept.body, kept.signature) == (log.checkpoints[-1].body, log.checkpoints[-1].signature)


def test_served_fields_format() -> None:
    log = FakeLog()
    log.append(2)
    assert v.canonical_bytes(v.served_fields(log.events[1])) == log.events[1].canonical
