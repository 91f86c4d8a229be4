"""DICOMweb (PS3.18) over the pipeline and the index: STOW-RS bodies in, QIDO-RS and WADO-RS
answers out. It knows media types, multipart bodies and the DICOM JSON model (PS3.18
Annex F), and nothing of gRPC.

Every answer is built from the de-identified index and objects: the UIDs in it are the
replaced ones, Patient ID is the pseudonym.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.uid import ExplicitVRLittleEndian

from medimg_core.errors import InvalidArgument
from medimg_ingest import search
from medimg_ingest.pipeline import Outcome, Result

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
MULTIPART = "multipart/related"

#: Query parameters by name, each with its values in order (as the gateway passes them).
Params = Mapping[str, Sequence[str]]

# Failure and warning reasons of a STOW-RS response (PS3.18 I.2.2, PS3.4 Annex C.4.2).
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
DOES_NOT_MATCH = 0xA900
#: The instance was stored but is held back (quarantine): it is not retrievable yet.
HELD_BACK = 0xB000


class NotAcceptable(InvalidArgument):
    """Accept allows no representation the server has; the gateway answers 406."""

    def __init__(self, message: str) -> None:
        super().__init__("NOT_ACCEPTABLE", message)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: its status, media type and body."""

    status: int
    content_type: str
    body: bytes


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """The media type of a Content-Type or Accept value (lower case) and its parameters."""
    header = Message()
    header["content-type"] = value
    params = {k.lower(): str(v) for k, v in header.get_params(failobj=[])[1:]}
    return header.get_content_type(), params


