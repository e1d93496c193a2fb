"""Tests for common/registry.py: one registry per set of mode names."""

from __future__ import annotations

import pytest

from fedvault.common.config_values import default_of, site_default
from fedvault.common.errors import ConfigError
from fedvault.common.registry import ACCOUNTANTS, STRATEGIES, Registry

pytestmark = pytest.mark.unit


def test_a_wrong_name_is_refused_listing_every_valid_name() -> None:
    with pytest.raises(ConfigError) as caught:
        ACCOUNTANTS.check("gdp")

    assert str(caught.value) == "unknown accountant 'gdp'; choose one of: prv, rdp"


def test_a_close_name_is_suggested_and_the_setting_named() -> None:
    with pytest.raises(ConfigError) as caught:
        STRATEGIES.check("fedavgg", setting="--strategy")

    assert str(caught.value).startswith("unknown --strategy 'fedavgg'; choose one of: fedavg,")
    assert caught.value.hint.startswith("Did you mean 'fedavg'?")
    assert caught.value.setting == "--strategy"


def test_a_valid_name_is_returned() -> None:
    assert ACCOUNTANTS.check("rdp") == "rdp"
    assert STRATEGIES.check("krum") == "krum"


def test_defaults_come_from_defaults_toml() -> None:
    assert ACCOUNTANTS.default == default_of("privacy", "accountant") == "prv"
    assert STRATEGIES.default == default_of("federation", "strategy") == "fedavg"
    assert site_default("accountant") in ACCOUNTANTS


def test_help_text_names_every_entry_and_the_default() -> None:
    assert ACCOUNTANTS.help_text() == "prv (tight, the default) or rdp (a looser upper bound)"
    assert all(name in STRATEGIES.help_text() for name in STRATEGIES)


def test_bind_refuses_a_table_that_does_not_name_exactly_the_registered_names() -> None:
    with pytest.raises(ValueError, match="names"):
        ACCOUNTANTS.bind({"prv": 1})
    with pytest.raises(ValueError, match="names"):
        ACCOUNTANTS.bind({"prv": 1, "rdp": 2, "gdp": 3})

    assert ACCOUNTANTS.bind({"rdp": 2, "prv": 1}) == {"prv": 1, "rdp": 2}


def test_a_default_outside_the_registry_is_refused() -> None:
    with pytest.raises(ValueError, match="not registered"):
        Registry(kind="accountant", entries={"prv": ""}, default="gdp")
