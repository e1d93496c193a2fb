"""The README's export commands, exactly as written, in a fresh folder: a real simulation, then
its run directory into MLflow (a local SQLite store) and TensorBoard event files."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.common.test_exports import read_events
from tests.deployment import fedvault_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "### Export a run to MLflow or TensorBoard"


def readme_commands() -> list[list[str]]:
    """The commands of the ```bash block in the README's export section."""
    body = README.read_text(encoding="utf-8").split(f"\n{SECTION}\n", 1)[1].split("\n#", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", body, re.DOTALL)
    return [w for w in (shlex.split(line, comments=True) for line in block.splitlines()) if w]


def test_the_readme_export_commands_run_as_written(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    # Prepare: the commands as the README shows them
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["fedvault", "simulate"], *[["fedvault", "export"]] * 2]
    outputs = []

    # Execute: each, in order, in one fresh working folder
    for words in commands:
        done = subprocess.run(
            [sys.executable, "-m", "fedvault", *words[1:]],
            cwd=tmp_path, capture_output=True, text=True, timeout=500,
            env=fedvault_env(), check=False,
        )  # fmt: skip
        assert done.returncode == 0, (words, done.stdout[-2000:], done.stderr[-3000:])
        assert "Traceback" not in done.stderr
        outputs.append(done.stdout)

    # Assert: MLflow holds the run's rounds as the run directory does, with its report
    run_dir = tmp_path / commands[1][2]
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    store = tmp_path / commands[1][commands[1].index("--mlflow") + 1]
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "fedvault"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "overall/accuracy")
    logged = sorted((m.step, m.value) for m in history)
    assert [step for step, _ in logged] == [r["round"] for r in rounds]
    assert [value for _, value in logged] == pytest.approx([r["accuracy"] for r in rounds])
    assert run.data.params["federation.rounds"] == str(len(rounds) - 1)
    assert "report.html" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert f"logged as run {run.info.run_id}" in outputs[1]

    # ... and TensorBoard's event files the same series, per site too
    logdir = tmp_path / commands[2][commands[2].index("--tensorboard") + 1]
    scalars = read_events(logdir / run_dir.name)
    assert [s for s, _ in scalars["overall/accuracy"]] == [r["round"] for r in rounds]
    assert scalars["overall/accuracy"][-1][1] == pytest.approx(rounds[-1]["accuracy"], abs=1e-6)
    sites = json.loads((run_dir / "summary.json").read_text())["site_names"]
    assert all(f"site/{site}/epsilon" in scalars for site in sites) and len(sites) == 3
