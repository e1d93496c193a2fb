"""Integration: consecutive `fedvault simulate` runs share the sites' privacy ledgers.

Three simulated hospitals train twice on the same data with the same ``--ledger-dir``. The
second run's first reported epsilon is above the first run's last (the budget composes
across runs, never resets), and a site whose own cap would be exceeded refuses while the
run completes with the others and its summary names the refusing site.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fedvault.common.ledger import PrivacyLedger
from fedvault.common.privacy import compute_epsilon
from fedvault.common.report import read_jsonl
from tests.simulations.test_simulate import _simulate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

DELTA = 1e-5
#: hospital-c's own cap: one run at target ε = 1 fits, a second round of the next does not.
CAP = 1.0


def _site_eps(run_dir: Path, site: str) -> list[float]:
    return [
        r["epsilon"]
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r["site"] == site and r["round"] > 0 and r["round_steps"] > 0
    ]


@pytest.fixture(scope="module")
def two_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[Path], list[subprocess.CompletedProcess[str]]]:
    tmp_path = tmp_path_factory.mktemp("ledger-runs")
    ledgers = tmp_path / "ledgers"
    runs, procs = [tmp_path / "first", tmp_path / "second"], []
    for run_dir in runs:
        args = ["--rounds", "2", "--epsilon", "1.0", "--delta", str(DELTA),
                "--ledger-dir", str(ledgers), "--site-max-epsilon", f"hospital-c={CAP}",
                "--out", str(run_dir)]  # fmt: skip
        procs.append(_simulate(tmp_path, *args))
    return ledgers, runs, procs


def test_both_runs_complete(
    two_runs: tuple[Path, list[Path], list[subprocess.CompletedProcess[str]]],
) -> None:
    _, _, procs = two_runs

    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Traceback" not in proc.stdout + proc.stderr


def test_second_run_starts_above_where_the_first_ended(
    two_runs: tuple[Path, list[Path], list[subprocess.CompletedProcess[str]]],
) -> None:
    _, (first, second), _ = two_runs

    for site in ("hospital-a", "hospital-b"):
        before, after = _site_eps(first, site), _site_eps(second, site)
        assert len(before) == len(after) == 2
        assert after[0] > before[-1] > before[0]  # composed across runs, never reset
        assert after[1] > after[0]


def test_the_site_over_its_own_cap_refuses_and_is_named(
    two_runs: tuple[Path, list[Path], list[subprocess.CompletedProcess[str]]],
) -> None:
    _, (first, second), procs = two_runs
    summary: dict[str, Any] = json.loads((second / "summary.json").read_text())
    rounds = read_jsonl(second / "rounds.jsonl")

    assert _site_eps(first, "hospital-c")[-1] <= CAP
    assert set(summary["refused_sites"]) == {"hospital-c"}
    assert "privacy budget exhausted" in summary["refused_sites"]["hospital-c"]
    assert summary["rounds"] == 2  # the run went on with the other two sites
    assert all(r["refused_sites"] == ["hospital-c"] for r in rounds if r["round"] > 0)
    assert summary["privacy"]["sites"]["hospital-c"]["refused_rounds"] == [1, 2]
    assert "refused sites" in procs[1].stdout and "hospital-c" in procs[1].stdout
    assert "refused: hospital-c" in procs[1].stdout


def test_ledgers_compose_both_runs_and_stay_on_the_site(
    two_runs: tuple[Path, list[Path], list[subprocess.CompletedProcess[str]]],
) -> None:
    ledgers, (first, second), _ = two_runs

    for site in ("hospital-a", "hospital-b", "hospital-c"):
        path = ledgers / f"{site}.sqlite"
        assert path.stat().st_mode & 0o077 == 0  # 0600: the site's own record
        with PrivacyLedger(path) as ledger:
            (dataset,) = ledger.datasets()
            entries = ledger.entries(dataset)
            spent = ledger.spent(dataset, delta=DELTA)
        runs = {e.run_id for e in entries}
        expected_runs = {first.name} if site == "hospital-c" else {first.name, second.name}
        assert runs == expected_runs
        assert spent == pytest.approx(
            compute_epsilon([e.event for e in entries], delta=DELTA), rel=1e-9
        )
        if site != "hospital-c":
            assert spent == pytest.approx(_site_eps(second, site)[-1], rel=1e-6)
        text = "".join(p.read_text() for p in second.iterdir() if p.suffix in (".jsonl", ".json"))
        assert dataset not in text  # the data's fingerprint never reaches the coordinator
