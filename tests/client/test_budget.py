"""Tests for client/budget.py and `fedvault client budget`: a site's ledger, read back.

Ledgers are real files written with PrivacyLedger.record; every epsilon shown is checked
against the ledger's own spent() and against compute_epsilon on the entries' events.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from fedvault.client.budget import budget_report, data_fingerprint, ledger_location, render_budget
from fedvault.common.errors import ConfigError, LedgerError, ProvisioningError
from fedvault.common.fingerprint import dataset_fingerprint, short_fingerprint
from fedvault.common.ledger import (
    DEFAULT_MAX_EPSILON,
    GENESIS,
    KIT_LEDGER,
    DatasetSummary,
    LedgerEntry,
    PrivacyLedger,
)
from fedvault.common.privacy import compute_epsilon
from fedvault.server.provision import provision_federation

pytestmark = pytest.mark.unit

DELTA = 1e-5
ENV = {"NO_COLOR": "1", "COLUMNS": "200"}


def fingerprint(seed: int) -> str:
    rng = np.random.default_rng(seed)
    return dataset_fingerprint(rng.normal(size=(20, 3)), rng.integers(0, 2, 20))


DS_A = fingerprint(0)
DS_B = fingerprint(1)


def entry(
    *,
    dataset: str = DS_A,
    run_id: str = "run-1",
    round: int = 1,
    sigma: float = 1.0,
    q: float = 0.1,
    steps: int = 10,
    accountant: str = "rdp",
) -> LedgerEntry:
    return LedgerEntry(dataset, run_id, round, sigma, q, steps, DELTA, accountant)


def make_ledger(path: Path, entries: Sequence[LedgerEntry]) -> Path:
    with PrivacyLedger(path) as ledger:
        for item in entries:
            ledger.record(item)
    return path


def two_runs(dataset: str = DS_A, accountant: str = "rdp") -> list[LedgerEntry]:
    """Run 'run-1': 3 rounds at sigma 1.5, q 0.05; 'run-2': 2 rounds at sigma 1, q 0.1 (more ε)."""
    first = [
        entry(dataset=dataset, run_id="run-1", round=r, sigma=1.5, q=0.05, accountant=accountant)
        for r in (1, 2, 3)
    ]
    second = [
        entry(dataset=dataset, run_id="run-2", round=r, sigma=1.0, q=0.1, accountant=accountant)
        for r in (1, 2)
    ]
    return first + second


def epsilon_of(entries: Sequence[LedgerEntry], accountant: str = "rdp") -> float:
    return compute_epsilon([e.event for e in entries], delta=DELTA, accountant=accountant)


def spent(path: Path, dataset: str, accountant: str = "rdp") -> float:
    with PrivacyLedger(path) as ledger:
        return ledger.spent(dataset, delta=DELTA, accountant=accountant)


def report_of(path: Path, *, max_epsilon: float = 10.0, accountant: str = "rdp") -> dict[str, Any]:
    return budget_report(path, max_epsilon=max_epsilon, delta=DELTA, accountant=accountant)


def rendered(report: dict[str, Any], *, color: bool = False) -> str:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=color, color_system="standard")
    render_budget(report, console)
    return out.getvalue()


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """`fedvault client budget ARGS` through fedvault.cli.app.main (errors become exit codes)."""
    from fedvault.cli.app import main

    monkeypatch.setattr(sys, "argv", ["fedvault", "client", "budget", *args])
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # keep pytest's own handlers
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    code = 0
    try:
        main()
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


#: Rich's bold red, then the word, as the console script starts an error line in colour.
RED_ERROR = "\x1b[1;31merror:"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def fedvault(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script `fedvault client budget ARGS`, in a fresh process, in colour."""
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    return subprocess.run(
        [str(Path(sys.executable).with_name("fedvault")), "client", "budget", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**env, "COLUMNS": "200", "FORCE_COLOR": "1"},
    )  # fmt: skip


# --- the report ---------------------------------------------------------------------------