# --- STOW-RS ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One part of a multipart/related body: its media type (with parameters, as sent), its
    Content-Location (how DICOM JSON's BulkDataURIs name it) and its bytes."""

    content_type: str
    location: str
    data: bytes


def split_multipart(content_type: str, body: bytes) -> tuple[str, list[Part]]:
    """The root type and the parts of a STOW-RS body: multipart/related (RFC 2387) with
    type="application/dicom" parts (Part 10 files), or type="application/dicom+json" (DICOM
    JSON metadata, then bulk data parts). InvalidArgument names what is wrong with the body."""
    kind, params = media_type(content_type)
    if kind != MULTIPART:
        raise InvalidArgument(
            "UNSUPPORTED_MEDIA_TYPE",
            f'the body must be {MULTIPART}; type="{DICOM}" or type="{DICOM_JSON}", '
            f"not {kind or 'untyped'}",
        )
    root = params.get("type", DICOM).lower()
    if root not in (DICOM, DICOM_JSON):
        raise InvalidArgument(
            "UNSUPPORTED_MEDIA_TYPE",
            f"{root} is not stored: send DICOM Part 10 files ({DICOM}) or DICOM JSON with "
            f"its bulk data ({DICOM_JSON})",
        )
    boundary = params.get("boundary", "")
    if not boundary:
        raise InvalidArgument("INVALID_MULTIPART", "the Content-Type has no boundary parameter")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    sections = (b"\r\n" + body).split(delimiter)
    parts: list[Part] = []
    for number, section in enumerate(sections[1:], start=1):
        if section.startswith(b"--"):
            break  # the close delimiter; what follows is the epilogue
        head, blank, content = section.partition(b"\r\n\r\n")
        if not blank:
            raise InvalidArgument(
                "INVALID_MULTIPART", f"part {number} has no blank line after its headers"
            )
        part_type = _header(head, "content-type") or root
        if root == DICOM and media_type(part_type)[0] != DICOM:
            raise InvalidArgument(
                "UNSUPPORTED_MEDIA_TYPE",
                f"part {number} is {media_type(part_type)[0]}: only {DICOM} parts are stored",
            )
        parts.append(Part(part_type, _header(head, "content-location"), content))
    else:
        raise InvalidArgument(
            "INVALID_MULTIPART",
            f"the body does not end with the close delimiter --{boundary}-- (truncated?)",
        )
    if not parts:
        raise InvalidArgument("INVALID_MULTIPART", "the body has no part")
    return root, parts


def _header(head: bytes, name: str) -> str:
    for line in head.decode("latin-1").split("\r\n"):
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == name:
            return value.strip()
    return ""


_FAILURES = {
    "UNSUPPORTED_TRANSFER_SYNTAX": TRANSFER_SYNTAX_NOT_SUPPORTED,
    "UNDECODABLE_PIXEL_DATA": PROCESSING_FAILURE,
    "INCONSISTENT_PIXEL_DATA": PROCESSING_FAILURE,
    "STUDY_MISMATCH": DOES_NOT_MATCH,
}


def store_answer(results: Sequence[Result], sop_classes: Mapping[str, str]) -> Answer:
    """The STOW-RS response: 200 when every instance is stored, 202 when some failed (or
    are held back), 409 when all failed. `sop_classes` maps the stored instances' names to
    their SOP Class UIDs."""
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for result in results:
        item = _store_item(result, sop_classes)
        (failed if "00081197" in item else referenced).append(item)
    answer: dict[str, Any] = {}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        answer["00081199"] = {"vr": "SQ", "Value": referenced}
    if not failed and all(r.outcome is not Outcome.QUARANTINED for r in results):
        status = 200
    elif referenced:
        status = 202
    else:
        status = 409
    return Answer(status, DICOM_JSON, json.dumps(answer).encode())


def _store_item(result: Result, sop_classes: Mapping[str, str]) -> dict[str, Any]:
    """The instance's item of the Referenced SOP Sequence, or of the Failed SOP Sequence
    (with a Failure Reason) if it was refused."""
    item: dict[str, Any] = {}
    if result.instance:
        if result.instance in sop_classes:
            item["00081150"] = _value("UI", sop_classes[result.instance])
        item["00081155"] = _value("UI", result.instance.rsplit("/", 1)[-1])
    if result.outcome in (Outcome.STORED, Outcome.DUPLICATE):
        item["00081190"] = _value("UR", f"/dicomweb/{result.instance}")
    elif result.outcome is Outcome.QUARANTINED:
        item["00081196"] = _value("US", HELD_BACK)
    else:
        conflict = result.outcome is Outcome.CONFLICT
        reason = (
            DUPLICATE_SOP_INSTANCE if conflict else _FAILURES.get(result.reason, CANNOT_UNDERSTAND)
        )
        item["00081197"] = _value("US", reason)
        # Not an attribute of the standard response, but what a person needs to fix it.
        item["00000902"] = _value("LO", f"{result.reason}: {result.message}"[:64])
    return item


# --- QIDO-RS ---------------------------------------------------------------------------

_STUDY_KEYS = frozenset(
    {
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "StudyDate",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ModalitiesInStudy",
    }
)
_SERIES_KEYS = frozenset(
    {"StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"}
)
_INSTANCE_KEYS = frozenset(
    {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "Modality",
        "InstanceNumber",
    }
)
_CONTROLS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


@dataclass(frozen=True)
class Search:
    """A QIDO-RS query: its matching keys (by DICOM keyword) and its paging."""

    keys: dict[str, str] = field(default_factory=dict)
    limit: int = 100
    offset: int = 0

    def uids(self, keyword: str) -> list[str]:
        """A list-of-values key (comma or backslash separated)."""
        value = self.keys.get(keyword, "")
        return [v.strip() for v in value.replace("\\", ",").split(",") if v.strip()]

    def number(self, keyword: str) -> int | None:
        value = self.keys.get(keyword, "")
        if not value:
            return None
        if not value.isdigit():
            raise InvalidArgument("INVALID_QUERY_VALUE", f"{keyword} must be a number")
        return int(value)


def parse_search(params: Params, supported: frozenset[str]) -> Search:
    """The query of QIDO-RS parameters. A key is a DICOM keyword or tag (`PatientID` or
    `00100020`); one the index cannot match on is refused, naming those it can."""
    keys: dict[str, str] = {}
    for name, values in params.items():
        if name in _CONTROLS:
            continue
        keyword = _keyword(name)
        if keyword not in supported:
            raise InvalidArgument(
                "UNSUPPORTED_QUERY_KEY",
                f"{name} is not a key this search matches on; keys: {', '.join(sorted(supported))}",
            )
        if len(values) != 1:
            raise InvalidArgument("INVALID_QUERY_VALUE", f"{name} is given more than once")
        keys[keyword] = values[0]
    for name in params.get("includefield", ()):
        for item in name.split(","):
            if item.strip() and item.strip() != "all":
                _keyword(item.strip())  # refuses what is not an attribute
    for value in params.get("fuzzymatching", ()):
        if value not in ("true", "false"):
            raise InvalidArgument("INVALID_QUERY_VALUE", "fuzzymatching is true or false")
    return Search(keys, _count(params, "limit", 100), _count(params, "offset", 0))


def _keyword(name: str) -> str:
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
    else:
        keyword = name if tag_for_keyword(name) is not None else ""
    if not keyword:
        raise InvalidArgument(
            "UNKNOWN_ATTRIBUTE", f"{name} is neither a DICOM keyword nor a tag (ggggeeee)"
        )
    return keyword


def _count(params: Params, name: str, default: int) -> int:
    values = params.get(name, ())
    if not values:
        return default
    if len(values) != 1 or not values[0].isdigit():
        raise InvalidArgument("INVALID_QUERY_VALUE", f"{name} must be one non-negative integer")
    return int(values[0])


def study_search(params: Params) -> search.StudyQuery:
    query = parse_search(params, _STUDY_KEYS)
    return search.StudyQuery(
        # Patient Name is de-identified to the pseudonym too: either key finds the patient.
        patient_id=query.keys.get("PatientID", "") or query.keys.get("PatientName", ""),
        study_uids=query.uids("StudyInstanceUID"),
        study_date=query.keys.get("StudyDate", ""),
        accession_number=query.keys.get("AccessionNumber", ""),
        study_id=query.keys.get("StudyID", ""),
        study_description=query.keys.get("StudyDescription", ""),
        modalities=query.uids("ModalitiesInStudy"),
        limit=query.limit,
        offset=query.offset,
    )


def series_search(params: Params, study_uid: str) -> search.SeriesQuery:
    query = parse_search(params, _SERIES_KEYS)
    return search.SeriesQuery(
        study_uid=study_uid or query.keys.get("StudyInstanceUID", ""),
        series_uids=query.uids("SeriesInstanceUID"),
        modality=query.keys.get("Modality", ""),
        series_number=query.number("SeriesNumber"),
        series_description=query.keys.get("SeriesDescription", ""),
        limit=query.limit,
        offset=query.offset,
    )


def instance_search(params: Params, study_uid: str, series_uid: str) -> search.InstanceQuery:
    query = parse_search(params, _INSTANCE_KEYS)
    return search.InstanceQuery(
        study_uid=study_uid or query.keys.get("StudyInstanceUID", ""),
        series_uid=series_uid or query.keys.get("SeriesInstanceUID", ""),
        sop_instance_uids=query.uids("SOPInstanceUID"),
        sop_class_uids=query.uids("SOPClassUID"),
        modality=query.keys.get("Modality", ""),
        instance_number=query.number("InstanceNumber"),
        limit=query.limit,
        offset=query.offset,
    )


def studies_json(studies: Sequence[search.StudyRecord]) -> bytes:
    return _json_array(
        {
            "00080020": _value("DA", s.study_date.strftime("%Y%m%d") if s.study_date else ""),
            "00080030": _value("TM", s.study_time),
            "00080050": _value("SH", s.accession_number),
            "00080061": _value("CS", *s.modalities),
            "00081030": _value("LO", s.study_description),
            "00081190": _value("UR", f"/dicomweb/studies/{s.study_uid}"),
            "00100010": _value("PN", s.patient_id),
            "00100020": _value("LO", s.patient_id),
            "0020000D": _value("UI", s.study_uid),
            "00200010": _value("SH", s.study_id),
            "00201206": _value("IS", s.series_count),
            "00201208": _value("IS", s.instance_count),
        }
        for s in studies
    )


def series_json(series: Sequence[search.SeriesRecord]) -> bytes:
    return _json_array(
        {
            "00080060": _value("CS", s.modality),
            "0008103E": _value("LO", s.series_description),
            "00081190": _value("UR", f"/dicomweb/studies/{s.study_uid}/series/{s.series_uid}"),
            "00180015": _value("CS", s.body_part_examined),
            "0020000D": _value("UI", s.study_uid),
            "0020000E": _value("UI", s.series_uid),
            "00200011": _value("IS", s.series_number),
            "00201209": _value("IS", s.instance_count),
        }
        for s in series
    )


def instances_json(instances: Sequence[search.InstanceRecord]) -> bytes:
    return _json_array(
        {
            "00080016": _value("UI", i.sop_class_uid),
            "00080018": _value("UI", i.sop_instance_uid),
            "00080060": _value("CS", i.modality),
            "00081190": _value(
                "UR",
                f"/dicomweb/studies/{i.study_uid}/series/{i.series_uid}"
                f"/instances/{i.sop_instance_uid}",
            ),
            "00083002": _value("UI", i.transfer_syntax),
            "0020000D": _value("UI", i.study_uid),
            "0020000E": _value("UI", i.series_uid),
            "00200013": _value("IS", i.instance_number),
            "00280008": _value("IS", i.number_of_frames),
            "00280010": _value("US", i.rows),
            "00280011": _value("US", i.columns),
        }
        for i in instances
    )


def _value(vr: str, *values: object) -> dict[str, Any]:
    """One attribute of the DICOM JSON model; empty values leave out "Value"."""
    present = [v for v in values if v is not None and v != ""]
    if not present:
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(v)} for v in present]}
    if vr in ("IS", "US"):
        return {"vr": vr, "Value": [int(str(v)) for v in present]}
    return {"vr": vr, "Value": [str(v) for v in present]}


