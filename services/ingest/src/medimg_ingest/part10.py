"""DICOM Part 10 bytes of a dataset: what `pydicom.dcmwrite(..., enforce_file_format=True)`
writes, byte for byte, at a fraction of its cost for datasets read from Explicit VR Little
Endian files.

pydicom spends some 20 us of bookkeeping on every element it writes (more on this shared
machine) and copies the pixel data four times on the way; for an instance that is most of
the cost of storing it. Here an element that was read and never accessed (a raw element)
becomes its header and its value as read, which is what pydicom writes for it too; plain
single values (text, UIDs, names, binary numbers) and sequences are encoded as pydicom's
writers encode them; and the parts are joined once. Anything else (other value types, a
dataset whose encoding or character set pydicom would change, values pydicom refuses or
rewrites) goes through pydicom's own writer, element by element or as a whole, so the
output is always pydicom's: `tests/test_part10.py` holds the two to the same bytes over the
whole test corpus, de-identified and not.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Iterable
from io import BytesIO

import pydicom
from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.tag import BaseTag, tag_in_exception
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, PersonName

_PIXEL_DATA = 0x7FE00010
_GROUP_LENGTH = 0x00020000
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
#: (implicit VR, little endian): the one encoding written here.
_EXPLICIT_LITTLE = (False, True)

#: VRs pydicom writes with `write_string`: the text in the default character set, padded
#: with a space (UI: a NUL). DA, DT and TM only when the value is text, not a date object.
_STRING_PADDING = {
    "AE": b" ",
    "AS": b" ",
    "CS": b" ",
    "UR": b" ",
    "DA": b" ",
    "DT": b" ",
    "TM": b" ",
    "UI": b"\x00",
}
#: VRs pydicom writes with `write_text`: in the dataset's character set, padded with a space.
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
#: VRs pydicom writes with `write_numbers`, and their struct formats (little endian).
_NUMBER_FORMATS = {
    "US": "<H",
    "UL": "<L",
    "SS": "<h",
    "SL": "<l",
    "UV": "<Q",
    "SV": "<q",
    "FL": "<f",
    "FD": "<d",
}

#: VRs pydicom writes with `write_OBvalue` or `write_OWvalue`: the bytes, padded with a NUL.
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})

_Encodings = list[str]


def encode(dataset: Dataset) -> bytes:
    """The Part 10 file of `dataset` (preamble, file meta, data set), as pydicom writes it
    with `enforce_file_format=True`; raises what pydicom raises for a dataset it cannot
    write (TypeError, ValueError, AttributeError, struct.error)."""
    if not _is_explicit_little_file(dataset):
        out = BytesIO()
        pydicom.dcmwrite(out, dataset, enforce_file_format=True)
        return out.getvalue()
    parts = [_preamble_and_meta(dataset)]
    syntax = UID(dataset.file_meta.TransferSyntaxUID)
    if "PixelData" in dataset:
        # As dcmwrite does (which also converts the element in the dataset).
        dataset["PixelData"].is_undefined_length = syntax.is_compressed
    _write_elements(dataset, dataset.get("SpecificCharacterSet", default_encoding), parts)
    return b"".join(parts)


def _is_explicit_little_file(dataset: Dataset) -> bool:
    """Whether dcmwrite would write `dataset` in Explicit VR Little Endian, not deflated,
    and without refusing it before it writes a byte."""
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not isinstance(syntax, UID) or syntax.is_private or not syntax.is_transfer_syntax:
        return False
    if syntax.is_deflated or (syntax.is_implicit_VR, syntax.is_little_endian) != _EXPLICIT_LITTLE:
        return False
    preamble = getattr(dataset, "preamble", None)
    if preamble and len(preamble) != 128:
        return False
    # Command and file meta elements in the data set: dcmwrite refuses them. (Iterating
    # the dataset itself would convert its elements: its keys are what is wanted.)
    return not any(tag >> 16 in (0, 2) for tag in dataset.keys())  # noqa: SIM118


def _writes_as_read(dataset: Dataset) -> bool:
    """Whether pydicom's `write_dataset` writes this dataset's raw elements as read: it was
    read in Explicit VR Little Endian and its character set is the one it was read in.
    Otherwise pydicom corrects ambiguous VRs and converts and re-encodes every element."""
    return (
        dataset.original_encoding == _EXPLICIT_LITTLE
        and dataset.original_character_set == dataset._character_set
    )


def _preamble_and_meta(dataset: Dataset) -> bytes:
    """The preamble, "DICM" and the file meta group, as `dcmwrite` and
    `write_file_meta_info` make them."""
    source = dataset.file_meta
    meta = FileMetaDataset()  # dcmwrite writes a copy and leaves the dataset's own as it was
    for tag in source.keys():  # noqa: SIM118 - the elements as they are, not converted
        element = source.get_item(tag)
        meta[tag] = copy.copy(element) if isinstance(element, DataElement) else element
    is_implicit, is_little = source.original_encoding
    meta.set_original_encoding(is_implicit, is_little, source.original_character_set)
    for meta_keyword, keyword in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        in_meta, in_dataset = meta.get(meta_keyword), dataset.get(keyword)
        if in_meta is None or (in_dataset and in_dataset != in_meta):
            setattr(meta, meta_keyword, in_dataset)
    validate_file_meta(meta, enforce_standard=True)
    if "FileMetaInformationGroupLength" not in meta:
        meta.FileMetaInformationGroupLength = 0
    parts = [getattr(dataset, "preamble", None) or b"\x00" * 128, b"DICM"]
    _write_elements(meta, default_encoding, parts)
    # The group length counts the bytes after its own element (12 bytes, written first).
    meta.FileMetaInformationGroupLength = sum(map(len, parts[2:])) - 12
    group_length = meta[_GROUP_LENGTH]
    encoded = _encoded(group_length, [default_encoding])
    if encoded is None:
        buffer = _buffer()
        write_data_element(buffer, group_length)
        encoded = [buffer.getvalue()]
    first = b"".join(parts[2:])
    return b"".join([*parts[:2], *encoded, first[12:]])


def _write_elements(
    dataset: Dataset, character_set: str | Iterable[str] | None, parts: list[bytes]
) -> None:
    """Appends the encoded elements of `dataset` to `parts`, in tag order, as
    `pydicom.filewriter.write_dataset` encodes them. `character_set` is the dataset's
    Specific Character Set value, or its parent's encodings."""
    # What write_dataset does to a dataset it writes in another encoding or character set
    # than it was read in (or to one that was never read): it corrects ambiguous VRs and
    # converts every raw element before encoding it.
    convert = not _writes_as_read(dataset)
    if convert:
        correct_ambiguous_vr(dataset, True)
    encodings = convert_encodings(character_set or [default_encoding])  # type: ignore[arg-type]
    # Consecutive elements that pydicom encodes, written into one buffer.
    encoded = _buffer()
    for tag in sorted(dataset.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # retired group lengths are not written (PS3.5 7.2)
        if convert:
            with tag_in_exception(tag):
                item: DataElement | RawDataElement = dataset[tag]
        else:
            item = dataset.get_item(tag)
        element = _as_read(tag, item)
        if element is None and isinstance(item, DataElement):
            element = _encoded(item, encodings)
        if element is None:
            with tag_in_exception(tag):
                write_data_element(encoded, item, character_set)  # type: ignore[arg-type]
            continue
        if encoded.tell():
            parts.append(encoded.getvalue())
            encoded = _buffer()
        parts += element
    if encoded.tell():
        parts.append(encoded.getvalue())


def _buffer() -> DicomBytesIO:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = _EXPLICIT_LITTLE
    return buffer


def _header(tag: int, vr: str, length: int) -> bytes | None:
    """Tag, VR and length of an element, or None where pydicom would write another VR."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + bytes(vr, default_encoding)
    if vr in EXPLICIT_VR_LENGTH_32:
        return head + struct.pack("<HL", 0, length)
    if length > 0xFFFF:
        return None  # pydicom writes it as UN, with a warning
    return head + struct.pack("<H", length)


def _as_read(tag: BaseTag, item: DataElement | RawDataElement) -> list[bytes] | None:
    """The element's header, value and delimiter when its value is written as it is: a raw
    element, or pixel data held as bytes. None for whatever pydicom is to encode (other
    elements, and the rare cases where pydicom changes the value or the VR, or refuses)."""
    if isinstance(item, RawDataElement):
        value, vr = item.value, item.VR
        undefined = item.length == _UNDEFINED_LENGTH
    elif tag == _PIXEL_DATA and item.VR in ("OB", "OW") and not item.is_buffered:
        value, vr = item.value, item.VR
        undefined = item.is_undefined_length
        if not isinstance(value, bytes) or len(value) % 2:
            return None  # pydicom pads an odd length
    else:
        return None
    if not isinstance(value, bytes) or vr is None or len(vr) != 2:
        return None
    if undefined:
        if vr not in EXPLICIT_VR_LENGTH_32 or (tag == _PIXEL_DATA and not value.startswith(_ITEM)):
            return None  # pydicom refuses these: let it say why
        return [_header(tag, vr, _UNDEFINED_LENGTH) or b"", value, _SEQUENCE_DELIMITER]
    head = _header(tag, vr, len(value))
    return None if head is None else [head, value]


def _encoded(element: DataElement, encodings: _Encodings) -> list[bytes] | None:
    """A converted element encoded as pydicom's writers encode it, where its value is one
    of the plain kinds handled here; None for pydicom to encode (or refuse) it."""
    vr = element.VR
    if element.is_undefined_length and vr != "SQ":
        return None
    try:
        if vr == "SQ":
            return _sequence(element, encodings)
        value = b"" if element.is_empty else _value(vr, element.value, encodings)
    except Exception:  # noqa: BLE001 - pydicom encodes it again, and raises what it raises
        return None
    if value is None:
        return None
    head = _header(element.tag, vr, len(value))
    return None if head is None else [head, value]


def _value(vr: str, value: object, encodings: _Encodings) -> bytes | None:
    """A single value as pydicom writes it (padded to even length), or None."""
    kind = type(value)
    if kind is str or kind is UID:
        text = str(value)
        if vr in _STRING_PADDING:
            data, padding = text.encode(default_encoding), _STRING_PADDING[vr]
        elif vr in _TEXT_VRS:
            data, padding = encode_string(text, encodings), b" "
        else:
            return None
    elif vr == "PN" and kind is PersonName:
        data, padding = value.encode(encodings), b" "  # type: ignore[attr-defined]
    elif vr in _NUMBER_FORMATS and (kind is int or (kind is float and vr in ("FL", "FD"))):
        return struct.pack(_NUMBER_FORMATS[vr], value)
    elif vr in _BINARY_VRS and kind is bytes:
        data, padding = value, b"\x00"  # type: ignore[assignment]
    else:
        return None
    return data + padding if len(data) % 2 else data


def _sequence(element: DataElement, encodings: _Encodings) -> list[bytes] | None:
    """A sequence as `write_sequence` writes it: each item with its length (or delimited,
    as it was read), the sequence with its length or delimited."""
    parts: list[bytes] = []
    for item in element.value if not element.is_empty else ():
        if not isinstance(item, Dataset):
            return None
        body: list[bytes] = []
        _write_elements(item, item.get("SpecificCharacterSet", encodings), body)
        if getattr(item, "is_undefined_length_sequence_item", False):
            parts += [_ITEM + struct.pack("<L", _UNDEFINED_LENGTH), *body, _ITEM_DELIMITER]
        else:
            parts += [_ITEM + struct.pack("<L", sum(map(len, body))), *body]
    if element.is_undefined_length:
        return [_header(element.tag, "SQ", _UNDEFINED_LENGTH) or b"", *parts, _SEQUENCE_DELIMITER]
    return [_header(element.tag, "SQ", sum(map(len, parts))) or b"", *parts]