def test_spent_is_the_ledgers_and_remaining_is_the_cap_minus_it(tmp_path: Path) -> None:
    entries_a = two_runs(DS_A)
    entries_b = [entry(dataset=DS_B, run_id="run-3", steps=5)]
    path = make_ledger(tmp_path / "ledger.sqlite", [*entries_a, *entries_b])

    report = report_of(path, max_epsilon=10.0)

    by_dataset = {d["dataset"]: d for d in report["datasets"]}
    assert list(by_dataset) == [DS_A, DS_B]
    for dataset, mine in ((DS_A, entries_a), (DS_B, entries_b)):
        shown = by_dataset[dataset]
        assert shown["epsilon"] == pytest.approx(spent(path, dataset), rel=1e-9)
        assert shown["epsilon"] == pytest.approx(epsilon_of(mine), rel=1e-6)
        assert shown["remaining_epsilon"] == pytest.approx(10.0 - shown["epsilon"], rel=1e-9)
        assert shown["exhausted"] is False
    assert by_dataset[DS_A]["runs"] == 2
    assert by_dataset[DS_A]["rounds"] == 5
    assert by_dataset[DS_A]["steps"] == 50


def test_each_run_is_listed_with_its_own_epsilon(tmp_path: Path) -> None:
    entries = two_runs(accountant="prv")
    path = make_ledger(tmp_path / "ledger.sqlite", entries)

    report = report_of(path, accountant="prv")
    text = rendered(report)

    runs = report["datasets"][0]["per_run"]
    assert [r["run_id"] for r in runs] == ["run-1", "run-2"]
    for run in runs:
        alone = epsilon_of([e for e in entries if e.run_id == run["run_id"]], "prv")
        assert run["epsilon"] == pytest.approx(alone, rel=1e-6)
        assert f"{run['epsilon']:.3f}" in text
    assert runs[0]["epsilon"] != pytest.approx(runs[1]["epsilon"], rel=1e-3)
    assert runs[1]["cumulative_epsilon"] == pytest.approx(spent(path, DS_A, "prv"), rel=1e-9)
    assert runs[1]["cumulative_epsilon"] > runs[1]["epsilon"] > runs[0]["epsilon"]


def test_a_spent_budget_is_flagged_exhausted_in_red(tmp_path: Path) -> None:
    path = make_ledger(tmp_path / "ledger.sqlite", two_runs())
    epsilon = spent(path, DS_A)

    over = report_of(path, max_epsilon=epsilon / 2)
    under = report_of(path, max_epsilon=epsilon * 2)

    assert over["datasets"][0]["remaining_epsilon"] == 0.0
    assert over["datasets"][0]["exhausted"] is True
    assert under["datasets"][0]["exhausted"] is False
    red = "\x1b[1;31mbudget exhausted:"
    assert red in rendered(over, color=True)
    assert "(exhausted)" in rendered(over)
    assert "exhausted" not in rendered(under)


def test_an_empty_ledger_says_it_has_no_entries(tmp_path: Path) -> None:
    path = make_ledger(tmp_path / "ledger.sqlite", [])

    report = report_of(path)

    assert report["datasets"] == []
    assert "no entries" in rendered(report)


def test_a_missing_ledger_is_refused_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "state" / "privacy-ledger.sqlite"

    with pytest.raises(ConfigError, match=r"no privacy ledger at .*has not trained yet"):
        report_of(path)

    assert not path.parent.exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_epsilon": 0.0}, "--max-epsilon must be > 0, got 0"),
        ({"max_epsilon": float("nan")}, "--max-epsilon must be > 0"),
        ({"delta": 1.0}, r"--delta must be in \(0, 1\), got 1"),
        ({"accountant": "gdp"}, "unknown accountant 'gdp'; choose one of: .*prv"),
    ],
)
def test_bad_settings_are_refused_before_the_ledger_is_read(
    tmp_path: Path, settings: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"max_epsilon": 10.0, "delta": DELTA, "accountant": "prv"}
    arguments.update(settings)

    with pytest.raises(ConfigError, match=message):
        budget_report(tmp_path / "missing.sqlite", **arguments)


# --- where the ledger is -----------------------------------------------------------------


def make_site_kit(tmp_path: Path) -> Path:
    fed = provision_federation(
        name="demo", server_address="127.0.0.1:9092", sites=["clinic-a"], out=tmp_path / "fed"
    )
    return fed / "sites" / "clinic-a"


def test_kit_names_the_ledger_inside_the_site_kit(tmp_path: Path) -> None:
    kit = make_site_kit(tmp_path)

    assert ledger_location(kit=kit, ledger=None) == kit.resolve() / KIT_LEDGER
    with pytest.raises(ProvisioningError, match="not a site kit"):
        ledger_location(kit=kit.parent.parent / "server", ledger=None)


# --- the command -------------------------------------------------------------------------


