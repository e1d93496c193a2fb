"""Tests for client/deploy.py: a refused SuperNode activation, told apart by its own log."""

from __future__ import annotations

import inspect
import re
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from flwr.common.config import parse_config_args

import fedvault.cli.deploy as deploy_cli
from fedvault.client.deploy import (
    NODE_CONFIG_FILE,
    REACTIVATION_WINDOW_S,
    Site,
    SitePrivacySettings,
    check_delta,
    node_config_values,
    open_site_ledger,
    parse_models,
    refusal_reason,
    serve_until_stopped,
    write_node_config,
)
from fedvault.common.errors import ConfigError, LedgerError, ProvisioningError
from fedvault.runtime.processes import ManagedProcess


def _finished(args: list[str], log: Path) -> ManagedProcess:
    process = ManagedProcess(args, log_path=log, env={})
    process.proc.wait(timeout=30)
    return process


@pytest.mark.integration  # starts (tiny) processes
def test_a_refusal_in_an_earlier_processs_log_is_not_this_ones(tmp_path: Path) -> None:
    # Prepare: an earlier SuperNode was refused; this one exited for another reason
    log = tmp_path / "supernode.log"
    refused = "[code: 2004] Failed to activate SuperNode"
    first = _finished([sys.executable, "-c", f"print({refused!r})"], log)
    second = _finished([sys.executable, "-c", "print('some other failure')"], log)

    # Execute / Assert: each process is judged by what it wrote itself
    reason = refusal_reason(first)
    assert reason is not None and "never provisioned, or" in reason
    assert refusal_reason(second) is None
    assert refused in log.read_text()  # the earlier line is still in the shared log


@pytest.mark.integration  # starts a (tiny) process
def test_a_site_revoked_while_connected_is_not_retried(tmp_path: Path) -> None:
    # Prepare: a SuperNode that was connected, then shut down by the SuperLink (revoked key)
    lines = "SuperNode ID: 42\nSuperNode terminated gracefully"
    process = ManagedProcess(
        [sys.executable, "-c", f"print({lines!r})"], log_path=tmp_path / "supernode.log", env={}
    )
    site = Site(process, "site-a", 10, tmp_path / "ledger.sqlite", tmp_path / "node.toml")
    said: list[str] = []

    # Execute: a long retry window that a retry would use
    with pytest.raises(ProvisioningError) as refused:
        serve_until_stopped(site, lambda: False, echo=said.append, retry_window=60, retry_every=30)

    # Assert: told at once that restarting will not help; no retry announced
    assert "revoked" in str(refused.value) and "new kit" in refused.value.hint
    assert said == []


@pytest.mark.unit
def test_the_clis_rejoin_default_is_the_deployment_codes() -> None:
    assert deploy_cli.REACTIVATION_WINDOW_S == REACTIVATION_WINDOW_S


# --- node config and site settings (unit) ----------------------------------------------------


def _values(data: Path, **privacy: Any) -> dict[str, Any]:
    return node_config_values(
        site="hospital-a", data=data, label_column="diagnosis", device="cpu", threads=2,
        ledger=data.parent / "ledger.sqlite", privacy=SitePrivacySettings(**privacy),
    )  # fmt: skip


@pytest.mark.unit
def test_the_node_config_file_keeps_every_value_in_its_key(tmp_path: Path) -> None:
    # Prepare: a data path a `key="value"` string would truncate, decode or split
    folder = tmp_path / 'we"ird \\n dir'
    folder.mkdir()
    data = folder / 'a" partition-id="0 \\t.csv'
    values = _values(data, delta=1e-6, accountant="rdp", models=("mlp", "logistic"))

    # Execute: written by fedvault, read back by Flower's own SuperNode parser
    path = write_node_config(tmp_path / NODE_CONFIG_FILE, values)
    parsed = parse_config_args([str(path)])

    # Assert: the same keys, values and types; nothing injected; private to the site
    assert parsed == values
    assert parsed["data-path"] == str(data) and "partition-id" not in parsed
    assert {key: type(value) for key, value in parsed.items()} == {
        "site-name": str, "data-path": str, "label-column": str, "device": str,
        "threads": int, "ledger-path": str, "max-epsilon": float, "allow-non-private": bool,
        "delta": float, "accountant": str, "models": str, "max-rounds-per-run": int,
        "max-evaluations-per-run": int,
    }  # fmt: skip
    assert parsed["models"] == "mlp,logistic"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.unit
def test_a_delta_at_or_above_one_over_rows_is_refused() -> None:
    check_delta(1 / 153, 152)
    with pytest.raises(ConfigError, match=r"--delta must be below 1/rows .*1/152"):
        check_delta(1 / 152, 152)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"accountant": "gdp"}, "prv, rdp"),
        ({"models": ("logistic", "resnet")}, "resnet"),
        ({"max_rounds_per_run": 0}, "--max-rounds-per-run must be >= 1"),
        ({"max_evaluations_per_run": 0}, "--max-evaluations-per-run must be >= 1"),
        ({"delta": float("nan")}, "--delta must be in"),
        ({"max_epsilon": -1.0}, "--max-epsilon must be > 0"),
    ],
)
def test_bad_site_settings_are_refused_with_the_rule(settings: dict[str, Any], said: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(said)):
        SitePrivacySettings(**settings)


@pytest.mark.unit
def test_models_flag_parsing() -> None:
    assert parse_models("") == ()
    assert parse_models(" mlp, logistic ,") == ("mlp", "logistic")


@pytest.mark.unit
def test_the_clis_site_defaults_are_the_deployment_codes() -> None:
    defaults = {
        name: param.default
        for name, param in inspect.signature(deploy_cli.client_start).parameters.items()
    }
    settings = SitePrivacySettings()
    for name in ("delta", "accountant", "max_rounds_per_run", "max_evaluations_per_run"):
        assert defaults[name] == getattr(settings, name), name
    assert parse_models(defaults["models"]) == settings.models
    assert defaults["new_dataset"] is settings.new_dataset is False


@pytest.mark.unit
def test_the_ledger_is_bound_to_the_sites_policy_and_dataset(tmp_path: Path) -> None:
    # Prepare: a site that started once with prv and dataset A
    ledger = tmp_path / "ledger.sqlite"
    first, second = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    open_site_ledger(ledger, SitePrivacySettings(), first)

    # Execute / Assert: same settings again are fine; another accountant or δ is not
    open_site_ledger(ledger, SitePrivacySettings(), first)
    with pytest.raises(LedgerError):
        open_site_ledger(ledger, SitePrivacySettings(accountant="rdp"), first)
    with pytest.raises(LedgerError):
        open_site_ledger(ledger, SitePrivacySettings(delta=1e-6), first)
    # a changed data file is refused unless the site declares it new
    with pytest.raises(LedgerError):
        open_site_ledger(ledger, SitePrivacySettings(), second)
    open_site_ledger(ledger, SitePrivacySettings(new_dataset=True), second)
