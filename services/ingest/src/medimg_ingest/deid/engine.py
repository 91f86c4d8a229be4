"""Applies Table E.1-1 to one instance: a new, de-identified dataset; the input is left as it was.

Rules beyond the table's rows, each chosen to keep the output valid or to leak less:

* The table's actions apply at every depth of every sequence. A retained sequence (K, C, or
  the U of X/Z/U*) keeps its items, each de-identified by the same table. A dummied sequence
  (D) keeps its items too, but inside it every text, name, date and AE value the table does not
  list is replaced by a dummy, since such sequences (Content Sequence, Person Identification
  Code Sequence...) carry identities in generic attributes such as Code Value.
* Patient ID, at any depth, becomes the keyed pseudonym of its value; the top-level Patient's
  Name becomes the same pseudonym (a stable, PHI-free label for viewers and worklists).
* Public attributes not in the table are kept, except that with Modified Dates every DA and DT
  value shifts, listed or not, so that no unlisted date gives the offset away.
* Private attributes go, unless Retain Safe Private keeps those in `safe_private.csv` (with
  the private creator of their block) whose values are numbers or code strings of their VR.
* Group lengths go (stale once anything is removed), and so does a whole overlay group when
  the table removes its Overlay Data: an overlay plane without its data is not valid.
* The file meta is rebuilt: its UIDs follow the new SOP Instance UID, and the AE titles of the
  sending and receiving applications (which name sites) are not carried over.

Pixel data is never decoded or copied: unchanged elements are shared with the input as
pydicom's immutable raw elements.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, MutableSequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from medimg_ingest.deid import keyed, values
from medimg_ingest.deid.policy import Policy
from medimg_ingest.deid.table import (
    Action,
    ResolvedTable,
    load_table,
    resolved_table,
    safe_private_vrs,
)

_PATIENT_ID = 0x00100020
_STUDY_INSTANCE_UID = 0x0020000D
_OVERLAY_DATA = 0x60003000
#: Written by the engine itself, so never copied from the input.
_MARKERS = frozenset({0x00120062, 0x00120063, 0x00120064, 0x00280303})

#: Attributes whose values (and name components) the text cleaner removes from descriptors.
_IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
)

#: PS3.16 CID 7050 (De-identification Method), coding scheme DCM.
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
#: The CID 7050 code of each option, by the Policy flag that turns it on.
OPTION_CODES = {
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_modified_dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
}

_Item = DataElement | RawDataElement
_Encoding = str | MutableSequence[str]


@dataclass(frozen=True)
class DeidResult:
    dataset: Dataset = field(repr=False)
    """The de-identified instance, with its own file meta; shares no mutable state with the
    input."""
    pseudonym: keyed.Pseudonym
    date_offset_days: int | None
    """The shift applied to this patient's dates (None without the Modified Dates option)."""
    patient_id_original: str = field(repr=False)
    """PHI: the Patient ID the pseudonym stands for, for the caller to store encrypted (the
    re-identification link). Never log it; it is left out of repr() for that reason."""


def deidentify(dataset: Dataset, policy: Policy, key: bytes) -> DeidResult:
    """De-identifies one instance by PS3.15 Table E.1-1 with the options `policy` selects.

    `key` (at least 32 bytes) drives every replacement: UIDs, the pseudonym and the date
    offset are the same for the same key in every process and unrelated under another key.
    """
    keyed.check_key(key)
    patient_id = _text(dataset, _PATIENT_ID)
    # Without a Patient ID each study stands alone rather than every such study being merged
    # into one pseudonymous patient.
    patient_key = patient_id or "study:" + _text(dataset, _STUDY_INSTANCE_UID)
    pseudonym = keyed.pseudonym(key, patient_key)
    offset = keyed.date_offset_days(key, patient_key) if policy.retain_modified_dates else None
    walker = _Walker(
        table=resolved_table(policy.option_columns()),
        key=key,
        offset=offset,
        safe_private=safe_private_vrs() if policy.retain_safe_private else None,
        source=dataset,
    )
    encoding = dataset.original_character_set or "iso8859"
    result = walker.walk(dataset, encoding, top=True, dummy_text=False)
    result.PatientID = pseudonym
    result.PatientName = pseudonym
    _mark(result, policy, offset)
    result.file_meta = _file_meta(dataset, result, key)
    return DeidResult(result, pseudonym, offset, patient_id)


