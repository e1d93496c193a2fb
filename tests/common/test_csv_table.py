"""Tests for common/csv_table.py: every problem of a bad CSV at once, each kind with its hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvault.common.csv_table import ROW_HINTS, read_csv_table
from fedvault.common.errors import DataError

pytestmark = pytest.mark.unit


def write_csv(folder: Path, text: str, *, name: str = "site.csv") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# --- every problem at once, each kind with its own hint ---------------------------------------


def test_every_row_problem_is_reported_at_once_grouped_by_kind_and_column(
    tmp_path: Path,
) -> None:
    rows = [f"{i},{i * 2},{i % 2}" for i in range(20)]
    rows[2], rows[5], rows[6] = "2,big,0", "5,huge,1", "6,,0"
    rows[9] = "9,18,1,extra"
    rows[11] = "11,12,"
    path = write_csv(tmp_path, "age,size,y\n" + "\n".join(rows) + "\n")

    with pytest.raises(DataError) as caught:
        read_csv_table(f"{path}", label_column="y")

    message, hint = str(caught.value), caught.value.hint
    assert message.startswith(f"{path} has 5 problems: ")
    assert "column 'size' has non-numeric values on 2 lines (line 4 'big', line 7 'huge')" in (
        message
    )
    assert "line 8: column 'size' is empty (missing value)" in message
    assert "line 11: expected 3 values (one per header column), got 4" in message
    assert "line 13: label column 'y' is empty" in message
    for kind in ("non-numeric", "empty", "ragged", "no-label"):
        assert ROW_HINTS[kind] in hint
    assert ROW_HINTS["non-finite"] not in hint


def test_a_group_names_a_few_lines_and_counts_the_rest(tmp_path: Path) -> None:
    rows = "".join(f"{i},n/a,{i % 2}\n" for i in range(7))
    path = write_csv(tmp_path, "age,size,y\n" + rows)

    with pytest.raises(DataError) as caught:
        read_csv_table(f"{path}", label_column="y")

    assert str(caught.value) == (
        f"{path} has 7 problems: column 'size' has non-numeric values on 7 lines "
        "(line 2 'n/a', line 3 'n/a', line 4 'n/a', 4 more)"
    )


def test_a_single_problem_keeps_the_one_line_form_with_only_its_own_hint(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "age,y\n1,a\ninf,b\n")

    with pytest.raises(DataError) as caught:
        read_csv_table(f"{path}", label_column="y")

    assert str(caught.value) == f"{path}, line 3: column 'age' has non-finite value 'inf'"
    assert caught.value.hint == ROW_HINTS["non-finite"]


def test_header_problems_are_reported_together(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "age,age,,size\n1,2,3,4\n")

    with pytest.raises(DataError) as caught:
        read_csv_table(f"{path}", label_column="y")

    assert str(caught.value) == (
        f"{path}: header column 3 has no name; header repeats column names: age; "
        "label column 'y' not found; available columns: age, age, size"
    )
    assert "Give every column a name" in caught.value.hint
    assert "Rename the repeated columns" in caught.value.hint
    assert "--label-column" in caught.value.hint


def test_a_label_column_in_the_wrong_case_is_suggested(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "age,Outcome\n1,a\n2,b\n")

    with pytest.raises(DataError) as caught:
        read_csv_table(f"{path}", label_column="outcome")

    assert caught.value.hint.startswith("Did you mean --label-column Outcome?")


def test_a_directory_hint_lists_the_csv_files_in_it(tmp_path: Path) -> None:
    write_csv(tmp_path, "x,y\n1,a\n", name="north.csv")
    write_csv(tmp_path, "x,y\n1,a\n", name="south.CSV")
    (tmp_path / "notes.txt").write_text("not data")

    with pytest.raises(DataError) as caught:
        read_csv_table(f"{tmp_path}", label_column="y")

    assert caught.value.hint == "Give one CSV file inside it (it holds north.csv, south.CSV)."


def test_a_missing_file_hint_names_a_file_of_a_close_name(tmp_path: Path) -> None:
    write_csv(tmp_path, "x,y\n1,a\n", name="site-1.csv")

    with pytest.raises(DataError) as near:
        read_csv_table(f"{tmp_path / 'site-l.csv'}", label_column="y")
    with pytest.raises(DataError) as far:
        read_csv_table(f"{tmp_path / 'other.csv'}", label_column="y")

    assert near.value.hint == f"Did you mean {tmp_path / 'site-1.csv'}?"
    assert far.value.hint.startswith("Check the path")


def test_an_unreadable_file_names_the_os_reason_and_how_to_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_csv(tmp_path, "x,y\n1,a\n2,b\n")

    def refuse(*_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(DataError) as caught:
        read_csv_table(f"{path}", label_column="y")

    assert str(caught.value) == f"cannot read data file {path}: Permission denied"
    assert f"ls -l {path}" in caught.value.hint


BAD_CSVS = {
    "empty": b"",
    "header only": b"x,y\n",
    "missing label column": b"x,z\n1,a\n2,b\n",
    "semicolons": b"x;y\n1;a\n2;b\n",
    "unnamed column": b"x,,y\n1,2,a\n",
    "repeated column": b"x,x,y\n1,2,a\n",
    "label only": b"y\na\nb\n",
    "ragged row": b"x,y\n1,a\n2,b,3\n",
    "empty label": b"x,y\n1,a\n2,\n",
    "missing value": b"x,w,y\n1,2,a\n,3,b\n",
    "non-numeric value": b"x,y\n1,a\nbig,b\n",
    "non-finite value": b"x,y\n1,a\ninf,b\n",
    "one class": b"x,y\n1,a\n2,a\n",
    "not utf-8": "x,y\n1,\u00e2\n".encode("latin-1"),
    "malformed quotes": b'x,y\n1,a\n"2,b\n',
}


def test_each_kind_of_bad_csv_gets_a_hint_of_its_own(tmp_path: Path) -> None:
    # Prepare
    hints: dict[str, str] = {}

    # Execute
    for problem, content in BAD_CSVS.items():
        path = tmp_path / f"{problem.replace(' ', '_')}.csv"
        path.write_bytes(content)
        with pytest.raises(DataError) as caught:
            read_csv_table(f"{path}", label_column="y")
        hints[problem] = caught.value.hint

    # Assert: none falls back to the generic hint, and no two kinds share one
    generic = [problem for problem, hint in hints.items() if hint == DataError.default_hint]
    assert generic == []
    assert len(set(hints.values())) == len(hints), hints


def test_an_unclosed_quote_is_named_where_it_opens_not_as_a_short_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path, 'x,y\n1,a\n"2,b\n3,c\n')

    with pytest.raises(DataError) as caught:
        read_csv_table(f"{path}", label_column="y")

    assert str(caught.value) == (
        f"{path}, a quoted value is not closed (line 3): it runs on to the next lines"
    )
    assert caught.value.hint == ROW_HINTS["open-quote"]