def _json_array(items: Iterator[dict[str, Any]]) -> bytes:
    return json.dumps([{k: v for k, v in sorted(item.items())} for item in items]).encode()


# --- WADO-RS ---------------------------------------------------------------------------


def wanted_transfer_syntax(accept: str) -> str:
    """The transfer syntax a WADO-RS Accept asks for: `*` for the stored one, else a UID.
    Without a transfer-syntax parameter PS3.18 8.7.3.5.2 means Explicit VR Little Endian."""
    if not accept.strip() or accept.strip() == "*/*":
        return "*"
    choices = []
    for item in accept.split(","):
        kind, params = media_type(item)
        if kind in (MULTIPART, "*/*") and params.get("type", DICOM).lower() in (DICOM, "*/*"):
            choices.append(params.get("transfer-syntax", ExplicitVRLittleEndian))
    if not choices:
        raise NotAcceptable(
            f'instances are sent as {MULTIPART}; type="{DICOM}"; Accept allows neither',
        )
    return "*" if "*" in choices else choices[0]


def check_servable(stored_syntax: str, wanted: str) -> None:
    """Refuses a transfer syntax an instance cannot be sent in (before anything is sent)."""
    if wanted not in ("*", stored_syntax, ExplicitVRLittleEndian):
        raise NotAcceptable(
            f"instances are served as stored ({stored_syntax}) or as "
            f"{ExplicitVRLittleEndian}, not as {wanted}: ask for transfer-syntax=*",
        )


