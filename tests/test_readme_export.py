"""The README's export commands, exactly as written, in a fresh folder: a real simulation, then
its run directory into MLflow (a local SQLite store) and TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.common.test_exports import read_events
from tests.readme import bash_commands, run_fedvault

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SECTION = "### Export a run to MLflow or TensorBoard"


def test_the_readme_export_commands_run_as_written(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    # Prepare: the commands as the README shows them
    (commands,) = bash_commands(SECTION)
    assert [c[:2] for c in commands] == [["fedvault", "simulate"], *[["fedvault", "export"]] * 2]
    outputs = []

    # Execute: each, in order, in one fresh working folder
    for words in commands:
        done = run_fedvault(words, tmp_path, timeout=500)
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
