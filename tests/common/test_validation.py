"""Tests for common/validation.py: each rejection reason, exact norms, the DP-SGD norm bound.

Also the [validation] and robust-aggregation settings of common/config.py and how rejected
updates appear in the run report (common/report.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedvault.common.config import build_config, parse_toml_text
from fedvault.common.data import load_dataset
from fedvault.common.errors import ConfigError, UpdateRejected
from fedvault.common.models import build_model
from fedvault.common.partition import site_data_for
from fedvault.common.report import format_progress, round_row
from fedvault.common.training import TrainingPlan, sample_rate_for, steps_per_epoch, train
from fedvault.common.validation import (
    CONFIDENCE_SDS,
    SAFETY_FACTOR,
    check_finite,
    default_update_norm_bound,
    steps_for,
    validate_update,
)

pytestmark = pytest.mark.unit


def global_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "0.weight": rng.normal(size=(2, 30)).astype(np.float32),
        "0.bias": rng.normal(size=(2,)).astype(np.float32),
    }


def moved(reference: dict[str, np.ndarray], scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        k: (v + rng.normal(scale=scale, size=v.shape)).astype(v.dtype) for k, v in reference.items()
    }


def rejection(update: dict[str, np.ndarray], *, max_norm: float | None = None) -> str:
    with pytest.raises(UpdateRejected) as raised:
        validate_update(update, global_model(), max_norm=max_norm)
    assert raised.value.exit_code == 6
    return str(raised.value)


# --- validate_update ------------------------------------------------------------------------


def test_a_valid_update_passes_and_its_norm_is_exact() -> None:
    # Prepare
    reference = global_model()
    update = moved(reference)
    flat = np.concatenate(
        [(update[k].astype(np.float64) - reference[k]).ravel() for k in sorted(reference)]
    )

    # Execute
    norm = validate_update(update, reference, max_norm=10.0)

    # Assert: the L2 norm over all arrays together, to float64 precision
    assert norm == pytest.approx(float(np.sqrt(np.sum(flat**2))), rel=1e-12)
    assert 0.01 < norm < 1.0


def test_missing_and_unexpected_keys_are_named() -> None:
    update = moved(global_model())
    update["1.weight"] = update.pop("0.bias")

    reason = rejection(update)

    assert reason == "arrays do not match the global model: missing '0.bias'; unexpected '1.weight'"


def test_a_shape_mismatch_names_the_array_and_both_shapes() -> None:
    update = moved(global_model())
    update["0.weight"] = np.zeros((2, 31), dtype=np.float32)

    assert rejection(update) == "shape of '0.weight' is (2, 31), the global model's is (2, 30)"


def test_a_dtype_mismatch_names_the_array_and_both_dtypes() -> None:
    update = moved(global_model())
    update["0.bias"] = update["0.bias"].astype(np.float64)

    assert rejection(update) == "dtype of '0.bias' is float64, the global model's is float32"


def test_non_finite_values_are_named_and_counted() -> None:
    update = moved(global_model())
    update["0.weight"][0, :3] = np.nan
    update["0.weight"][1, 0] = np.inf

    assert rejection(update) == "non-finite values in '0.weight': 4 of 60"


def test_check_finite_alone_needs_no_reference() -> None:
    check_finite(moved(global_model()))
    with pytest.raises(UpdateRejected, match=r"non-finite values in '0\.bias': 1 of 2"):
        check_finite({"0.bias": np.array([1.0, -np.inf], dtype=np.float32)})


def test_a_norm_above_the_bound_states_the_norm_and_the_bound() -> None:
    # Prepare: an update of known norm 5 (a 3-4-5 triangle in two coordinates)
    reference = global_model()
    update = {k: v.copy() for k, v in reference.items()}
    update["0.bias"] = update["0.bias"] + np.array([3.0, 4.0], dtype=np.float32)

    # Execute / Assert: above the bound rejected, at or below it accepted, 0/None unbounded
    assert rejection(update, max_norm=4.99) == "update norm 5 is above the bound 4.99"
    assert validate_update(update, reference, max_norm=5.0 + 1e-6) == pytest.approx(5.0)
    assert validate_update(update, reference, max_norm=0.0) == pytest.approx(5.0)
    assert validate_update(update, reference, max_norm=None) == pytest.approx(5.0)


def test_a_scaled_update_is_rejected_and_the_reference_never_changes() -> None:
    reference = global_model()
    before = {k: v.copy() for k, v in reference.items()}
    update = {k: reference[k] + 1e6 * (v - reference[k]) for k, v in moved(reference).items()}

    with pytest.raises(UpdateRejected, match=r"update norm .*e\+0\d is above the bound 10"):
        validate_update(update, reference, max_norm=10.0)
    for key in reference:
        np.testing.assert_array_equal(reference[key], before[key])


# --- the DP-SGD bound -----------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "batch"), [(1, 32), (31, 32), (32, 32), (33, 32), (455, 64)])
def test_steps_for_is_what_common_training_runs(rows: int, batch: int) -> None:
    q, steps = steps_for(rows, batch, local_epochs=3)

    assert q == sample_rate_for(rows, batch)
    assert steps == 3 * steps_per_epoch(rows, batch)


def test_the_bound_equals_an_independent_computation_of_the_formula() -> None:
    # Prepare: n = 150 rows, B = 32 -> 5 steps per epoch, q = 0.2, B_e = int(150 * 0.2) = 30;
    # 2 epochs -> T = 10 steps; no momentum -> c_t = 1, Σc = Σc² = T = 10, c_max = 1
    n, t, q, b_e, d, k = 150, 10, 0.2, 30, 62, CONFIDENCE_SDS
    lr, clip, sigma = 0.5, 1.5, 1.1
    mean = n * q * t  # expected number of clipped gradients summed over the round: 300
    excess = k**2 / 6 + math.sqrt(k**4 / 36 + k**2 * mean)  # Bernstein, exp(-k²/2)
    noise = sigma * math.sqrt(t) * (math.sqrt(d) + k)  # Gaussian norm, exp(-k²/2)
    expected = SAFETY_FACTOR * lr * clip / b_e * (mean + excess + noise)

    # Execute
    bound = default_update_norm_bound(
        num_params=d,
        num_examples=n,
        batch_size=32,
        local_epochs=2,
        learning_rate=lr,
        momentum=0.0,
        max_grad_norm=clip,
        noise_multiplier=sigma,
    )

    # Assert
    assert bound == pytest.approx(expected, rel=1e-12)


def test_the_bound_holds_for_worst_case_dp_sgd_and_is_nearly_reached_there() -> None:
    """Simulate DP-SGD where every clipped gradient has norm C and points the same way (the
    case the bound's clipped part assumes), with Poisson batches and momentum: over many
    rounds no update exceeds the bound without its safety factor, and the typical one is
    more than half of it: the bound is not vacuous."""
    # Prepare
    rng = np.random.default_rng(7)
    n, batch, epochs, d, lr, clip, sigma, mu = 100, 32, 2, 50, 0.3, 1.0, 1.2, 0.5
    q, steps = steps_for(n, batch, epochs)
    b_e = int(n * q)
    direction = np.zeros(d)
    direction[0] = 1.0
    bound = default_update_norm_bound(
        num_params=d, num_examples=n, batch_size=batch, local_epochs=epochs,
        learning_rate=lr, momentum=mu, max_grad_norm=clip, noise_multiplier=sigma,
        safety_factor=1.0,
    )  # fmt: skip

    # Execute: 3000 rounds of momentum SGD on worst-case clipped sums plus Gaussian noise
    norms = []
    for _ in range(3000):
        w, v = np.zeros(d), np.zeros(d)
        for _ in range(steps):
            drawn = rng.binomial(n, q)
            grad = (drawn * clip * direction + rng.normal(scale=sigma * clip, size=d)) / b_e
            v = mu * v + grad
            w = w - lr * v
        norms.append(float(np.linalg.norm(w)))

    # Assert
    assert max(norms) < bound
    assert np.median(norms) > 0.5 * bound


@pytest.fixture(scope="module")
def hospital_site() -> tuple[np.ndarray, np.ndarray]:
    """Site 1 of 3 of the breast-cancer table, as a simulated hospital holds it."""
    data = site_data_for(
        load_dataset("breast-cancer"), 0, 3, method="iid", alpha=0.5, seed=0, test_fraction=0.2
    )
    return data.train_x, data.train_y


@pytest.mark.parametrize(
    ("sigma", "momentum", "epochs"), [(0.3, 0.0, 1), (1.0, 0.0, 2), (4.0, 0.0, 1), (1.0, 0.9, 2)]
)
def test_the_derived_bound_is_above_real_dp_sgd_updates_and_catches_scaled_ones(
    hospital_site: tuple[np.ndarray, np.ndarray], sigma: float, momentum: float, epochs: int
) -> None:
    # Prepare: one round of real DP-SGD (Opacus) on a hospital's rows from the global model
    features, labels = hospital_site
    model = build_model("logistic", (30,), 2, seed=0)
    reference = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    plan = TrainingPlan(
        local_epochs=epochs,
        batch_size=32,
        learning_rate=0.5,
        momentum=momentum,
        max_grad_norm=1.0,
        noise_multiplier=sigma,
    )
    train(model, features, labels, plan=plan, device=torch.device("cpu"))
    update = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    bound = default_update_norm_bound(
        num_params=sum(v.size for v in reference.values()),
        num_examples=len(labels),
        batch_size=32,
        local_epochs=epochs,
        learning_rate=0.5,
        momentum=momentum,
        max_grad_norm=1.0,
        noise_multiplier=sigma,
    )

    # Execute
    norm = validate_update(update, reference, max_norm=bound)

    # Assert: the honest update passes; the same update scaled 1e6× (or even 100×) does not
    print(f"sigma={sigma} momentum={momentum} epochs={epochs}: ‖Δ‖={norm:.3f} bound={bound:.3f}")
    assert 0 < norm < bound
    for factor in (1e6, 100.0):
        scaled = {k: reference[k] + factor * (update[k] - reference[k]) for k in reference}
        with pytest.raises(UpdateRejected, match="is above the bound"):
            validate_update(scaled, reference, max_norm=bound)


def test_the_bound_grows_with_noise_learning_rate_and_epochs_and_shrinks_with_momentum_off() -> (
    None
):
    base = {
        "num_params": 62, "num_examples": 150, "batch_size": 32, "local_epochs": 1,
        "learning_rate": 0.5, "momentum": 0.0, "max_grad_norm": 1.0, "noise_multiplier": 1.0,
    }  # fmt: skip
    reference = default_update_norm_bound(**base)  # type: ignore[arg-type]

    for key, value in (
        ("noise_multiplier", 2.0),
        ("learning_rate", 1.0),
        ("local_epochs", 2),
        ("momentum", 0.5),
        ("max_grad_norm", 2.0),
        ("num_params", 6200),
    ):
        assert default_update_norm_bound(**{**base, key: value}) > reference, key  # type: ignore[arg-type]
    assert default_update_norm_bound(**{**base, "learning_rate": 1.0}) == pytest.approx(  # type: ignore[arg-type]
        2 * reference
    )


def test_the_bound_refuses_settings_it_cannot_bound() -> None:
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        default_update_norm_bound(
            num_params=1, num_examples=1, batch_size=1, local_epochs=1,
            learning_rate=0.1, momentum=1.0, max_grad_norm=1.0, noise_multiplier=1.0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="num_examples must be >= 1, got 0"):
        default_update_norm_bound(
            num_params=1, num_examples=0, batch_size=1, local_epochs=1,
            learning_rate=0.1, momentum=0.0, max_grad_norm=1.0, noise_multiplier=1.0,
        )  # fmt: skip


# --- configuration -------------------------------------------------------------------------


def test_validation_is_on_by_default_with_a_derived_bound_and_round_trips() -> None:
    cfg = build_config()

    assert cfg.validation.enabled is True
    assert cfg.validation.max_update_norm == 0.0
    assert (cfg.federation.trim_fraction, cfg.federation.krum_byzantine) == (0.2, 1)
    assert "[validation]" in cfg.to_toml()
    changed = build_config({"validation": {"enabled": False, "max-update-norm": 7}})
    assert parse_toml_text(changed.to_toml()) == changed
    assert changed.validation.max_update_norm == 7.0


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (
            {"validation": {"max-update-norm": -1.0}},
            "[validation] max-update-norm must be >= 0, got -1",
        ),
        (
            {"validation": {"enabled": "yes"}},
            "[validation] enabled must be true or false, got 'yes'",
        ),
        ({"validation": {"bound": 1.0}}, "unknown setting 'bound' in [validation]"),
        (
            {"federation": {"trim-fraction": 0.5}},
            "[federation] trim-fraction must be in [0, 0.5), got 0.5",
        ),
        (
            {"federation": {"krum-byzantine": -1}},
            "[federation] krum-byzantine must be >= 0, got -1",
        ),
        (
            {"federation": {"strategy": "krum", "sites": 4}},
            "krum needs 2 × [federation] krum-byzantine + 2 < sites, got 2 × 1 + 2 = 4 "
            "with 4 sites",
        ),
        (
            {"federation": {"strategy": "trimmed-mean", "sites": 3}},
            "trimmed-mean needs [federation] trim-fraction × sites >= 1 to trim any update, got "
            "0.2 × 3 = 0.6",
        ),
        (
            {"federation": {"strategy": "bulyan"}},
            "unknown [federation] strategy 'bulyan'; choose one of:",
        ),
    ],
)
def test_bad_validation_and_robust_aggregation_settings_are_refused_with_the_rule(
    layer: dict[str, dict[str, object]], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        build_config(layer)

    assert message in str(raised.value)


def test_robust_strategies_accept_settings_that_satisfy_their_rule() -> None:
    krum = build_config({"federation": {"strategy": "krum", "sites": 5, "krum-byzantine": 1}})
    trimmed = build_config({"federation": {"strategy": "trimmed-mean", "trim-fraction": 0.34}})
    krum_zero = build_config({"federation": {"strategy": "krum", "krum-byzantine": 0}})

    assert krum.federation.strategy == "krum"
    assert trimmed.federation.trim_fraction == 0.34
    assert krum_zero.federation.krum_byzantine == 0  # 2·0 + 2 < 3 sites


# --- run report ----------------------------------------------------------------------------


def test_rejected_updates_appear_in_the_round_row_and_the_progress_line() -> None:
    # Prepare
    reason = "update norm 2.113e+06 is above the bound 8.051 (derived from DP-SGD settings)"
    row = round_row(
        3,
        [],
        round_seconds=0.5,
        elapsed_seconds=9.0,
        failed_sites=["site-2", "site-3"],
        rejected_sites={"site-3": reason},
    )

    # Execute
    line = format_progress(row, total_rounds=3)

    # Assert: the rejected site with a short reason, not also listed as failed
    assert row["rejected_sites"] == {"site-3": reason}
    assert "rejected: site-3 (update norm 2.113e+06 is above the bound 8.051…)" in line
    assert line.endswith("failed: site-2")
    assert round_row(1, [], round_seconds=0, elapsed_seconds=0)["rejected_sites"] == {}