def _text(dataset: Dataset, tag: int) -> str:
    item = dataset.get_item(tag)
    if item is None:
        return ""
    value = _convert(dataset, item, dataset.original_character_set or "iso8859").value
    return str(value or "").strip()


def _vr_of(tag: BaseTag, item: _Item) -> str:
    """The VR without decoding the value: implicit-VR raw elements carry none, and "UN" may
    stand for a known VR; pydicom's dictionary gives it for public tags."""
    vr = item.VR
    if vr and (vr != "UN" or tag.is_private):
        return str(vr)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _convert(parent: Dataset, item: _Item, encoding: _Encoding) -> DataElement:
    if not isinstance(item, RawDataElement):
        return item
    if item.VR is None and not item.tag.is_private:
        try:
            dictionary_VR(item.tag)
        except KeyError:
            # Unknown to pydicom (newer than its dictionary): raw bytes, without the warning
            # a lookup would raise.
            return _new(item.tag, "UN", item.value)
    return convert_raw_data_element(item, encoding=encoding, ds=parent)


def _new(tag: int, vr: str, value: Any) -> DataElement:
    # The input's own invalid values are carried as they are; validating them here would
    # only log them (possibly PHI) and, under warnings-as-errors, fail good instances.
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


#: Bytes per value of the binary VRs a safe private attribute may have.
_BINARY_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8}
#: What the text of a kept private value may be: numbers (DS, IS, and a ratio "n.nnn:1"
#: written as SH), or a code string (CS). PS3.15 E.3.10 Note 2.
_NUMBERS = re.compile(rb"[0-9+\-.eE: \\]*")
_CODES = re.compile(rb"[A-Z0-9_ \\]*")


def _holds(item: _Item, vr: str) -> bool:
    """Whether a listed private element holds what the safe list says: the element's own VR
    (when the file states one) is the listed one, and its value is numbers or a code string.
    A vendor that reused the element for text, or a damaged file, loses the element."""
    if item.VR not in (None, "UN", vr):
        return False
    value = item.value
    if value is None or isinstance(value, bytes | bytearray):
        raw = bytes(value or b"")  # as read: raw, or decoded as UN
    elif vr in _BINARY_SIZES:
        return True  # decoded by pydicom as numbers of this VR
    else:
        values_ = value if isinstance(value, MutableSequence) else [value]
        raw = "\\".join("" if v is None else str(v) for v in values_).encode("ascii", "replace")
    if vr in _BINARY_SIZES:
        return len(raw) % _BINARY_SIZES[vr] == 0
    text = raw.rstrip(b" \0")
    return (_CODES if vr == "CS" else _NUMBERS).fullmatch(text) is not None


def _copy(item: _Item) -> _Item:
    """An element for the output that no later change to either dataset can reach."""
    if isinstance(item, RawDataElement):
        return item  # an immutable tuple: shared, so pixel data is never copied
    value = item.value
    if isinstance(value, MutableSequence):  # a MultiValue: its own list for the output
        value = list(value)
    return _new(item.tag, item.VR, value)


