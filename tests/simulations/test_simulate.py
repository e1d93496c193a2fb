"""Integration: a real 2-site, 2-round `fedvault simulate` on Flower's Simulation Engine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from opacus.accountants import PRVAccountant

from fedvault.common.report import METRIC_COLUMNS, read_jsonl
from fedvault.runtime.processes import _alive, session_members

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def _simulate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The venv's bin folder is deliberately NOT on PATH: an un-activated install must work
    # (Flower starts flower-superexec & co. by name).
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "PATH": path}
    return subprocess.run(
        [sys.executable, "-m", "fedvault", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=380,
        cwd=tmp_path,
        env=env,
    )


def _independent_prv_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = PRVAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return float(accountant.get_epsilon(delta=delta))


@pytest.fixture(scope="module")
def two_site_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    tmp_path = tmp_path_factory.mktemp("simulate")
    run_dir = tmp_path / "run"
    proc = _simulate(
        tmp_path, "--sites", "2", "--rounds", "2", "--epsilon", "1.0", "--out", str(run_dir)
    )
    return run_dir, proc


def test_run_succeeds_and_shows_progress_per_round(
    two_site_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    _, proc = two_site_run

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(
        r"round 1/2\s+accuracy \d\.\d{3}\s+loss \d\.\d+\s+max ε \d\.\d{3}", proc.stdout
    )
    assert re.search(r"round 2/2\s+accuracy", proc.stdout)
    assert "insecure (plaintext)" in proc.stderr  # loud about simulation's insecure SuperLink
    assert "Traceback" not in proc.stdout + proc.stderr


def test_loss_goes_down_and_epsilon_stays_within_target(
    two_site_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run_dir, _ = two_site_run

    rounds = read_jsonl(run_dir / "rounds.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())

    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["loss"] < rounds[0]["loss"]  # the trained model beats the initial one
    assert summary["final_loss"] < summary["initial_loss"]
    assert 0 < summary["epsilon"] <= 1.0
    assert summary["rounds"] == 2 and summary["sites"] == 2
    assert summary["delta"] == 1e-5 and summary["accountant"] == "prv"
    assert 0.0 <= summary["final_accuracy"] <= 1.0


def test_metrics_rows_compose_epsilon_across_rounds(
    two_site_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run_dir, _ = two_site_run

    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["round"] > 0]

    assert {(r["round"], r["site"]) for r in rows} == {
        (1, "site-1"),
        (1, "site-2"),
        (2, "site-1"),
        (2, "site-2"),
    }
    for row in rows:
        assert set(METRIC_COLUMNS) <= set(row)
        expected = _independent_prv_epsilon(
            row["noise_multiplier"], row["sample_rate"], row["steps"], row["delta"]
        )
        assert row["epsilon"] == pytest.approx(expected, rel=0.02)
    for site in ("site-1", "site-2"):
        first, second = sorted((r for r in rows if r["site"] == site), key=lambda r: r["round"])
        assert second["steps"] == 2 * first["steps"]  # cumulative steps, not per round
        assert second["epsilon"] > first["epsilon"]  # composed, never reset per round
        assert second["noise_multiplier"] == first["noise_multiplier"]  # calibrated once


def test_run_directory_holds_config_model_and_plot(
    two_site_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run_dir, _ = two_site_run

    config = (run_dir / "config.toml").read_text()
    state = torch.load(run_dir / "model.pt", weights_only=True)
    png = (run_dir / "accuracy_epsilon.png").read_bytes()

    assert "sites = 2" in config and "target-epsilon = 1.0" in config
    assert state and all(torch.isfinite(t).all() for t in state.values())
    assert png.startswith(b"\x89PNG")


def test_no_process_is_left_behind(
    two_site_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run_dir, _ = two_site_run

    log = (run_dir / "flower.log").read_text()
    pids = [int(p) for p in re.findall(r"fedvault: started pid=(\d+)", log)]
    stopped = re.findall(r"fedvault: stopped pid=(\d+) descendants=\[([\d, ]*)\]", log)
    tree = [int(p) for _, found in stopped for p in found.split(",") if p.strip()]

    assert len(pids) == 2  # the SuperLink and the `flwr run` submission
    assert sorted(int(p) for p, _ in stopped) == sorted(pids)
    assert len(tree) >= 1  # SuperLink had children (SuperExec, simulation, Ray) to stop
    for pid in pids + tree:
        assert not _alive(pid), f"process {pid} survived the run"
    for pid in pids:
        assert session_members(pid) == []  # nor anything else in their sessions


# --- report.html ----------------------------------------------------------------------------


def test_report_renders_in_a_headless_browser_without_network_resources(
    two_site_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    # Prepare
    run_dir, _ = two_site_run
    report = run_dir / "report.html"
    page = report.read_text(encoding="utf-8")
    shot = tmp_path / "report.png"

    # Execute: Debian's chromium (.ci/run installs it), its profile in tmp_path
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed: apt-get install -y chromium"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            report.resolve().as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    pixels = matplotlib.image.imread(shot)

    # Assert: a page, not a blank canvas; nothing fetched from anywhere
    assert pixels.shape[:2] == (2000, 1200)
    non_white = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert non_white > 0.03, f"only {non_white:.2%} of the screenshot is not white"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "url(" not in page
    assert page.count('src="data:image/png;base64,') == 2  # overall and per-site curves


def test_report_names_every_site_and_its_epsilon(
    two_site_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run_dir, _ = two_site_run

    page = (run_dir / "report.html").read_text(encoding="utf-8")
    summary = json.loads((run_dir / "summary.json").read_text())

    assert summary["site_epsilon"]
    for site, epsilon in summary["site_epsilon"].items():
        assert site in page
        assert f"{epsilon:.3f}" in page
    cls = summary["classification"]["overall"]
    assert f"{cls['balanced_accuracy']:.3f}" in page and f"{cls['roc_auc']:.3f}" in page
    assert sum(map(sum, cls["confusion"])) == sum(
        r["test_examples"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["round"] == 0
    )
