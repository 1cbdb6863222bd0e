"""Reader for the CS224N task files: tab-separated despite ``.csv``, an unnamed index column,
CSV quoting with doubled quotes, a few rows with an empty label, unlabeled test files.

Columns are found by header name, so the test files' extra index column does not matter.
Every problem is reported as ``file:line: what``; rows with an empty label are skipped and
counted (a known quirk of the Quora files); other bad rows stop the run unless
``skip_bad_rows`` is set, in which case they are skipped and counted per file.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from mtbert.errors import UserError


class DataError(UserError):
    """A data file problem; the message names the file and line."""


@dataclass
class Example:
    id: str
    text_a: str
    text_b: str | None
    label: float | None  # None for unlabeled test files


@dataclass
class LoadReport:
    path: str
    rows: int = 0
    skipped_empty_label: int = 0
    skipped_bad: dict = field(default_factory=dict)  # problem -> count of rows skipped
    replaced_bytes: int = 0  # (skip_bad_rows) lines kept with non-UTF-8 bytes replaced by U+FFFD

    def summary(self) -> str:
        bad = sum(self.skipped_bad.values())
        extra = f", skipped {self.skipped_empty_label} with an empty label" if self.skipped_empty_label else ""
        if bad:
            extra += f", skipped {bad} bad rows ({', '.join(f'{k}: {v}' for k, v in self.skipped_bad.items())})"
        if self.replaced_bytes:
            extra += f", non-UTF-8 bytes replaced on {self.replaced_bytes} line(s)"
        return f"{self.path}: {self.rows} rows{extra}"


def _decode(path: Path, skip_bad: bool, report: LoadReport) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        if not skip_bad:
            raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); "
                            f"fix the file or set data.skip_bad_rows=true") from None
        text = raw.decode("utf-8", errors="replace")
        report.replaced_bytes = sum("\ufffd" in line for line in text.split("\n"))
        return text


def _parse_lines(text: str):
    """-> (line number, fields | csv.Error) for each physical line. A row is one line in these
    files (no quoted field spans lines: checked on every CS224N file), so parsing line by line
    confines a stray quote or an oversized field to its own row; read as one stream, the csv
    module swallowed every line up to the next quote into one field, or stopped the file."""
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        try:
            yield number, next(csv.reader([raw], delimiter="\t", quotechar='"', strict=True))
        except csv.Error as e:
            yield number, e


def parse_label(text: str, spec) -> float:
    """A label string -> float, checked against the task's label space (raises ValueError)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"label {text!r} is not a finite number")
    lo, hi = spec.label_range
    if spec.kind == "pair_regression":
        if not lo <= value <= hi:
            raise ValueError(f"label {text!r} outside [{lo}, {hi}]")
    elif value != int(value) or not 0 <= value < spec.num_labels:
        raise ValueError(f"label {text!r} is not a class in 0..{spec.num_labels - 1}")
    return value


def read_cs224n(path: str | Path, spec, labeled: bool = True, skip_bad_rows: bool = False):
    """-> (list[Example], LoadReport). ``labeled=False`` for test files (no label column needed)."""
    # (Longer than ~60 lines on purpose: one pass over the file with each check next to the
    # row it reads, so every message carries its file:line.)
    path = Path(path)
    report = LoadReport(str(path))
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.dir or $MTBERT_DATA_DIR)")
    text = _decode(path, skip_bad_rows, report)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    lines = _parse_lines(text)
    _, header = next(lines)
    if isinstance(header, csv.Error):
        raise DataError(f"{path}:1: cannot parse the header: {header}")
    roles = ["id", "text_a"] + (["text_b"] if spec.pair else []) + (["label"] if labeled else [])
    where = {}
    for role in roles:
        col = spec.columns[role]
        if col not in header:
            raise DataError(f"{path}:1: missing column {col!r} (for {role}); header is {header}")
        where[role] = header.index(col)

    def bad(line, problem, kind):
        if not skip_bad_rows:
            raise DataError(f"{path}:{line}: {problem}; fix the file or set data.skip_bad_rows=true")
        report.skipped_bad[kind] = report.skipped_bad.get(kind, 0) + 1

    examples, seen = [], {}
    for line, row in lines:
        if isinstance(row, csv.Error):  # a stray quote, a field over the csv size limit: this line only
            bad(line, f"malformed row ({row})", "malformed")
            continue
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            bad(line, f"{len(row)} fields, the header has {len(header)}", "wrong field count")
            continue
        ex_id = row[where["id"]].strip()
        if not ex_id:
            bad(line, "empty id", "empty id")
            continue
        if ex_id in seen:
            bad(line, f"duplicate id {ex_id!r} (first on line {seen[ex_id]})", "duplicate id")
            continue
        label = None
        if labeled:
            raw_label = row[where["label"]].strip()
            if raw_label == "":
                report.skipped_empty_label += 1
                continue
            try:
                label = parse_label(raw_label, spec)
            except ValueError as e:
                bad(line, str(e), "bad label")
                continue
        text_a = row[where["text_a"]].strip()
        text_b = row[where["text_b"]].strip() if spec.pair else None
        if not text_a or text_b == "":
            bad(line, f"empty sentence ({'text_a' if not text_a else 'text_b'})", "empty sentence")
            continue
        seen[ex_id] = line
        examples.append(Example(ex_id, text_a, text_b, label))
    report.rows = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable rows ({report.summary()})")
    return examples, report
