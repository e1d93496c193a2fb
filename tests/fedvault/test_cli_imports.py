"""`fedvault --help` answers at once: the CLI imports no ML or Flower library until a command runs.

Each test starts one fresh interpreter (the only way to see what importing the CLI loads);
the timings themselves are in benchmarks/RESULTS.md, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

#: Libraries that cost seconds to import; `--help` and `--version` must load none of them.
HEAVY = ("opacus", "torch", "sklearn", "matplotlib", "flwr", "pandas", "scipy", "numpy",
         "mlflow", "tensorboardX")  # fmt: skip

#: The CLI's modules, imported alone and together.
CLI_MODULES = (
    "fedvault.cli.app",
    "fedvault.cli.deploy",
    "fedvault.cli.simulate",
    "fedvault.cli.options",
    "fedvault.cli.output",
    "fedvault.cli.provision",
    "fedvault.cli.export",
)

EVERY_HELP = """
import json, sys
import click, typer.main
from typer.testing import CliRunner
from fedvault.cli.app import app

def paths(command, path):
    yield path
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from paths(sub, [*path, name])

codes = {}
for path in paths(typer.main.get_command(app), []):
    codes[" ".join(path)] = CliRunner().invoke(app, [*path, "--help"]).exit_code
codes["--version"] = CliRunner().invoke(app, ["--version"]).exit_code
print(json.dumps({"codes": codes, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_importing_the_cli_loads_no_heavy_library() -> None:
    # Execute
    code = f"import json, sys, {', '.join(CLI_MODULES)}; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(fresh_python(code).stdout))

    # Assert
    assert set(CLI_MODULES) <= loaded
    heavy = sorted(name for name in loaded if name.split(".")[0] in HEAVY)
    assert heavy == []


def test_every_help_and_version_answer_without_loading_a_heavy_library() -> None:
    # Execute
    report = json.loads(fresh_python(EVERY_HELP).stdout)

    # Assert
    codes = report["codes"]
    assert {"simulate", "run", "server start", "client start", "client budget"} <= set(codes)
    assert {"provision", "provision add-site", "provision revoke-site"} <= set(codes)
    assert set(codes.values()) == {0}, codes
    assert set(report["modules"]).isdisjoint(HEAVY), sorted(set(report["modules"]) & set(HEAVY))


#: What `fedvault simulate` does in its own process before and while its SuperLink runs: build
#: the config and the sites' policy, check the data, then start and follow the run.
SIMULATE_PROCESS = """
import json, sys
from pathlib import Path
from fedvault.common.config import build_config
from fedvault.cli.simulate import check_data, scenario_layer, simulated_site_policy
from fedvault.simulations.runner import simulate

cfg = build_config(scenario_layer(None, None), {})
simulated_site_policy(cfg, Path("ledgers"), ["hospital-a=3"])
check_data(cfg)
print(json.dumps(sorted(sys.modules)))
"""


def test_the_simulate_command_process_loads_neither_torch_nor_opacus_nor_sklearn() -> None:
    # The sites train in the simulation's own processes; the command only checks the data,
    # starts and follows them, so it must not pay seconds of torch, Opacus and scikit-learn
    # imports before its SuperLink starts.
    # Execute
    loaded = set(json.loads(fresh_python(SIMULATE_PROCESS).stdout))

    # Assert
    assert {"fedvault.simulations.runner", "fedvault.common.config"} <= loaded
    tops = {name.split(".")[0] for name in loaded}
    assert sorted(tops & {"torch", "opacus", "sklearn", "scipy", "matplotlib"}) == []


def test_fedvault_help_runs_as_a_program() -> None:
    # Execute
    result = subprocess.run(
        [sys.executable, "-m", "fedvault", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "80"},
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert "simulate" in result.stdout
    assert "Exit codes" in result.stdout
    assert result.stderr == ""


def test_the_clis_default_cap_is_the_ledgers() -> None:
    from fedvault.cli import deploy as deploy_cli
    from fedvault.common.ledger import DEFAULT_MAX_EPSILON

    assert deploy_cli.DEFAULT_MAX_EPSILON == DEFAULT_MAX_EPSILON
