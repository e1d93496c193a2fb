"""Integration: a site ledger that forgets between runs is caught, never silently reset.

Three simulated hospitals train a run with a shared ``--ledger-dir``; then each hospital's
ledger is reset the way an operator with a shell could, and a second run starts:

- hospital-a: the SQLite file deleted (its anchor file remains) — the site itself refuses to
  train on a ledger that lost its history (LedgerError), and the coordinator names it;
- hospital-b: ``DROP TRIGGER`` then ``DELETE`` of its last entry, anchor deleted too — the
  chain is still whole; the missing trigger or the coordinator (the ledger went backwards)
  gives it away;
- hospital-c: an empty ledger swapped in and its anchor deleted — the coordinator sees the
  ledger went backwards.

Each reset is also reported by `fedvault client budget --verify` at the site, which must see
what is wrong without the coordinator's help wherever the anchor survived.
"""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from fedvault.common.ledger import PrivacyLedger
from fedvault.common.report import read_jsonl
from tests.simulations.test_simulate import _simulate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def _remove_ledger(path: Path, *, anchor: bool) -> None:
    for suffix in ("", "-wal", "-shm", *([".anchor"] if anchor else [])):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _verify(ledger: Path) -> subprocess.CompletedProcess[str]:
    """`fedvault client budget --ledger LEDGER --verify` through fedvault.cli.app.main, here.

    In this process, as tests/fedvault/conftest.py's fedvault_cli runs the CLI (the console
    script itself has its own smoke test in tests/client/test_budget.py).
    """
    from fedvault.cli.app import main

    args = ["client", "budget", "--ledger", str(ledger), "--verify"]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
        patch.setattr(sys, "argv", ["fedvault", *args])
        patch.setattr(signal, "signal", lambda *_: None)  # keep pytest's own handlers
        patch.setenv("NO_COLOR", "1")
        patch.setenv("COLUMNS", "200")
        try:
            main()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def tampered(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Any], list[dict[str, Any]], dict[str, subprocess.CompletedProcess[str]]]:
    tmp_path = tmp_path_factory.mktemp("ledger-tamper")
    ledgers = tmp_path / "ledgers"
    args = ["--rounds", "2", "--epsilon", "1.0", "--ledger-dir", str(ledgers)]
    first = _simulate(tmp_path, *args, "--out", str(tmp_path / "first"))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]

    a, b, c = (ledgers / f"hospital-{x}.sqlite" for x in "abc")
    _remove_ledger(a, anchor=False)
    with sqlite3.connect(b) as conn:
        conn.execute("DROP TRIGGER entries_no_delete")
        conn.execute("DELETE FROM entries WHERE seq = (SELECT max(seq) FROM entries)")
    Path(f"{b}.anchor").unlink()
    _remove_ledger(c, anchor=True)
    PrivacyLedger(c).close()  # an empty ledger in its place
    Path(f"{c}.anchor").unlink(missing_ok=True)
    verified = {"hospital-a": _verify(a), "hospital-b": _verify(b)}

    second_dir = tmp_path / "second"
    second = _simulate(tmp_path, *args, "--out", str(second_dir))
    assert "Traceback" not in second.stdout + second.stderr
    summary = json.loads((second_dir / "summary.json").read_text())
    return second_dir, summary, read_jsonl(second_dir / "rounds.jsonl"), verified


def test_the_coordinator_names_every_site_whose_ledger_forgot(
    tampered: tuple[Path, dict[str, Any], list[dict[str, Any]], Any],
) -> None:
    _, summary, _, _ = tampered

    alerts = summary["ledger_alerts"]
    assert set(alerts) == {"hospital-a", "hospital-b", "hospital-c"}
    # hospital-b's missing trigger may be caught by the site itself, else by the coordinator
    assert any(w in " ".join(alerts["hospital-b"]) for w in ("went backwards", "LedgerError"))
    assert "went backwards" in " ".join(alerts["hospital-c"])
    assert "LedgerError" in " ".join(alerts["hospital-a"])


def test_a_site_whose_anchor_survived_refuses_to_train_on_the_forgetful_ledger(
    tampered: tuple[Path, dict[str, Any], list[dict[str, Any]], Any],
) -> None:
    _, summary, rounds, _ = tampered

    assert "hospital-a" in summary["refused_sites"]
    assert all("hospital-a" in r["refused_sites"] for r in rounds if r["round"] > 0)


def test_the_progress_lines_flag_the_ledgers(
    tampered: tuple[Path, dict[str, Any], list[dict[str, Any]], Any],
) -> None:
    _, _, rounds, _ = tampered

    first_round = next(r for r in rounds if r["round"] == 1)
    assert set(first_round["ledger_alerts"]) == {"hospital-a", "hospital-b", "hospital-c"}


def test_client_budget_verify_reports_each_reset_at_the_site(
    tampered: tuple[Path, dict[str, Any], list[dict[str, Any]], Any],
) -> None:
    _, _, _, verified = tampered

    for site, proc in verified.items():
        assert proc.returncode == 9, (site, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr
