"""Reading a CSV table for training: every problem of a bad file found, each with its hint.

A CSV dataset has a header row, numeric feature columns and one label column. The problems of
its data rows are found in one pass and reported together (grouped by kind and column, a few
lines each); those of its header together too; each kind of problem has a hint of its own.
"""

from __future__ import annotations

import array
import csv
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedvault.common.errors import DataError


@dataclass(frozen=True, eq=False)
class CsvTable:
    """A CSV file's rows: float32 features, int64 labels 0..k-1 and the k class names."""

    path: Path
    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    class_names: tuple[str, ...]


def read_csv_table(path_text: str, label_column: str | None) -> CsvTable:
    """A CSV file with a header row, numeric feature columns and one label column.

    Every problem of the data rows is found in one pass and reported together (grouped by
    kind and column, a few lines each), each kind with its own hint.
    """
    if label_column is None:
        raise DataError(
            "csv datasets need --label-column",
            hint="Name the column that holds each row's class, e.g. --label-column label.",
        )
    if not path_text.strip():
        raise DataError(
            "csv: needs a file path, e.g. csv:data/site-1.csv",
            hint="Write the CSV file's path right after csv:, e.g. --dataset csv:data/site-1.csv.",
        )
    path = _csv_path(Path(path_text).expanduser())
    problems = RowProblems()
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            if not any(header):
                raise DataError(
                    f"data file {path} has no data rows (it is empty)",
                    hint="Export the table again: a header row naming the columns, then one "
                    "row per record.",
                )
            label_index = _label_index(path, header, label_column)
            feature_names = [n for i, n in enumerate(header) if i != label_index]
            values: array.array[float] = array.array("d")
            raw_labels: list[str] = []
            end = reader.line_num
            for row in reader:
                line, end = end + 1, reader.line_num  # a quoted value may span lines
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != len(header):
                    spans = any("\n" in cell or "\r" in cell for cell in row)
                    problems.add("open-quote" if spans else "ragged", line, value=str(len(row)))
                    continue
                label = row[label_index].strip()
                if not label:
                    problems.add("no-label", line, column=label_column)
                    continue
                del row[label_index]
                parsed = _parse_row(problems, line, feature_names, row)
                if parsed is not None:
                    raw_labels.append(label)
                    values.extend(parsed)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.start}): {err.reason}",
            hint='Save the file as UTF-8 (a spreadsheet\'s "CSV UTF-8" export, or '
            f"`iconv -f latin1 -t utf-8 {path.name}`).",
        ) from err
    except csv.Error as err:
        raise DataError(
            f"{path}, line {reader.line_num}: malformed CSV: {err}",
            hint="Check the quotes on that line: a quoted value needs its closing quote.",
        ) from err
    except OSError as err:
        raise DataError(
            f"cannot read data file {path}: {err.strerror}",
            hint=f"Check that this user may read it (`ls -l {path}`) and that the disk is "
            "readable.",
        ) from err
    problems.raise_if_any(path, len(header))
    if not raw_labels:
        raise DataError(
            f"data file {path} has no data rows (only a header)",
            hint="Add the data rows below the header, one row per record.",
        )
    labels, class_names = _encode_labels(raw_labels)
    if len(class_names) < 2:
        others = ", ".join(name for name in header if name != label_column)
        raise DataError(
            f"{path}: label column {label_column!r} has only one class "
            f"({class_names[0]!r}); need at least 2 classes",
            hint="A classifier needs rows of at least two classes: check that --label-column "
            f"names the class column (the others are: {others}) and that the file holds "
            "every class.",
        )
    features = np.frombuffer(values, dtype=np.float64).reshape(len(raw_labels), -1)
    return CsvTable(
        path=path,
        features=features.astype(np.float32),
        labels=labels,
        class_names=class_names,
    )


def _csv_path(path: Path) -> Path:
    """``path`` if it is a file; a DataError saying what is there instead, and what to give."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() == ".csv")
        listed = f"it holds {', '.join(inside[:5])}" + (" ..." if len(inside) > 5 else "")
        raise DataError(
            f"data file is a directory, not a CSV file: {path}",
            hint=f"Give one CSV file inside it ({listed})."
            if inside
            else "Give the path of a CSV file; this folder holds no .csv file.",
        )
    if not path.exists():
        parent = path.parent if str(path.parent) else Path(".")
        near = (
            difflib.get_close_matches(
                path.name, [p.name for p in parent.iterdir()], n=1, cutoff=0.8
            )
            if parent.is_dir()
            else []
        )
        raise DataError(
            f"data file not found: {path}",
            hint=f"Did you mean {parent / near[0]}?"
            if near
            else f"Check the path (a relative path starts from {Path.cwd()}).",
        )
    return path


#: The hint for each kind of problem a data row can have.
ROW_HINTS: dict[str, str] = {
    "open-quote": "A '\"' opens a quoted value that runs on over the next lines: close it, "
    "or remove the stray quote.",
    "ragged": "Every row needs one value per header column: quote a value that holds a "
    "comma (\"1,5\"), and write decimals with '.'.",
    "no-label": "Every row needs its class in the label column: fill it in or drop the row.",
    "empty": "fedvault does not fill in missing values: fill them in or drop those rows.",
    "non-numeric": "Feature columns must hold numbers: fix the values shown, or encode a "
    "text column as numbers (e.g. one 0/1 column per category).",
    "non-finite": "Features must be finite numbers: replace nan/inf or drop those rows.",
}
#: Lines named per group of problems in a message; the rest are counted.
SHOWN_LINES = 3


@dataclass
class RowProblems:
    """The problems of a CSV file's data rows, grouped by kind and column, in file order."""

    groups: dict[tuple[str, str], list[tuple[int, str]]] = field(default_factory=dict)

    def add(self, kind: str, line: int, *, column: str = "", value: str = "") -> None:
        self.groups.setdefault((kind, column), []).append((line, value))

    def describe(self, header_width: int) -> list[str]:
        """One phrase per group: "column 'bmi' has non-numeric values on 2 lines (...)"."""
        phrases = []
        for (kind, column), found in self.groups.items():
            shown = found[:SHOWN_LINES]
            more = f", {len(found) - len(shown)} more" if len(found) > len(shown) else ""
            if kind == "ragged":
                lines = ", ".join(f"line {n}: {got}" for n, got in shown)
                phrases.append(
                    f"expected {header_width} values (one per header column) on every line, "
                    f"got other counts on {_lines(found)} ({lines}{more})"
                    if len(found) > 1
                    else f"line {shown[0][0]}: expected {header_width} values (one per header "
                    f"column), got {shown[0][1]}"
                )
                continue
            if kind == "open-quote":
                lines = ", ".join(f"line {n}" for n, _ in shown)
                phrases.append(
                    f"a quoted value is not closed ({lines}{more}): it runs on to the next lines"
                )
                continue
            where = {
                "no-label": f"label column {column!r} is empty",
                "empty": f"column {column!r} is empty (missing value)",
                "non-numeric": f"column {column!r} has non-numeric value",
                "non-finite": f"column {column!r} has non-finite value",
            }[kind]
            if len(found) == 1:
                line, value = found[0]
                phrases.append(f"line {line}: {where}" + (f" {value!r}" if value else ""))
            else:
                cells = ", ".join(
                    f"line {n}" + (f" {value!r}" if value else "") for n, value in shown
                )
                plural = where.replace(" value", " values")
                phrases.append(f"{plural} on {_lines(found)} ({cells}{more})")
        return phrases

    def raise_if_any(self, path: Path, header_width: int) -> None:
        """Raise one DataError naming every group of problems, with each kind's hint."""
        if not self.groups:
            return
        phrases = self.describe(header_width)
        total = sum(len(found) for found in self.groups.values())
        kinds = list(dict.fromkeys(kind for kind, _ in self.groups))
        if total == 1:
            message = f"{path}, {phrases[0]}"
        else:
            message = f"{path} has {total} problems: " + "; ".join(phrases)
        raise DataError(message, hint=" ".join(ROW_HINTS[kind] for kind in kinds))


