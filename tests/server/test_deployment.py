"""Integration: provision 3 sites, start coordinator and sites as real processes, run 2 rounds."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedvault.common.errors import EXIT_INTERRUPTED
from fedvault.common.report import read_jsonl
from tests.deployment import (
    fedvault_env,
    fedvault_process,
    flower_processes_of,
    provision,
    wait_for,
    write_site_csvs,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _logged_pids(*logs: Path) -> list[int]:
    """Every PID fedvault logged as started or stopped (children and descendants included)."""
    pids: set[int] = set()
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else ""
        pids.update(int(p) for p in re.findall(r"fedvault: started pid=(\d+)", text))
        for found in re.findall(r"descendants=\[([\d, ]*)\]", text):
            pids.update(int(p) for p in found.split(",") if p.strip())
    return sorted(pids)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Run the whole journey once; the tests below inspect what it left."""
    tmp = tmp_path_factory.mktemp("deploy")
    federation, port = provision(tmp, SITES)
    csvs = write_site_csvs(tmp, len(SITES))
    server_kit = federation / "server"
    outcome: dict[str, object] = {"federation": federation, "csvs": csvs, "tmp": tmp}
    server_log = tmp / "server.log"
    with fedvault_process(
        ["server", "start", "--kit", str(server_kit), "--listen", f"127.0.0.1:{port}"], server_log
    ) as server:
        wait_for(server_log, r"^ready:", server, timeout=90)
        site_procs = []
        try:
            for site, csv_path in zip(SITES, csvs, strict=True):
                log = tmp / f"{site}.log"
                ctx = fedvault_process(
                    ["client", "start", "--kit", str(federation / "sites" / site),
                     "--data", str(csv_path), "--label-column", "diagnosis", "--device", "cpu"],
                    log,
                )  # fmt: skip
                proc = ctx.__enter__()
                site_procs.append((ctx, proc, log))
                wait_for(log, r"fedvault client site", proc, timeout=90)
            run = subprocess.run(
                [sys.executable, "-m", "fedvault", "run", "--kit", str(server_kit),
                 "--rounds", "2", "--epsilon", "1.0", "--out", str(tmp / "run")],
                capture_output=True, text=True, timeout=500, env=fedvault_env(), check=False,
            )  # fmt: skip
            outcome["run"] = run
            # A second, long run is interrupted with SIGTERM after its first round: it must
            # be stopped at the SuperLink too, not just stop being displayed.
            long_log = tmp / "long-run.log"
            with fedvault_process(
                ["run", "--kit", str(server_kit), "--rounds", "30", "--epsilon", "8",
                 "--out", str(tmp / "long-run")],
                long_log,
            ) as long_run:  # fmt: skip
                wait_for(long_log, r"round 1/30", long_run, timeout=240)
                long_run.send_signal(signal.SIGTERM)
                long_run.wait(timeout=60)
            outcome["long_run_code"] = long_run.returncode
            listing = subprocess.run(
                [str(Path(sys.executable).parent / "flwr"), "ls", "fedvault-coordinator",
                 "--format", "json"],
                capture_output=True, text=True, timeout=60, check=False,
                env={**fedvault_env(), "FLWR_HOME": str(server_kit / "state" / "flwr-home")},
            )  # fmt: skip
            outcome["runs"] = json.loads(listing.stdout[listing.stdout.index("{") :])["runs"]
        finally:
            for ctx, _, _ in reversed(site_procs):
                ctx.__exit__(None, None, None)
            outcome["site_codes"] = [proc.returncode for _, proc, _ in site_procs]
    outcome["server_code"] = server.returncode
    outcome["server_log"] = server_log
    outcome["site_logs"] = [log for _, _, log in site_procs]
    return outcome


def test_run_over_tls_completes_with_progress(deployment: dict[str, object]) -> None:
    run = deployment["run"]
    assert isinstance(run, subprocess.CompletedProcess)

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"round 2/2\s+accuracy \d\.\d{3}", run.stdout)
    assert "TLS" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr


def test_metrics_come_from_all_three_sites(deployment: dict[str, object]) -> None:
    run_dir = Path(str(deployment["tmp"])) / "run"

    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["round"] > 0]
    summary = json.loads((run_dir / "summary.json").read_text())

    assert {(r["round"], r["site"]) for r in rows} == {(n, s) for n in (1, 2) for s in SITES}
    assert summary["rounds"] == 2 and summary["sites"] == 3
    assert sorted(summary["site_epsilon"]) == SITES
    assert 0 < summary["epsilon"] <= 1.0
    assert summary["final_loss"] < summary["initial_loss"]
    assert (run_dir / "model.pt").stat().st_size > 0
    assert (run_dir / "accuracy_epsilon.png").read_bytes().startswith(b"\x89PNG")


def test_site_data_paths_never_reach_the_coordinator(deployment: dict[str, object]) -> None:
    federation = Path(str(deployment["federation"]))
    csvs = [Path(str(p)) for p in deployment["csvs"]]  # type: ignore[attr-defined]
    coordinator_files = [
        *(federation / "server" / "state").rglob("*"),
        *(Path(str(deployment["tmp"])) / "run").rglob("*"),
    ]

    leaked = [
        (str(path), csv.name)
        for path in coordinator_files
        if path.is_file()
        for csv in csvs
        if csv.name.encode() in path.read_bytes()
    ]

    assert any(p.name == "superlink.db" for p in coordinator_files)  # the check saw the state
    assert leaked == []


def test_an_interrupted_run_is_stopped_at_the_superlink(deployment: dict[str, object]) -> None:
    runs = deployment["runs"]
    assert isinstance(runs, list)

    statuses = sorted(str(r["status"]) for r in runs)

    assert deployment["long_run_code"] == EXIT_INTERRUPTED
    assert len(runs) == 2
    assert any("completed" in s for s in statuses)  # the 2-round run
    assert any("stopped" in s for s in statuses)  # the interrupted 30-round run


def test_everything_is_stopped_cleanly(deployment: dict[str, object]) -> None:
    federation = Path(str(deployment["federation"]))
    logs = [
        federation / "server" / "state" / "superlink.log",
        *(federation / "sites" / site / "state" / "supernode.log" for site in SITES),
    ]

    pids = _logged_pids(*logs)

    assert deployment["server_code"] == 0
    assert deployment["site_codes"] == [0, 0, 0]
    assert len(pids) >= 4  # a SuperLink, three SuperNodes, and their children
    assert flower_processes_of(pids) == []
    assert not (federation / "server" / "state" / "server.json").exists()