def test_json_is_one_document_with_every_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_ledger(tmp_path / "ledger.sqlite", two_runs())

    code, out, err = run_main(
        monkeypatch, capsys, "--ledger", str(path), "--accountant", "rdp", "--json"
    )

    assert code == 0, err
    document = json.loads(out)
    assert document["ledger"] == str(path.resolve())
    assert document["delta"] == DELTA
    assert document["accountant"] == "rdp"
    assert document["max_epsilon"] == DEFAULT_MAX_EPSILON
    (dataset,) = document["datasets"]
    assert set(DatasetSummary.__annotations__) | {"remaining_epsilon"} <= set(dataset)
    assert dataset["short"] == short_fingerprint(DS_A)
    assert dataset["epsilon"] == pytest.approx(spent(path, DS_A), rel=1e-9)
    assert dataset["remaining_epsilon"] == pytest.approx(
        DEFAULT_MAX_EPSILON - dataset["epsilon"], rel=1e-9
    )
    assert [run["run_id"] for run in dataset["per_run"]] == ["run-1", "run-2"]


def test_the_console_script_gives_a_missing_ledger_one_red_line_a_hint_and_exit_3(
    tmp_path: Path,
) -> None:
    # The one test of the installed `fedvault` program in a process of its own: the errors'
    # lines, hints and codes are tested in-process (tests/fedvault/test_cli_errors_table.py).
    path = tmp_path / "state" / "privacy-ledger.sqlite"

    result = fedvault("--ledger", str(path))

    assert result.returncode == 3
    assert result.stdout == ""
    error, hint = result.stderr.splitlines()
    assert error.startswith(RED_ERROR)  # bold red, as a terminal shows it
    plain = ANSI.sub("", error)
    assert plain == f"error: no privacy ledger at {path}: this site has not trained yet"
    assert ANSI.sub("", hint).startswith("hint: ")
    assert not path.parent.exists()


def test_the_command_prints_the_kits_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = make_site_kit(tmp_path)
    path = make_ledger(kit / KIT_LEDGER, two_runs())
    epsilon = spent(path, DS_A)

    code, out, err = run_main(
        monkeypatch, capsys, "--kit", str(kit), "--accountant", "rdp", "--max-epsilon", "3"
    )

    assert code == 0, err
    assert f"privacy ledger {kit.resolve() / KIT_LEDGER}" in out
    assert epsilon > 3  # two_runs() is over this cap
    assert f"{epsilon:.3f} of 3" in out
    assert "0.000 (exhausted)" in out
    assert "budget exhausted" in out
    assert "run-1" in out and "run-2" in out


def test_a_kit_without_a_ledger_exits_3_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = make_site_kit(tmp_path)

    code, out, err = run_main(monkeypatch, capsys, "--kit", str(kit))

    assert code == 3
    assert out == ""
    assert "error: no privacy ledger at" in err and "Traceback" not in err
    assert not (kit / KIT_LEDGER).parent.exists()


@pytest.mark.parametrize("both", [True, False], ids=["both", "neither"])
def test_exactly_one_of_kit_and_ledger_or_exit_3(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    both: bool,
) -> None:
    path = make_ledger(tmp_path / "ledger.sqlite", [entry()])
    args = ["--kit", str(make_site_kit(tmp_path)), "--ledger", str(path)] if both else []

    code, out, err = run_main(monkeypatch, capsys, *args)

    assert code == 3
    assert out == ""
    assert (
        f"error: give exactly one of --kit and --ledger, got {'both' if both else 'neither'}" in err
    )


def test_help_states_the_sites_default_cap() -> None:
    from fedvault.cli.app import app

    result = CliRunner().invoke(app, ["client", "budget", "--help"], env=ENV)

    assert result.exit_code == 0, result.output
    assert f"(default: {DEFAULT_MAX_EPSILON:g})" in result.output
    assert "never by the coordinator" in result.output


