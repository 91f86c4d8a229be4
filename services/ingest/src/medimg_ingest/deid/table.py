"""PS3.15 Table E.1-1 and the safe-private list, loaded from the package's CSV files.

The standard's table is data, not code: `table_e1_1.csv` is a transcription of it, and this
module only parses it and resolves, once per set of options, the single action each tag gets.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache, lru_cache
from importlib import resources
from types import MappingProxyType

TABLE_FILE = "table_e1_1.csv"
SAFE_PRIVATE_FILE = "safe_private.csv"

#: The tag column of the table's one private-attributes row, "(gggg,eeee) where gggg is odd".
PRIVATE_ROW_TAG = "ggggeeee"

_TAG_PATTERN = re.compile(r"[0-9A-Fx]{8}")
_EDITION_PATTERN = re.compile(r"DICOM PS3\.15 (\d{4}[a-e])\b")


class Action(StrEnum):
    """The simple action codes of PS3.15 Table E.1-1a."""

    DUMMY = "D"
    EMPTY = "Z"
    REMOVE = "X"
    KEEP = "K"
    CLEAN = "C"
    UID = "U"


#: How each compound code of Table E.1-1a is resolved without knowing the attribute's Type in
#: the instance's IOD. The standard picks the left alternative for Type 3 attributes and the
#: right one where the IOD needs the attribute (Z for Type 2, D or U for Type 1); we always take
#: the rightmost, so the output stays valid whatever the IOD. A dummy carries no more
#: information than an empty value, and for X/Z/U* sequences "U" keeps the sequence while the
#: table's own U rows (Referenced SOP Instance UID...) replace the UIDs inside it.
COMPOUND_RESOLUTION: Mapping[str, Action] = {
    "Z/D": Action.DUMMY,
    "X/Z": Action.EMPTY,
    "X/D": Action.DUMMY,
    "X/Z/D": Action.DUMMY,
    "X/Z/U*": Action.UID,
}

#: Every code that may appear in the table's cells.
KNOWN_CODES = frozenset({*Action, *COMPOUND_RESOLUTION})


class OptionColumn(StrEnum):
    """The option columns of Table E.1-1, named as in the CSV header."""

    SAFE_PRIVATE = "safe_private"
    UIDS = "uids"
    DEVICE_IDENTITY = "device_identity"
    INSTITUTION_IDENTITY = "institution_identity"
    PATIENT_CHARACTERISTICS = "patient_characteristics"
    FULL_DATES = "full_dates"
    MODIFIED_DATES = "modified_dates"
    CLEAN_DESCRIPTORS = "clean_descriptors"
    CLEAN_STRUCTURED_CONTENT = "clean_structured_content"
    CLEAN_GRAPHICS = "clean_graphics"


#: Which action wins when two enabled options disagree on a row: the first in this order. In
#: Table E.1-1 that only happens as K against C (Retain Device Identity keeps a calibration
#: date that Modified Dates shifts); cleaning still gives the option what it asked for while
#: removing the identifying detail, so C wins.
_OPTION_PRECEDENCE = (
    Action.REMOVE,
    Action.EMPTY,
    Action.DUMMY,
    Action.UID,
    Action.CLEAN,
    Action.KEEP,
)


@dataclass(frozen=True)
class TableRow:
    """One row of Table E.1-1 as written in the CSV."""

    tag: str
    name: str
    basic: str
    options: Mapping[OptionColumn, str]

    def action(self, enabled: frozenset[OptionColumn]) -> Action:
        """The single action for this row when the `enabled` options are on."""
        chosen = [Action(code) for column, code in self.options.items() if column in enabled]
        if chosen:
            return min(chosen, key=_OPTION_PRECEDENCE.index)
        return COMPOUND_RESOLUTION.get(self.basic) or Action(self.basic)


@dataclass(frozen=True)
class RepeatingGroupRule:
    """A table row whose tag has "x" nibbles, such as (60xx,3000) Overlay Data."""

    group_mask: int
    group_value: int
    element_mask: int
    element_value: int
    action: Action

    def matches(self, tag: int) -> bool:
        group, element = tag >> 16, tag & 0xFFFF
        return (
            group & self.group_mask == self.group_value
            and element & self.element_mask == self.element_value
        )


@dataclass(frozen=True)
class ResolvedTable:
    """The table with one action per tag, for one set of enabled options."""

    exact: Mapping[int, Action]
    repeating: tuple[RepeatingGroupRule, ...]
    private: Action

    def action(self, tag: int) -> Action | None:
        """The action for a public tag, or None when the table does not list it (keep it)."""
        found = self.exact.get(tag)
        if found is not None or not 0x5000 <= tag >> 16 <= 0x60FF:
            return found
        for rule in self.repeating:
            if rule.matches(tag):
                return rule.action
        return None


@dataclass(frozen=True)
class ProfileTable:
    edition: str
    rows: tuple[TableRow, ...]

    def resolve(self, enabled: frozenset[OptionColumn]) -> ResolvedTable:
        exact: dict[int, Action] = {}
        repeating: list[RepeatingGroupRule] = []
        private = Action.REMOVE
        for row in self.rows:
            action = row.action(enabled)
            if row.tag == PRIVATE_ROW_TAG:
                private = action
            elif "x" in row.tag:
                group_mask, group_value = _nibble_mask(row.tag[:4])
                element_mask, element_value = _nibble_mask(row.tag[4:])
                repeating.append(
                    RepeatingGroupRule(group_mask, group_value, element_mask, element_value, action)
                )
            else:
                exact[int(row.tag, 16)] = action
        return ResolvedTable(exact=exact, repeating=tuple(repeating), private=private)


@dataclass(frozen=True)
class SafePrivateAttribute:
    """A private attribute known to carry no identifying information (PS3.15 E.3.10)."""

    creator: str
    group: int
    element_in_block: int
    vr: str
    name: str


def _nibble_mask(pattern: str) -> tuple[int, int]:
    mask = value = 0
    for index, char in enumerate(pattern):
        if char != "x":
            shift = (3 - index) * 4
            mask |= 0xF << shift
            value |= int(char, 16) << shift
    return mask, value


def _data_lines(name: str) -> tuple[list[str], list[str]]:
    """Returns (comment lines, data lines) of one of the package's CSV files."""
    text = resources.files(__name__.rpartition(".")[0]).joinpath(name).read_text(encoding="utf-8")
    comments = [line for line in text.splitlines() if line.startswith("#")]
    data = [line for line in text.splitlines() if line and not line.startswith("#")]
    return comments, data