class _Walker:
    def __init__(
        self,
        *,
        table: ResolvedTable,
        key: bytes,
        offset: int | None,
        safe_private: Mapping[tuple[str, int, int], str] | None,
        source: Dataset,
    ) -> None:
        self._table = table
        self._key = key
        self._offset = offset
        self._safe_private = safe_private
        self._source = source
        self._cleaner: values.TextCleaner | None = None
        self._drop_overlays = table.action(_OVERLAY_DATA) is Action.REMOVE

    def walk(self, source: Dataset, encoding: _Encoding, *, top: bool, dummy_text: bool) -> Dataset:
        encoding = source.original_character_set or encoding
        output = Dataset()
        is_implicit, is_little = source.original_encoding
        output.set_original_encoding(is_implicit, is_little, encoding)
        creators: dict[int, _Item] = {}
        for tag in list(source.keys()):
            item = source.get_item(tag)
            group, element = tag >> 16, tag & 0xFFFF
            if item is None or element == 0 or group == 0x0002:
                continue  # group lengths are stale once anything goes; meta is rebuilt
            if group & 1:
                kept = self._private(
                    source, tag, item, encoding, creators=creators, dummy_text=dummy_text
                )
            elif (top and tag in _MARKERS) or (self._drop_overlays and 0x6000 <= group <= 0x60FF):
                continue
            else:
                kept = self._public(source, tag, item, encoding, dummy_text)
            if kept is not None:
                output[tag] = kept
        for creator_tag, creator in creators.items():
            output[creator_tag] = creator
        return output

    def _private(
        self,
        source: Dataset,
        tag: BaseTag,
        item: _Item,
        encoding: _Encoding,
        *,
        creators: dict[int, _Item],
        dummy_text: bool,
    ) -> _Item | None:
        if self._safe_private is None or tag.element < 0x1000:
            return None  # creators are added back only for blocks that keep an element
        creator_tag = Tag(tag.group, tag.element >> 8)
        creator_item = source.get_item(creator_tag)
        if creator_item is None:
            return None
        creator = _convert(source, creator_item, encoding).value
        if not isinstance(creator, str):
            return None
        vr = self._safe_private.get((creator.strip(" \0"), tag.group, tag.element & 0xFF))
        if vr is None or not _holds(item, vr):
            return None
        creators[creator_tag] = _copy(creator_item)
        return self._keep(source, tag, item, encoding, dummy_text)

    def _public(
        self,
        source: Dataset,
        tag: BaseTag,
        item: _Item,
        encoding: _Encoding,
        dummy_text: bool,
    ) -> _Item | None:
        if tag == _PATIENT_ID:
            value = str(_convert(source, item, encoding).value or "").strip()
            return _new(tag, "LO", keyed.pseudonym(self._key, value) if value else "")
        action = self._table.action(tag)
        if action is Action.REMOVE:
            return None
        vr = _vr_of(tag, item)
        if action is None:
            return self._unlisted(source, tag, item, encoding, vr=vr, dummy_text=dummy_text)
        if action is Action.KEEP:
            return self._keep(source, tag, item, encoding, dummy_text)
        element = _convert(source, item, encoding)
        vr = element.VR
        if action is Action.EMPTY:
            return _new(tag, vr, [] if vr == "SQ" else values.empty(vr))
        if action is Action.CLEAN:
            return self._clean(element, encoding, dummy_text)
        if action is Action.UID and vr == "SQ":
            return self._sequence(element, encoding, dummy_text)
        if vr == "UI":  # U, or D on a UID: a consistent replacement is the safest dummy
            return _new(tag, vr, self._uids(element.value))
        if vr == "SQ":
            return self._sequence(element, encoding, dummy_text=True)
        return _new(tag, vr, values.dummy(vr))

    def _unlisted(
        self,
        source: Dataset,
        tag: BaseTag,
        item: _Item,
        encoding: _Encoding,
        *,
        vr: str,
        dummy_text: bool,
    ) -> _Item | None:
        if vr in values.DATE_VRS and self._offset is not None:
            element = _convert(source, item, encoding)
            return _new(tag, element.VR, values.shift_dates(vr, element.value, self._offset))
        if dummy_text and (vr in values.TEXT_VRS or vr in {"AE", "DA", "DT", "TM"}):
            return _new(tag, vr, values.dummy(vr))
        return self._keep(source, tag, item, encoding, dummy_text)

    def _keep(
        self,
        source: Dataset,
        tag: BaseTag,
        item: _Item,
        encoding: _Encoding,
        dummy_text: bool,
    ) -> _Item:
        if _vr_of(tag, item) != "SQ":
            return _copy(item)
        element = _convert(source, item, encoding)
        if element.VR != "SQ":  # e.g. a private sequence pydicom could only read as UN
            return _copy(item)
        return self._sequence(element, encoding, dummy_text)

    def _sequence(self, element: DataElement, encoding: _Encoding, dummy_text: bool) -> DataElement:
        items = [
            self.walk(item, encoding, top=False, dummy_text=dummy_text) for item in element.value
        ]
        return _new(element.tag, "SQ", Sequence(items))

    def _clean(self, element: DataElement, encoding: _Encoding, dummy_text: bool) -> DataElement:
        """The C action: keep what the option wants, without the identifying detail."""
        tag, vr, value = element.tag, element.VR, element.value
        if vr == "SQ":
            return self._sequence(element, encoding, dummy_text)
        if vr in values.DATE_VRS:
            if self._offset is None:
                return _new(tag, vr, values.empty(vr))
            return _new(tag, vr, values.shift_dates(vr, value, self._offset))
        if vr == "AE":
            return _new(tag, vr, self._map(value, self._application_entity))
        if vr == "PN":
            return _new(tag, vr, values.dummy(vr))
        if vr in values.TEXT_VRS:
            return _new(tag, vr, self._text_cleaner().clean_value(value))
        return _new(tag, vr, value)  # TM under a whole-day shift, codes, numbers

    def _application_entity(self, title: str) -> str:
        return keyed.application_entity(self._key, title.strip())

    def _uid(self, uid: str) -> str:
        return keyed.replacement_uid(self._key, uid.strip(" \0"))

    def _uids(self, value: Any) -> Any:
        return self._map(value, self._uid)

    @staticmethod
    def _map(value: Any, replace: Callable[[str], str]) -> Any:
        if value is None or value == "":
            return value
        if isinstance(value, str):
            return replace(value)
        return [replace(str(item)) if item else "" for item in value]

    def _text_cleaner(self) -> values.TextCleaner:
        if self._cleaner is None:
            self._cleaner = values.TextCleaner(_identifying_fragments(self._source))
        return self._cleaner


