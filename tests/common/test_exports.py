"""Tests for common/exports.py: a run directory into MLflow (SQLite store) and TensorBoard."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from fedvault.common.errors import ConfigError
from fedvault.common.exports import (
    SOURCE_TAG,
    export_mlflow,
    export_tensorboard,
    mlflow_target,
    read_run,
)

pytestmark = pytest.mark.unit

SITES = ("hospital-a", "hospital-b")


def make_run(folder: Path, rounds: int = 3) -> Path:
    """A run directory with the files a finished run writes (the keys real runs use)."""
    folder.mkdir(parents=True)
    overall, per_site = [], []
    for rnd in range(rounds + 1):
        overall.append({"round": rnd, "accuracy": 0.5 + rnd / 10, "loss": 1.0 / (rnd + 1),
                        "balanced_accuracy": 0.4 + rnd / 10, "macro_f1": 0.45 + rnd / 10,
                        "roc_auc": None if rnd == 0 else 0.9, "epsilon": 0.3 * rnd,
                        "sites": 2, "failed_sites": []})  # fmt: skip
        for i, site in enumerate(SITES):
            per_site.append({"round": rnd, "site": site, "accuracy": 0.5 + i / 10, "loss": 0.7,
                             "epsilon": 0.3 * rnd + i, "num_examples": 10})  # fmt: skip
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in overall))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per_site))
    summary = {"name": "hospitals", "dataset": "breast-cancer", "model": "logistic",
               "rounds": rounds, "epsilon": 0.9, "started_at": "2026-12-02T05:00:00+00:00",
               "failed_sites": {"hospital-c": "Node Unavailable"}}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.toml").write_text(
        'name = "hospitals"\n[federation]\nrounds = 3\nsite-names = ["a", "b"]\n'
        "[privacy]\ntarget-epsilon = 1.0\n"
    )
    (folder / "report.html").write_text("<html><body>report</body></html>")
    return folder


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files in ``folder``, read back from the TFRecord
    framing (8-byte length, 4-byte CRC, the Event proto, 4-byte CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_read_run_keeps_every_round_and_site_metric(tmp_path: Path) -> None:
    run = read_run(make_run(tmp_path / "run"))

    tags = {(tag, step) for tag, _, step in run.scalars()}

    assert ("overall/accuracy", 3) in tags and ("overall/epsilon", 0) in tags
    assert ("site/hospital-b/epsilon", 2) in tags
    assert ("overall/roc_auc", 0) not in tags  # no value (None) is not a zero
    assert run.params["federation.rounds"] == "3"
    assert run.params["federation.site-names"] == '["a", "b"]'


def test_read_run_lists_every_missing_file_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "summary.json").write_text("{not json")

    with pytest.raises(ConfigError) as err:
        read_run(folder)

    message = str(err.value)
    assert "rounds.jsonl is missing" in message and "metrics.jsonl is missing" in message
    assert "summary.json cannot be read" in message


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_read_run_refuses_what_is_not_a_folder(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "run"
    if kind == "file":
        path.write_text("x")
    with pytest.raises(ConfigError, match="does not exist" if kind == "missing" else "a file"):
        read_run(path)


def test_mlflow_gets_the_metrics_params_tags_and_report_once(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = read_run(make_run(tmp_path / "run"))
    store = tmp_path / "mlflow.db"

    run_id, logged = export_mlflow(run, str(store), experiment="fedvault")
    again, logged_again = export_mlflow(run, str(store), experiment="fedvault")

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    got = client.get_run(run_id)
    history = client.get_metric_history(run_id, "overall/accuracy")
    assert logged and not logged_again and again == run_id
    assert [(m.step, round(m.value, 6)) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8)
    ]  # fmt: skip
    assert got.data.metrics["site/hospital-b/epsilon"] == pytest.approx(0.9 + 1)
    assert got.data.params["privacy.target-epsilon"] == "1.0"
    assert got.data.tags[SOURCE_TAG] == run.identity
    assert got.data.tags["fedvault.failed.hospital-c"] == "Node Unavailable"
    assert got.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.html", "summary.json", "config.toml"} <= artifacts
    assert (tmp_path / "mlflow-artifacts").is_dir()  # beside the store, not in the cwd
    experiments = client.search_experiments()
    assert [e.name for e in experiments if e.name != "Default"] == ["fedvault"]
    assert len(client.search_runs([got.info.experiment_id])) == 1


def test_a_second_run_directory_is_a_second_mlflow_run(tmp_path: Path) -> None:
    store = str(tmp_path / "mlflow.db")
    first, _ = export_mlflow(read_run(make_run(tmp_path / "a")), store, experiment="e")
    second, logged = export_mlflow(read_run(make_run(tmp_path / "b")), store, experiment="e")
    assert logged and first != second


def test_mlflow_target_is_a_sqlite_file_or_a_uri(tmp_path: Path) -> None:
    uri, artifacts = mlflow_target(str(tmp_path / "m.db"))
    assert uri == f"sqlite:///{tmp_path / 'm.db'}" and artifacts == tmp_path / "m-artifacts"
    assert mlflow_target("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None)
    with pytest.raises(ConfigError, match="is a folder"):
        mlflow_target(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        mlflow_target(str(tmp_path / "nope" / "m.db"))


def test_tensorboard_event_files_hold_the_same_series(tmp_path: Path) -> None:
    run = read_run(make_run(tmp_path / "run"))

    folder = export_tensorboard(run, tmp_path / "tb")

    scalars = read_events(folder)
    assert folder == tmp_path / "tb" / "run"
    assert [(s, round(v, 6)) for s, v in scalars["overall/accuracy"]] == [
        (0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8)
    ]  # fmt: skip
    assert len(scalars["site/hospital-a/epsilon"]) == 4
    assert "overall/roc_auc" in scalars and len(scalars["overall/roc_auc"]) == 3
    with pytest.raises(ConfigError, match="exported there already"):
        export_tensorboard(run, tmp_path / "tb")


def test_tensorboard_refuses_a_file_as_its_folder(tmp_path: Path) -> None:
    (tmp_path / "tb").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        export_tensorboard(read_run(make_run(tmp_path / "run")), tmp_path / "tb")


@pytest.mark.parametrize(
    ("module", "extra"), [("tensorboardX", "tensorboard"), ("mlflow", "mlflow")]
)
def test_a_missing_extra_is_named_with_its_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, extra: str
) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    run = read_run(make_run(tmp_path / "run"))

    with pytest.raises(ConfigError) as err:
        if extra == "mlflow":
            export_mlflow(run, str(tmp_path / "m.db"), experiment="e")
        else:
            export_tensorboard(run, tmp_path / "tb")

    assert f"fedvault[{extra}]" in err.value.hint
    assert not (tmp_path / "tb").exists() and not (tmp_path / "m.db").exists()