def test_the_budget_module_does_not_import_flower() -> None:
    code = (
        "import sys, fedvault.client.budget; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )

    assert result.stdout.strip() == "[]"


# --- --verify: a ledger that cannot forget silently ---------------------------------------


def write_csv(path: Path, *, nudge: float = 0.0) -> Path:
    """A site's data file; ``nudge`` changes one cell (a different dataset)."""
    rng = np.random.default_rng(7)
    features = rng.normal(size=(24, 2)).round(3)
    features[5, 1] += nudge
    lines = ["f0,f1,label", *(f"{a},{b},{i % 2}" for i, (a, b) in enumerate(features))]
    path.write_text("\n".join(lines) + "\n")
    return path


def trained_site(tmp_path: Path) -> tuple[Path, Path]:
    """A ledger that declared the site's CSV and trained 3 rounds on it; (ledger, csv)."""
    data = write_csv(tmp_path / "site.csv")
    path = tmp_path / "state" / "ledger.sqlite"
    dataset = data_fingerprint(data, "label")
    with PrivacyLedger(path) as ledger:
        ledger.fix_policy(delta=DELTA, accountant="rdp")
        ledger.declare_dataset(dataset, new=False)
        for r in (1, 2, 3):
            ledger.reserve(entry(dataset=dataset, round=r), max_epsilon=None, delta=DELTA,
                           accountant="rdp")  # fmt: skip
    return path, data


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def verify(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], path: Path, *more: str
) -> tuple[int, list[str], str]:
    code, out, err = run_main(monkeypatch, capsys, "--ledger", str(path), "--verify", *more)
    return code, out.splitlines(), err


def delete_ledger_file(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def test_verify_an_intact_ledger_prints_its_head_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, data = trained_site(tmp_path)
    with PrivacyLedger(path) as ledger:
        head = ledger.head()
    before = files_under(tmp_path)

    code, lines, err = verify(monkeypatch, capsys, path, "--data", str(data),
                              "--label-column", "label")  # fmt: skip

    assert code == 0, err
    assert lines == [f"ledger intact: 3 entries, head {head.hash[:12]}…, 1 dataset(s)"]
    assert head.hash != GENESIS
    assert files_under(tmp_path) == before


def test_verify_reports_a_deleted_ledger_file_and_does_not_recreate_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = trained_site(tmp_path)
    delete_ledger_file(path)
    before = files_under(tmp_path)

    code, lines, err = verify(monkeypatch, capsys, path)

    assert code == 9
    assert len(lines) == 1 and "the ledger file is missing" in lines[0]
    assert "recorded 3 entries" in lines[0]
    assert "hint:" in err and "Traceback" not in err
    assert not path.exists() and files_under(tmp_path) == before


def test_verify_reports_an_empty_ledger_swapped_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = trained_site(tmp_path)
    delete_ledger_file(path)
    PrivacyLedger(tmp_path / "fresh.sqlite").close()
    (tmp_path / "fresh.sqlite").rename(path)

    code, lines, _ = verify(monkeypatch, capsys, path)

    assert code == 9
    assert any("holds 0 entries but its anchor" in line for line in lines)
    assert any("dataset declaration(s) but its anchor" in line for line in lines)
    assert any("site policy" in line for line in lines)


@pytest.mark.parametrize("where", ["last", "middle"])
def test_verify_reports_a_dropped_trigger_and_a_deleted_entry(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    path, _ = trained_site(tmp_path)
    target = "(SELECT max(seq) FROM entries)" if where == "last" else "2"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("DROP TRIGGER entries_no_delete")
    raw.execute(f"DELETE FROM entries WHERE seq = {target}")
    raw.close()

    code, lines, _ = verify(monkeypatch, capsys, path)

    assert code == 9
    assert any("trigger entries_no_delete is missing" in line for line in lines)
    assert any("holds 2 entries but its anchor" in line for line in lines)
    if where == "middle":
        assert any(line.startswith("entry 3: its prev_hash does not link") for line in lines)


def test_verify_reports_a_data_file_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = trained_site(tmp_path)
    changed = write_csv(tmp_path / "changed.csv", nudge=0.001)
    with PrivacyLedger(path) as ledger:
        declared = ledger.current_dataset()
        with pytest.raises(LedgerError, match="the site's data changed since it last trained"):
            ledger.declare_dataset(data_fingerprint(changed, "label"), new=False)

    code, lines, _ = verify(monkeypatch, capsys, path, "--data", str(changed),
                            "--label-column", "label")  # fmt: skip

    assert code == 9
    (line,) = lines
    assert "the data file's fingerprint is not the dataset this ledger last declared" in line
    assert declared is not None and short_fingerprint(declared) in line


def test_verify_of_a_rewritten_entry_exits_9_through_the_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = trained_site(tmp_path)
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("DROP TRIGGER entries_no_update")
    raw.execute("UPDATE entries SET steps = 1 WHERE seq = 1")
    raw.close()

    code, out, err = run_main(monkeypatch, capsys, "--ledger", str(path), "--verify")

    assert code == 9
    assert "entry 1: its hash does not match its contents: rewritten" in out
    assert "Traceback" not in err
