"""Device list files for bulk provisioning and revocation (``knet broker provision --list``).

Two formats, chosen by the file's suffix::

    # devices.csv: a header, then one device per line ('#' starts a comment line)
    device_id,fleet,profile
    cam-01,lab,rpi4

    # devices.toml
    [[devices]]
    id = "cam-01"
    fleet = "lab"
    profile = "rpi4"

Every entry is validated with the rules single provisioning applies (``validate_id``);
unknown columns or keys, missing ones, duplicate ids and an empty list are refused. Each
problem is reported as ``FILE: line N: FIELD: reason`` (``FIELD`` as the file spells it:
``device_id`` in a CSV file, ``id`` in a TOML file), all of them in one ``DeviceListError``,
before anything is written.
"""

from __future__ import annotations

import csv
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from agent.wire.topics import validate_id
from broker.errors import KnetBrokerError

FORMATS = (".csv", ".toml")
CSV_COLUMNS = {"id": "device_id"}  # model field → CSV column, where they differ
_TOML_TABLE = re.compile(r"^\s*\[\[\s*devices\s*\]\]")


class DeviceListError(KnetBrokerError, ValueError):
    """A list file that cannot be used; the message names the file, line and field."""


class DeviceEntry(BaseModel):
    """One device to provision. ``profile`` must be a firmware profile the operator knows
    (validation context ``profiles``: the names; absent, any well-formed name passes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str
    fleet: str
    profile: str

    @field_validator("id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        return validate_id(v)

    @field_validator("fleet")
    @classmethod
    def _fleet_id(cls, v: str) -> str:
        return validate_id(v, "fleet id")

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: str, info: ValidationInfo) -> str:
        return _check_profile(v, info)


class RevokeEntry(BaseModel):
    """One device to revoke: the id is enough; a fleet, if given, must be the device's."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str
    fleet: str | None = None
    profile: str | None = None  # accepted so a provisioning list can be reused as is

    @field_validator("id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        return validate_id(v)

    @field_validator("fleet")
    @classmethod
    def _fleet_id(cls, v: str | None) -> str | None:
        return None if v is None else validate_id(v, "fleet id")


Entry = TypeVar("Entry", DeviceEntry, RevokeEntry)
Problem = tuple[int, str]  # (line, message without the file name)


def _check_profile(name: str, info: ValidationInfo) -> str:
    if not name or "/" in name or name.endswith(".toml"):
        raise ValueError(f"{name!r}: give a firmware profile's name (e.g. rpi4), not a path")
    known = (info.context or {}).get("profiles")
    if known is not None and name not in known:
        raise ValueError(f"no firmware profile {name!r} (known: {', '.join(sorted(known))})")
    return name


@dataclass(frozen=True)
class _Row:
    """One entry as read from the file, before validation."""

    line: int  # 1-based line of the CSV row or of the TOML [[devices]] header; 0: unknown
    label: str  # "line 4" or "devices[2]" where the line is unknown
    values: dict[str, Any]


def load_device_list(path: Path | str,
                     profiles: Iterable[str] | None = None) -> list[DeviceEntry]:
    """The devices to provision; ``profiles``: the firmware profile names a row may use."""
    context = {"profiles": set(profiles)} if profiles is not None else None
    return _load(Path(path), DeviceEntry, context)


def load_revoke_list(path: Path | str) -> list[RevokeEntry]:
    """The devices to revoke (the same formats; only the id column is required)."""
    return _load(Path(path), RevokeEntry, None)


def _load(path: Path, model: type[Entry], context: dict[str, Any] | None) -> list[Entry]:
    """Read and validate a list file; every problem in one ``DeviceListError``."""
    if path.suffix.lower() not in FORMATS:
        raise DeviceListError(f"{path}: unknown list format {path.suffix!r}: use a .csv file "
                              "(device_id,fleet,profile) or a .toml file ([[devices]])")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceListError(f"{path}: cannot read: {exc}") from None
    is_csv = path.suffix.lower() == ".csv"
    rows, problems = _csv_rows(path, text, model) if is_csv else (_toml_rows(path, text), [])
    if not rows and not problems:
        raise DeviceListError(f"{path}: no devices in the list")
    names = CSV_COLUMNS if is_csv else {}
    entries, invalid = _validate(rows, model, context, names)
    problems += invalid + _duplicates(entries, names.get("id", "id"))
    if problems:  # in file order; sorted() is stable within a line
        raise DeviceListError("\n".join(f"{path}: {text}" for _line, text
                                         in sorted(problems, key=lambda p: p[0])))
    return [entry for _row, entry in entries]


# -- CSV --------------------------------------------------------------------------------------
def _csv_rows(path: Path, text: str,
              model: type[BaseModel]) -> tuple[list[_Row], list[Problem]]:
    lines = iter(_numbered_csv(text))
    try:
        header_line, header = next(lines)
    except StopIteration:
        raise DeviceListError(f"{path}: empty file: the first line must be the header "
                              f"{','.join(_columns(model))}") from None
    _check_header(path, header_line, header, model)
    fields = {column: field for field, column in CSV_COLUMNS.items()}
    rows: list[_Row] = []
    problems: list[Problem] = []
    for line, cells in lines:
        if len(cells) != len(header):
            problems.append((line, f"line {line}: {len(cells)} cells, the header has "
                                   f"{len(header)} ({','.join(header)})"))
            continue
        values = {fields.get(col, col): cell for col, cell in zip(header, cells, strict=True)
                  if cell != ""}  # an empty cell: not given (missing, if required)
        rows.append(_Row(line, f"line {line}", values))
    return rows, problems


def _numbered_csv(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped cells) of each row that is neither blank nor a comment."""
    reader = csv.reader(text.splitlines())
    for cells in reader:
        stripped = [c.strip() for c in cells]
        if not any(stripped) or stripped[0].startswith("#"):
            continue
        yield reader.line_num, stripped


def _columns(model: type[BaseModel]) -> list[str]:
    return [CSV_COLUMNS.get(name, name) for name in model.model_fields]


def _check_header(path: Path, line: int, header: list[str], model: type[BaseModel]) -> None:
    allowed = _columns(model)
    required = [CSV_COLUMNS.get(n, n) for n, f in model.model_fields.items() if f.is_required()]
    expected = f"expected the header {','.join(allowed)}"
    for col in header:
        if col not in allowed:
            raise DeviceListError(f"{path}: line {line}: unknown column {col!r} ({expected})")
    repeated = sorted({c for c in header if header.count(c) > 1})
    missing = [c for c in required if c not in header]
    if repeated or missing:
        what = (f"column {repeated[0]!r} appears twice" if repeated
                else f"missing column {missing[0]!r}")
        raise DeviceListError(f"{path}: line {line}: {what} ({expected})")


# -- TOML -------------------------------------------------------------------------------------
def _toml_rows(path: Path, text: str) -> list[_Row]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DeviceListError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"devices"})
    if unknown:
        raise DeviceListError(f"{path}: unknown key {unknown[0]!r}: the list is "
                              "[[devices]] tables (id, fleet, profile)")
    tables = data.get("devices", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise DeviceListError(f"{path}: devices: must be [[devices]] tables "
                              "(id, fleet, profile)")
    headers = [n for n, line in enumerate(text.splitlines(), 1) if _TOML_TABLE.match(line)]
    if len(headers) != len(tables):  # devices = [{...}, ...] inline: no line per entry
        headers = [0] * len(tables)
    return [_Row(line, f"line {line}" if line else f"devices[{i}]", dict(table))
            for i, (line, table) in enumerate(zip(headers, tables, strict=True))]


# -- validation -------------------------------------------------------------------------------
def _validate(rows: Sequence[_Row], model: type[Entry], context: dict[str, Any] | None,
              names: Mapping[str, str]) -> tuple[list[tuple[_Row, Entry]], list[Problem]]:
    entries: list[tuple[_Row, Entry]] = []
    problems: list[Problem] = []
    for row in rows:
        try:
            entries.append((row, model.model_validate(row.values, context=context)))
        except ValidationError as exc:
            problems += [(row.line, f"{row.label}: {_describe(err, names)}")
                         for err in exc.errors()]
    return entries, problems


def _describe(err: Any, names: Mapping[str, str]) -> str:
    field = ".".join(str(part) for part in err["loc"]) or "entry"
    field = names.get(field, field)
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown key"
    if err["type"] == "missing":
        return f"{field}: missing"
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{field}: {message}"


def _duplicates(entries: Sequence[tuple[_Row, DeviceEntry | RevokeEntry]],
                column: str) -> list[Problem]:
    first: dict[str, _Row] = {}
    problems: list[Problem] = []
    for row, entry in entries:
        device = entry.id
        if device in first:
            problems.append((row.line, f"{row.label}: {column}: {device!r} is already "
                                       f"listed on {first[device].label}"))
        else:
            first[device] = row
    return problems