def _lines(found: list[tuple[int, str]]) -> str:
    return f"{len(found)} lines" if len(found) > 1 else "1 line"


def _label_index(path: Path, header: list[str], label_column: str) -> int:
    """The label column's index; every problem of the header reported at once."""
    if label_column not in header and len(header) == 1:
        delimiter = next((d for d in (";", "\t", "|") if d in header[0]), None)
        if delimiter is not None:
            shown = "tab" if delimiter == "\t" else repr(delimiter)
            raise DataError(
                f"{path}: the header is one column ({header[0]!r}); the delimiter looks like "
                f"{shown}, and fedvault reads comma-separated files",
                hint="Save the file as comma-separated CSV (',' between values, '.' for "
                "decimals), e.g. with your spreadsheet's CSV export.",
            )
    problems: list[str] = []
    hints: list[str] = []
    unnamed = [str(i + 1) for i, name in enumerate(header) if not name]
    if unnamed:
        problems.append(
            f"header column{'s' if len(unnamed) > 1 else ''} {', '.join(unnamed)} "
            f"{'have' if len(unnamed) > 1 else 'has'} no name"
        )
        hints.append("Give every column a name (an empty one often comes from a trailing ',').")
    duplicates = sorted({name for name in header if name and header.count(name) > 1})
    if duplicates:
        problems.append(f"header repeats column names: {', '.join(duplicates)}")
        hints.append("Rename the repeated columns so that every name is unique.")
    columns = ", ".join(name for name in header if name)
    if label_column not in header:
        problems.append(f"label column {label_column!r} not found; available columns: {columns}")
        close = [
            name for name in header if name and name.casefold() == label_column.casefold()
        ] or difflib.get_close_matches(label_column, [n for n in header if n], n=1)
        hints.append(
            f"Did you mean --label-column {close[0]}? Column names are case-sensitive."
            if close
            else f"Pass --label-column with the column that holds each row's class: one of "
            f"{columns}."
        )
    elif len(header) < 2:
        problems.append("needs at least one feature column besides the label")
        hints.append("Add the feature columns: the model learns the label from them.")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems), hint=" ".join(hints))
    return header.index(label_column)


def _parse_row(
    problems: RowProblems, line: int, names: list[str], row: list[str]
) -> list[float] | None:
    """A row's feature values, or None after adding its problems to ``problems``."""
    parsed: list[float] = []
    ok = True
    for name, text in zip(names, row, strict=True):
        text = text.strip()
        if not text:
            problems.add("empty", line, column=name)
            ok = False
            continue
        try:
            value = float(text)
        except ValueError:
            problems.add("non-numeric", line, column=name, value=text)
            ok = False
            continue
        if not math.isfinite(value):
            problems.add("non-finite", line, column=name, value=text)
            ok = False
            continue
        parsed.append(value)
    return parsed if ok else None


def _encode_labels(raw: list[str]) -> tuple[npt.NDArray[np.int64], tuple[str, ...]]:
    """Map sorted unique labels to 0..k-1: numerically if all are integers, else as text."""
    as_ints = [_as_int(label) for label in raw]
    if all(value is not None for value in as_ints):
        ints = np.array(as_ints, dtype=np.int64)
        unique_ints, codes = np.unique(ints, return_inverse=True)
        return codes.astype(np.int64), tuple(str(int(v)) for v in unique_ints)
    unique_text, codes = np.unique(np.array(raw, dtype=str), return_inverse=True)
    return codes.astype(np.int64), tuple(str(v) for v in unique_text)


def _as_int(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and abs(value) < 2**53 else None
