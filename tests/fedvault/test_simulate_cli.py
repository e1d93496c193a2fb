"""How `fedvault simulate` names a run: after its scenario, or after its data when none is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvault.cli.options import new_run_dir
from fedvault.cli.simulate import dataset_run_name, scenario_layer
from fedvault.common.config import build_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("dataset", "name"),
    [
        ("csv:data/loans.csv", "loans"),
        ("csv:/srv/site a/Patients 2024.csv", "Patients-2024"),
        ("breast-cancer", "breast-cancer"),
        ("fashion-mnist", "fashion-mnist"),
        ("csv:", "dataset"),
    ],
)
def test_dataset_run_name_is_the_csv_stem_or_the_built_in_name(dataset: str, name: str) -> None:
    # Execute / Assert
    assert dataset_run_name(dataset) == name


def test_a_csv_run_without_a_scenario_is_named_after_its_file(tmp_path: Path) -> None:
    # Prepare
    dataset = "csv:" + str(tmp_path / "loans.csv")

    # Execute
    flags = {"data": {"dataset": dataset, "label-column": "default"}}
    cfg = build_config(scenario_layer(None, dataset), flags)
    run_dir = new_run_dir(cfg.name, None)

    # Assert: neither its label nor its default folder says "hospitals"
    assert cfg.name == "loans"
    assert run_dir.name.startswith("loans-")


def test_a_named_scenario_keeps_its_name_whatever_the_dataset() -> None:
    # Execute
    cfg = build_config(scenario_layer("banks", "breast-cancer"), {"data": {"dataset": "digits"}})

    # Assert
    assert cfg.name == "banks"


def test_the_default_scenario_without_a_dataset_keeps_its_name() -> None:
    # Execute / Assert
    assert build_config(scenario_layer(None, None), {}).name == "hospitals"