def transcoded(data: bytes, stored_syntax: str, wanted: str) -> bytes:
    """The stored instance in the wanted transfer syntax: as stored when that is it, else
    decoded to Explicit VR Little Endian (the only other one served)."""
    check_servable(stored_syntax, wanted)
    if wanted in ("*", stored_syntax):
        return data
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.decompress()
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def new_boundary() -> str:
    return f"medimg-{secrets.token_hex(16)}"


def multipart_type(boundary: str, transfer_syntax: str) -> str:
    syntax = "" if transfer_syntax == "*" else f"; transfer-syntax={transfer_syntax}"
    return f'{MULTIPART}; type="{DICOM}"; boundary={boundary}{syntax}'


def part_head(boundary: str, first: bool, content_type: str = DICOM) -> bytes:
    lead = b"" if first else b"\r\n"
    return lead + f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()


def closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode()


#: Binary values longer than this (bytes) are bulk data: the metadata gives a BulkDataURI.
BULK_DATA_THRESHOLD = 1024
#: The value representations whose values are bytes (PS3.18 F.2.7: bulk data candidates).
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: Pixel Data, Float Pixel Data, Double Float Pixel Data: bulk data whatever their size.
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def metadata(data: bytes, instance_url: str) -> dict[str, Any]:
    """An instance's attributes in the DICOM JSON model. Pixel data and binary values over
    BULK_DATA_THRESHOLD bytes, at any depth, are given as a BulkDataURI under
    `{instance_url}/bulkdata/`, by tag path (`7FE00010`, `00880200/1/7FE00010`)."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    return _json_with_bulk_data(dataset, f"{instance_url}/bulkdata/", top=True)


def _json_with_bulk_data(dataset: pydicom.Dataset, prefix: str, *, top: bool) -> dict[str, Any]:
    answer: dict[str, Any] = {}
    for element in dataset:  # in tag order; ambiguous VRs resolved by the dataset
        key = f"{element.tag:08X}"
        if element.VR == "SQ":
            items = [
                _json_with_bulk_data(item, f"{prefix}{key}/{number}/", top=False)
                for number, item in enumerate(element.value, start=1)
            ]
            answer[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        elif (
            element.VR in BINARY_VRS
            and element.value
            and (len(element.value) > BULK_DATA_THRESHOLD or (top and element.tag in PIXEL_TAGS))
        ):
            answer[key] = {"vr": element.VR, "BulkDataURI": f"{prefix}{key}"}
        else:
            answer[key] = element.to_json_dict(None, BULK_DATA_THRESHOLD)
    return answer