def _identifying_fragments(dataset: Dataset) -> Iterator[str]:
    encoding = dataset.original_character_set or "iso8859"
    for keyword in _IDENTIFYING_KEYWORDS:
        item = dataset.get_item(keyword)
        if item is None:
            continue
        value = _convert(dataset, item, encoding).value
        for single in value if isinstance(value, MutableSequence) else [value]:
            text = str(single or "")
            yield text
            # Names also match by their parts ("DOE^JOHN" in a description is "John Doe").
            yield from text.replace("=", "^").replace(",", "^").replace(" ", "^").split("^")


def _mark(dataset: Dataset, policy: Policy, offset: int | None) -> None:
    """The attributes that say how this instance was de-identified (PS3.3 C.7.1.1)."""
    applied = [BASIC_PROFILE_CODE]
    applied += [code for flag, code in OPTION_CODES.items() if getattr(policy, flag)]
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = f"medimg deid, DICOM PS3.15 {load_table().edition} E.1-1"
    codes = []
    for value, meaning in applied:
        code = Dataset()
        code.CodeValue, code.CodeMeaning = value, meaning
        code.CodingSchemeDesignator = "DCM"
        codes.append(code)
    dataset.DeidentificationMethodCodeSequence = Sequence(codes)
    dataset.LongitudinalTemporalInformationModified = "REMOVED" if offset is None else "MODIFIED"


def _file_meta(source: Dataset, result: Dataset, key: bytes) -> FileMetaDataset:
    source_meta = getattr(source, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    sop_class = result.get("SOPClassUID") or source_meta.get("MediaStorageSOPClassUID")
    if sop_class:
        meta.MediaStorageSOPClassUID = sop_class
    instance = str(result.get("SOPInstanceUID") or "")
    if not instance and source_meta.get("MediaStorageSOPInstanceUID"):
        instance = keyed.replacement_uid(key, str(source_meta.MediaStorageSOPInstanceUID))
    meta.MediaStorageSOPInstanceUID = UID(instance) if instance else generate_uid()
    meta.TransferSyntaxUID = UID(source_meta.get("TransferSyntaxUID") or _transfer_syntax(source))
    for keyword in ("ImplementationClassUID", "ImplementationVersionName"):
        if source_meta.get(keyword):
            setattr(meta, keyword, source_meta.get(keyword))
    return meta


def _transfer_syntax(source: Dataset) -> str:
    """The syntax the raw elements were read in, for inputs without file meta."""
    is_implicit, is_little = source.original_encoding
    if is_implicit:
        return str(ImplicitVRLittleEndian)
    if is_little is False:
        return str(ExplicitVRBigEndian)
    return str(ExplicitVRLittleEndian)