def parse_table(comments: Iterable[str], lines: Iterable[str]) -> ProfileTable:
    """Parses the CSV, refusing anything that is not a well-formed Table E.1-1 transcription."""
    edition = next((m.group(1) for line in comments if (m := _EDITION_PATTERN.search(line))), None)
    if edition is None:
        raise ValueError(f"{TABLE_FILE} does not name its DICOM PS3.15 edition")
    reader = csv.DictReader(lines)
    expected = ["tag", "name", "basic", *OptionColumn]
    if reader.fieldnames != expected:
        raise ValueError(f"{TABLE_FILE} header is {reader.fieldnames}, expected {expected}")
    rows: list[TableRow] = []
    seen: set[str] = set()
    for record in reader:
        tag = record["tag"]
        if tag != PRIVATE_ROW_TAG and not _TAG_PATTERN.fullmatch(tag):
            raise ValueError(f"{TABLE_FILE}: malformed tag {tag!r}")
        if tag in seen:
            raise ValueError(f"{TABLE_FILE}: duplicate tag {tag}")
        seen.add(tag)
        codes = {column: record[column] for column in OptionColumn if record[column]}
        for code in (record["basic"], *codes.values()):
            if code not in KNOWN_CODES:
                raise ValueError(f"{TABLE_FILE}: unknown action {code!r} for {tag}")
        if not record["name"]:
            raise ValueError(f"{TABLE_FILE}: {tag} has no name")
        rows.append(TableRow(tag, record["name"], record["basic"], codes))
    return ProfileTable(edition=edition, rows=tuple(rows))


@cache
def load_table() -> ProfileTable:
    """Table E.1-1 as shipped in the package (parsed once per process)."""
    return parse_table(*_data_lines(TABLE_FILE))


@lru_cache(maxsize=32)
def resolved_table(enabled: frozenset[OptionColumn]) -> ResolvedTable:
    return load_table().resolve(enabled)


def parse_safe_private(lines: Iterable[str]) -> tuple[SafePrivateAttribute, ...]:
    reader = csv.DictReader(lines)
    expected = ["creator", "group", "element_in_block", "vr", "name"]
    if reader.fieldnames != expected:
        raise ValueError(f"{SAFE_PRIVATE_FILE} header is {reader.fieldnames}, expected {expected}")
    entries: list[SafePrivateAttribute] = []
    for record in reader:
        group, element = int(record["group"], 16), int(record["element_in_block"], 16)
        if not group & 1 or group <= 0x0007 or not 0 <= element <= 0xFF:
            raise ValueError(f"{SAFE_PRIVATE_FILE}: {record} is not a private data element")
        if not record["creator"].strip() or len(record["vr"]) != 2:
            raise ValueError(f"{SAFE_PRIVATE_FILE}: {record} lacks its creator or VR")
        entries.append(
            SafePrivateAttribute(record["creator"], group, element, record["vr"], record["name"])
        )
    keys = [(entry.creator, entry.group, entry.element_in_block) for entry in entries]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{SAFE_PRIVATE_FILE} lists an attribute twice")
    return tuple(entries)


@cache
def load_safe_private() -> tuple[SafePrivateAttribute, ...]:
    return parse_safe_private(_data_lines(SAFE_PRIVATE_FILE)[1])


@cache
def safe_private_vrs() -> Mapping[tuple[str, int, int], str]:
    """The VR of every safe private attribute, by (private creator, group, element within its
    block)."""
    return MappingProxyType(
        {(e.creator, e.group, e.element_in_block): e.vr for e in load_safe_private()}
    )
