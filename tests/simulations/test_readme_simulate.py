"""The README's `fedvault simulate` commands, exactly as written, each in a fresh folder.

What the README leaves to the user is put in that folder first, as a user would: the
scenario file `my_scenario.toml` (a copy of the shipped hospitals scenario) and
`patients.csv` (breast-cancer rows with an `outcome` label column). The `ledgers` commands
run one after the other in one folder, as the README means them (ε composes across runs).
`fashion-mnist` needs Debian's `dataset-fashion-mnist`: where it is not installed, the
command must fail with the one-line error that says how to install it; where it is, it runs.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from sklearn.datasets import load_breast_cancer

from fedvault.common.data import DEFAULT_FASHION_MNIST_DIR
from tests.readme import README, bash_commands, run_fedvault

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = README.parent
COMMANDS = bash_commands("## Simulate a federation")[0]


def _prepare(folder: Path) -> None:
    shutil.copy(ROOT / "simulations" / "hospitals.toml", folder / "my_scenario.toml")
    data = load_breast_cancer()
    with (folder / "patients.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(f"f{i}" for i in range(data.data.shape[1])), "outcome"])
        for row, label in zip(data.data, data.target, strict=True):
            writer.writerow([*row, "sick" if label else "well"])


def _run(words: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    assert words[:2] == ["fedvault", "simulate"]
    return run_fedvault(words, cwd, timeout)


def _summaries(folder: Path) -> list[dict[str, object]]:
    return [
        json.loads(p.read_text())
        for p in sorted((folder / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    ]


def test_the_readme_lists_the_commands_this_file_runs() -> None:
    assert [" ".join(w[2:3]) for w in COMMANDS][:3] == ["", "banks", "fashion-mnist"]
    assert sum("--ledger-dir" in w for w in COMMANDS) == 2 and ["--help"] in [
        w[2:] for w in COMMANDS
    ]


@pytest.mark.parametrize(
    "words",
    [w for w in COMMANDS if "--ledger-dir" not in w and "fashion-mnist" not in w],
    ids=lambda w: " ".join(w[2:]) or "(no arguments)",
)
def test_a_readme_simulate_command_runs_as_written(words: list[str], tmp_path: Path) -> None:
    _prepare(tmp_path)

    done = _run(words, tmp_path)

    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert "Traceback" not in done.stdout + done.stderr
    if words[2:] == ["--help"]:
        assert "simulate [OPTIONS] [SCENARIO]" in done.stdout and "--ledger-dir" in done.stdout
        return
    (summary,) = _summaries(tmp_path)
    assert summary["final_accuracy"] is not None and summary["ended_early"] is None
    if "--rounds" in words:
        assert summary["rounds"] == int(words[words.index("--rounds") + 1])
    if "--epsilon" in words:
        assert summary["target_epsilon"] == float(words[words.index("--epsilon") + 1])
    if "--sites" in words:
        assert summary["sites"] == int(words[words.index("--sites") + 1])
    if "--no-dp" in words:
        assert summary["dp"] is False and summary["epsilon"] == 0.0


def test_the_readme_ledger_commands_compose_epsilon_across_runs(tmp_path: Path) -> None:
    first, second = [w for w in COMMANDS if "--ledger-dir" in w]

    runs = [_run(first, tmp_path), _run(second, tmp_path)]

    for done in runs:
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    one, two = _summaries(tmp_path)
    site_one = one["site_epsilon"]
    site_two = two["site_epsilon"]
    assert isinstance(site_one, dict) and isinstance(site_two, dict)
    for site, epsilon in site_two.items():  # the second run's ε counts the first run's too
        assert epsilon > site_one[site], site
    assert site_two["hospital-c"] <= 1.5 + 1e-9  # its own cap, from the second command
    assert (tmp_path / "ledgers").is_dir()


def test_the_readme_fashion_mnist_command(tmp_path: Path) -> None:
    (words,) = [w for w in COMMANDS if "fashion-mnist" in w]

    done = _run(words, tmp_path, timeout=1500)

    if DEFAULT_FASHION_MNIST_DIR.is_dir():  # the package is installed: the run itself
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
        assert _summaries(tmp_path)[0]["final_accuracy"] is not None
    else:  # a fresh machine: one line that says what to install, no traceback
        assert done.returncode == 4, (done.stdout[-2000:], done.stderr[-3000:])
        assert "Traceback" not in done.stdout + done.stderr
        assert "apt-get install dataset-fashion-mnist" in done.stdout + done.stderr
