"""Tests for common/config.py: defaults ⊕ layers, validation messages, TOML round trip."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedvault.common.config import (
    ACCOUNTANT_NAMES,
    GRAD_SAMPLE_MODES,
    MAX_MEANINGFUL_EPSILON,
    STRATEGIES,
    FedvaultConfig,
    build_config,
    load_defaults,
    merge,
    parse,
    parse_toml_text,
    read_toml,
)
from fedvault.common.config_values import Origins
from fedvault.common.errors import ConfigError

pytestmark = pytest.mark.unit


def config_error(*layers: Mapping[str, Any]) -> str:
    """The message of the ConfigError that validating ``layers`` over the defaults raises."""
    with pytest.raises(ConfigError) as info:
        build_config(*layers)
    return str(info.value)


# --- defaults and layering ----------------------------------------------------------------


def test_defaults_parse_into_the_documented_values() -> None:
    cfg = build_config()

    assert cfg.name == "default"
    assert cfg.seed == 0
    assert (cfg.federation.sites, cfg.federation.rounds) == (3, 5)
    assert cfg.federation.strategy == "fedavg"
    assert cfg.data.dataset == "breast-cancer"
    assert cfg.model.name == "auto"
    assert cfg.training.batch_size == 32
    assert cfg.privacy.enabled is True
    assert cfg.privacy.target_epsilon == 1.0
    assert cfg.privacy.noise_multiplier is None
    assert cfg.privacy.target_delta == 1e-5
    assert cfg.privacy.accountant == "prv"
    assert cfg.site_name(0) == "site-1"


def test_empty_run_config_text_means_the_defaults() -> None:
    assert parse_toml_text("  \n") == build_config()


def test_a_layer_overrides_only_the_values_it_sets() -> None:
    cfg = build_config(
        {"federation": {"rounds": 2}, "training": {"learning-rate": 0.1}},
        {"federation": {"sites": 4}},
    )

    assert (cfg.federation.rounds, cfg.federation.sites) == (2, 4)
    assert cfg.training.learning_rate == 0.1
    assert cfg.training.batch_size == 32  # untouched default
    assert cfg.federation.strategy == "fedavg"


def test_a_later_layer_wins_over_an_earlier_one() -> None:
    cfg = build_config({"federation": {"rounds": 2}}, {"federation": {"rounds": 7}})

    assert cfg.federation.rounds == 7


def test_integers_are_accepted_where_floats_are_expected() -> None:
    cfg = build_config({"training": {"learning-rate": 1}})

    assert cfg.training.learning_rate == 1.0
    assert isinstance(cfg.training.learning_rate, float)


def test_merge_does_not_modify_its_inputs() -> None:
    base = {"federation": {"rounds": 1, "sites": 2}}
    override = {"federation": {"rounds": 3}}

    merged = merge(base, override)

    assert merged == {"federation": {"rounds": 3, "sites": 2}}
    assert base == {"federation": {"rounds": 1, "sites": 2}}


def test_setting_noise_multiplier_drops_the_inherited_target_epsilon() -> None:
    cfg = build_config({"privacy": {"noise-multiplier": 1.2}})

    assert cfg.privacy.noise_multiplier == 1.2
    assert cfg.privacy.target_epsilon is None


def test_setting_target_epsilon_drops_a_noise_multiplier_from_an_earlier_layer() -> None:
    cfg = build_config({"privacy": {"noise-multiplier": 1.2}}, {"privacy": {"target-epsilon": 3}})

    assert cfg.privacy.target_epsilon == 3.0
    assert cfg.privacy.noise_multiplier is None


def test_a_layer_that_sets_neither_keeps_the_inherited_noise_multiplier() -> None:
    cfg = build_config({"privacy": {"noise-multiplier": 1.2}}, {"privacy": {"max-grad-norm": 2.0}})

    assert cfg.privacy.noise_multiplier == 1.2
    assert cfg.privacy.target_epsilon is None
    assert cfg.privacy.max_grad_norm == 2.0


def test_target_epsilon_and_noise_multiplier_in_one_layer_are_refused() -> None:
    message = config_error({"privacy": {"target-epsilon": 2.0, "noise-multiplier": 1.0}})

    assert message == (
        "set only one of [privacy] target-epsilon and [privacy] noise-multiplier, not both"
    )


def test_privacy_enabled_without_epsilon_or_sigma_is_refused() -> None:
    raw = load_defaults()
    del raw["privacy"]["target-epsilon"]

    with pytest.raises(
        ConfigError, match=r"neither \[privacy\] target-epsilon nor \[privacy\] noise-multiplier"
    ):
        parse(raw)


def test_privacy_disabled_needs_neither_epsilon_nor_sigma() -> None:
    raw = load_defaults()
    del raw["privacy"]["target-epsilon"]
    raw["privacy"]["enabled"] = False

    cfg = parse(raw)

    assert cfg.privacy.enabled is False
    assert (cfg.privacy.target_epsilon, cfg.privacy.noise_multiplier) == (None, None)


# --- unknown keys, types and ranges ---------------------------------------------------------


def test_unknown_key_names_it_and_lists_the_known_ones() -> None:
    message = config_error({"federation": {"sitez": 2}})

    assert "unknown setting 'sitez' in [federation]" in message
    assert "known: sites, site-names, rounds, strategy" in message


def test_unknown_top_level_key_is_reported_at_the_top_level() -> None:
    message = config_error({"rounds": 3})

    assert message.startswith("unknown setting 'rounds' in the top level; known: name, seed")


def test_a_section_that_is_not_a_table_is_refused() -> None:
    assert "'privacy' must be a TOML table" in config_error({"privacy": 1.0})


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"federation": {"sites": 0}}, r"\[federation\] sites must be >= 1, got 0"),
        ({"federation": {"rounds": 0}}, r"\[federation\] rounds must be >= 1, got 0"),
        ({"privacy": {"target-epsilon": 0}}, r"\[privacy\] target-epsilon must be > 0, got 0"),
        ({"privacy": {"target-epsilon": -1.0}}, r"\[privacy\] target-epsilon must be > 0, got -1"),
        (
            {"privacy": {"noise-multiplier": 0.0}},
            r"\[privacy\] noise-multiplier must be > 0, got 0",
        ),
        (
            {"privacy": {"target-delta": 0.0}},
            r"\[privacy\] target-delta must be in \(0, 1\), got 0",
        ),
        (
            {"privacy": {"target-delta": 1.0}},
            r"\[privacy\] target-delta must be in \(0, 1\), got 1",
        ),
        ({"privacy": {"max-grad-norm": 0.0}}, r"\[privacy\] max-grad-norm must be > 0, got 0"),
        ({"data": {"alpha": 0.0}}, r"\[data\] alpha must be > 0, got 0"),
        ({"data": {"test-fraction": 0.0}}, r"\[data\] test-fraction must be in \(0, 1\), got 0"),
        ({"data": {"test-fraction": 1.0}}, r"\[data\] test-fraction must be in \(0, 1\), got 1"),
        ({"training": {"batch-size": 0}}, r"\[training\] batch-size must be >= 1, got 0"),
        ({"training": {"momentum": 1.0}}, r"\[training\] momentum must be in \[0, 1\), got 1"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
    ],
)
def test_each_range_rule_states_the_rule_and_the_bad_value(
    layer: Mapping[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        build_config(layer)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (
            {"federation": {"sites": "3"}},
            "[federation] sites must be an integer, got '3'",
        ),
        (
            {"federation": {"sites": True}},
            "[federation] sites must be an integer, got True",
        ),
        (
            {"federation": {"rounds": 2.5}},
            "[federation] rounds must be an integer, got 2.5",
        ),
        (
            {"privacy": {"enabled": "yes"}},
            "[privacy] enabled must be true or false, got 'yes'",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(layer: Mapping[str, Any], message: str) -> None:
    assert config_error(layer) == message


@pytest.mark.parametrize(
    ("layer", "names"),
    [
        ({"federation": {"strategy": "fedsgd"}}, STRATEGIES),
        ({"privacy": {"accountant": "gdp"}}, ACCOUNTANT_NAMES),
        ({"training": {"grad-sample-mode": "vmap"}}, GRAD_SAMPLE_MODES),
    ],
)
def test_an_unknown_mode_lists_the_valid_names(
    layer: Mapping[str, Any], names: tuple[str, ...]
) -> None:
    assert config_error(layer).endswith(f"choose one of: {', '.join(names)}")


def test_grad_sample_mode_defaults_to_auto() -> None:
    assert build_config().training.grad_sample_mode == "auto"


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_every_grad_sample_mode_name_is_accepted(mode: str) -> None:
    training = build_config({"training": {"grad-sample-mode": mode}}).training

    assert training.grad_sample_mode == mode


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:", "cpu:0", ""])
def test_a_malformed_device_is_refused(device: str) -> None:
    assert config_error({"training": {"device": device}}).startswith(
        "[training] device must be auto, cpu, cuda or cuda:N"
    )


def test_csv_dataset_without_label_column_is_refused_with_a_hint() -> None:
    with pytest.raises(
        ConfigError, match=r"\[data\] dataset 'csv:site\.csv' needs a label column"
    ) as info:
        build_config({"data": {"dataset": "csv:site.csv"}})

    assert "--label-column" in info.value.hint


def test_csv_dataset_with_label_column_is_accepted() -> None:
    cfg = build_config({"data": {"dataset": "csv:site.csv", "label-column": "outcome"}})

    assert (cfg.data.dataset, cfg.data.label_column) == ("csv:site.csv", "outcome")


def test_empty_dataset_name_is_refused() -> None:
    assert config_error({"data": {"dataset": "  "}}) == "[data] dataset must not be empty"


# --- site names ------------------------------------------------------------------------------


def test_site_names_name_the_sites_in_order() -> None:
    cfg = build_config({"federation": {"sites": 2, "site-names": ["oslo", "bergen"]}})

    assert cfg.federation.site_names == ("oslo", "bergen")
    assert [cfg.site_name(0), cfg.site_name(1)] == ["oslo", "bergen"]


def test_site_names_must_name_every_site() -> None:
    message = config_error({"federation": {"sites": 3, "site-names": ["oslo", "bergen"]}})

    assert message == "[federation] site-names must name all 3 sites, got 2 names"


def test_site_names_must_be_unique() -> None:
    message = config_error({"federation": {"sites": 2, "site-names": ["oslo", "oslo"]}})

    assert message == "[federation] site-names must be unique, got 'oslo' more than once"


@pytest.mark.parametrize("bad", ["", "has space", "-leading-dash", "x" * 65, 7])
def test_site_names_must_be_simple_identifiers(bad: object) -> None:
    message = config_error({"federation": {"sites": 2, "site-names": ["ok", bad]}})

    assert message.startswith(f"site name {bad!r} in [federation] site-names must be 1-64 letters")


# --- files and TOML text -------------------------------------------------------------------


def test_read_toml_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scenario file not found"):
        read_toml(tmp_path / "nope.toml")


def test_read_toml_reports_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[federation\nsites = 2\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_toml(path)


def test_read_toml_returns_the_raw_layer(tmp_path: Path) -> None:
    path = tmp_path / "scenario.toml"
    path.write_text('name = "trial"\n[federation]\nrounds = 2\n', encoding="utf-8")

    assert read_toml(path) == {"name": "trial", "federation": {"rounds": 2}}


def test_invalid_run_config_text_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="run configuration is not valid TOML"):
        parse_toml_text("sites = = 2")


def test_config_is_frozen() -> None:
    cfg = build_config()

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.federation.rounds = 9  # type: ignore[misc]


def test_to_toml_round_trips_to_an_equal_config() -> None:
    cfg = build_config(
        {
            "name": "trial-1",
            "seed": 7,
            "federation": {"sites": 2, "site-names": ["a", "b"], "strategy": "fedprox"},
            "data": {"partition": "dirichlet", "alpha": 0.3},
            "privacy": {"noise-multiplier": 1.3, "accountant": "rdp"},
        }
    )

    again = parse_toml_text(cfg.to_toml())

    assert again == cfg
    assert again.privacy.target_epsilon is None


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    sites=st.integers(1, 5),
    rounds=st.integers(1, 50),
    epsilon=st.floats(0.01, MAX_MEANINGFUL_EPSILON) | st.none(),
    delta=st.floats(1e-9, 0.5, exclude_min=True),
    enabled=st.booleans(),
    learning_rate=st.floats(1e-4, 10.0),
)
def test_any_valid_config_round_trips_through_toml(
    sites: int,
    rounds: int,
    epsilon: float | None,
    delta: float,
    enabled: bool,
    learning_rate: float,
) -> None:
    privacy: dict[str, Any] = {"enabled": enabled, "target-delta": delta}
    privacy.update({"target-epsilon": epsilon} if epsilon else {"noise-multiplier": 1.1})
    cfg: FedvaultConfig = build_config(
        {
            "federation": {"sites": sites, "rounds": rounds},
            "training": {"learning-rate": learning_rate},
            "privacy": privacy,
        }
    )

    assert parse_toml_text(cfg.to_toml()) == cfg


def test_target_epsilon_above_the_meaningful_maximum_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[privacy\] target-epsilon must be <= 50, got 1000"):
        build_config({"privacy": {"target-epsilon": 1000.0}})


# --- central DP ------------------------------------------------------------------------------


def test_central_dp_defaults_are_off_and_documented() -> None:
    cfg = build_config()

    assert cfg.privacy.central is False
    assert cfg.privacy.central_noise_multiplier == 1.0
    assert cfg.privacy.central_clipping_norm == 1.0
    assert {"central", "central-noise-multiplier", "central-clipping-norm"} <= set(
        load_defaults()["privacy"]
    )


def test_central_dp_is_independent_of_site_dp() -> None:
    both = build_config({"privacy": {"central": True, "central-noise-multiplier": 0.7}})
    central_only = build_config({"privacy": {"central": True, "enabled": False}})

    assert (both.privacy.enabled, both.privacy.central) == (True, True)
    assert both.privacy.central_noise_multiplier == 0.7
    assert (central_only.privacy.enabled, central_only.privacy.central) == (False, True)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (
            {"privacy": {"central-noise-multiplier": -1}},
            r"\[privacy\] central-noise-multiplier must be > 0, got -1",
        ),
        (
            {"privacy": {"central-noise-multiplier": 0.0}},
            r"\[privacy\] central-noise-multiplier must be > 0, got 0",
        ),
        (
            {"privacy": {"central-clipping-norm": 0.0}},
            r"\[privacy\] central-clipping-norm must be > 0, got 0",
        ),
        (
            {"privacy": {"central-clipping-norm": -2.5}},
            r"\[privacy\] central-clipping-norm must be > 0, got -2.5",
        ),
        (
            {"privacy": {"central": "yes"}},
            r"\[privacy\] central must be true or false, got 'yes'",
        ),
    ],
)
def test_bad_central_dp_values_state_the_rule_and_the_value(
    layer: Mapping[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        build_config(layer)


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_central_dp_with_a_strategy_other_than_fedavg_is_refused(strategy: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"federation": {"strategy": strategy}, "privacy": {"central": True}})

    assert str(info.value).startswith(
        f"[privacy] central needs [federation] strategy fedavg, got '{strategy}'"
    )
    assert "--strategy fedavg" in info.value.hint


def test_central_dp_off_allows_every_strategy() -> None:
    for strategy in STRATEGIES:  # 5 sites: what krum (2f + 2 < sites) and trimmed-mean need
        layer = {"federation": {"strategy": strategy, "sites": 5}, "privacy": {"central": False}}
        cfg = build_config(layer)
        assert cfg.federation.strategy == strategy


def test_central_dp_settings_round_trip_through_toml() -> None:
    cfg = build_config(
        {
            "privacy": {
                "central": True,
                "central-noise-multiplier": 0.5,
                "central-clipping-norm": 5,
                "enabled": False,
            }
        }
    )

    text = cfg.to_toml()
    again = parse_toml_text(text)

    assert again == cfg
    assert "central = true" in text and "central-clipping-norm = 5.0" in text
    assert again.privacy.central_clipping_norm == 5.0


# --- messages in the user's words: the flag or the TOML key -----------------------------------


def test_a_bad_value_from_a_scenario_file_is_named_by_its_toml_key_and_table() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"privacy": {"target-delta": 2.0}})

    assert str(info.value) == "[privacy] target-delta must be in (0, 1), got 2"
    assert info.value.setting == "[privacy] target-delta"
    assert "target-delta in the [privacy] table of the scenario file" in info.value.hint
    assert "use the default (1e-05)" in info.value.hint
    assert "--delta" not in str(info.value)


def test_the_same_bad_value_from_a_flag_is_named_by_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({}, flags={"privacy": {"target-delta": 2.0}})

    assert str(info.value) == "--delta must be in (0, 1), got 2"
    assert info.value.setting == "--delta"
    assert info.value.hint == "Give --delta a value in (0, 1) (default 1e-05)."
    assert "target-delta" not in str(info.value)


def test_a_flag_that_overrides_a_good_scenario_value_is_the_one_named() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"federation": {"rounds": 3}}, flags={"federation": {"rounds": 0}})

    assert str(info.value) == "--rounds must be >= 1, got 0"


def test_a_bad_scenario_value_is_named_by_its_key_even_when_other_flags_are_given() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"federation": {"rounds": 0}}, flags={"privacy": {"target-delta": 1e-6}})

    assert str(info.value).startswith("[federation] rounds must be >= 1")


def test_origins_of_a_flags_layer_cover_top_level_and_table_keys() -> None:
    origins = Origins.of_flags({"seed": 3, "privacy": {"target-epsilon": 1.0}})

    assert origins.name("", "seed") == "--seed"
    assert origins.name("privacy", "target-epsilon") == "--epsilon"
    assert origins.name("privacy", "target-delta") == "[privacy] target-delta"
    assert origins.name("", "name") == "name"


def test_a_misspelt_key_or_mode_gets_a_did_you_mean_hint() -> None:
    with pytest.raises(ConfigError) as key:
        build_config({"federation": {"sitez": 3}})
    with pytest.raises(ConfigError) as mode:
        build_config({}, flags={"federation": {"strategy": "fedavgg"}})

    assert key.value.hint.startswith("Did you mean 'sites'?")
    assert str(mode.value).startswith("unknown --strategy 'fedavgg'; choose one of: fedavg")
    assert mode.value.hint.startswith("Did you mean 'fedavg'?")


# --- every bad setting at once ---------------------------------------------------------------


def test_every_bad_setting_is_reported_at_once_each_in_the_users_words_with_its_hint() -> None:
    # Prepare: two bad scenario values, an unknown key and a bad flag
    scenario = {"federation": {"rounds": 0, "sitez": 3}, "training": {"device": "gpu"}}
    flags = {"privacy": {"target-delta": 2.0}}

    # Execute
    with pytest.raises(ConfigError) as info:
        build_config(scenario, flags=flags)

    # Assert
    assert str(info.value) == (
        "4 settings are invalid: "
        "unknown setting 'sitez' in [federation]; known: sites, site-names, rounds, strategy, "
        "proximal-mu, server-learning-rate, round-timeout, min-sites, connect-timeout, "
        "trim-fraction, krum-byzantine; "
        "[federation] rounds must be >= 1, got 0; "
        "[training] device must be auto, cpu, cuda or cuda:N, got 'gpu'; "
        "--delta must be in (0, 1), got 2"
    )
    assert info.value.setting == (
        "[federation] sitez, [federation] rounds, [training] device, --delta"
    )
    hints = (
        "Did you mean 'sites'?",
        "Set rounds in the [federation] table",
        "Set device in the [training] table",
        "Give --delta a value in (0, 1)",
    )
    for part in hints:
        assert part in info.value.hint


def test_a_rule_between_settings_is_checked_only_once_each_setting_is_valid() -> None:
    # min-sites 9 > sites would be a second error, but sites itself is bad: only it is named
    with pytest.raises(ConfigError) as info:
        build_config({"federation": {"sites": 0, "min-sites": 9}})

    assert str(info.value) == "[federation] sites must be >= 1, got 0"


def test_a_section_that_is_not_a_table_does_not_hide_other_problems() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"privacy": 1.0, "federation": {"rounds": 0}})

    assert str(info.value).startswith("2 settings are invalid: ")
    assert "[federation] rounds must be >= 1, got 0" in str(info.value)
    assert "'privacy' must be a TOML table ([privacy]), got 1" in str(info.value)


def test_several_unknown_keys_of_one_table_are_one_problem_naming_each() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"federation": {"sitez": 3, "roundz": 2}})

    assert str(info.value).startswith(
        "unknown settings 'roundz', 'sitez' in [federation]; known: sites, site-names"
    )
    assert info.value.hint == (
        "Did you mean 'rounds' (for 'roundz')? Did you mean 'sites' (for 'sitez')? "
        "Settings are kebab-case keys in their table."
    )
