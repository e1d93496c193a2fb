"""Tests for common/training.py: DP-SGD (BK, Opacus), the no-DP baseline, FedProx, evaluation."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from fedvault.common.errors import ConfigError
from fedvault.common.models import build_model
from fedvault.common.training import (
    TrainingPlan,
    evaluate,
    evaluate_counts,
    resolve_device,
    sample_rate_for,
    steps_per_epoch,
    train,
)

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def separable_table(
    rows: int = 150, features: int = 4, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated Gaussian blobs: label = side of the hyperplane x0 + x1 = 0."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=rows).astype(np.int64)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    x[:, 0] += np.where(labels == 1, 2.0, -2.0).astype(np.float32)
    x[:, 1] += np.where(labels == 1, 2.0, -2.0).astype(np.float32)
    return x, labels


def logistic_model(features: int = 4, *, seed: int = 0) -> nn.Module:
    return build_model("logistic", (features,), 2, seed=seed)


def dp_plan(**overrides: object) -> TrainingPlan:
    settings: dict[str, object] = {
        "local_epochs": 2,
        "batch_size": 32,
        "learning_rate": 0.5,
        "max_grad_norm": 1.0,
        "noise_multiplier": 0.8,
    }
    settings.update(overrides)
    return TrainingPlan(**settings)  # type: ignore[arg-type]


def weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def hooks_of(model: nn.Module) -> list[str]:
    """Every forward/backward hook left on any submodule, named by module and kind."""
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
    return [
        f"{name or 'root'}.{kind}"
        for name, module in model.named_modules()
        for kind in kinds
        if getattr(module, kind, None)
    ]


# --- DP-SGD --------------------------------------------------------------------------------


def test_dp_training_lowers_loss_and_raises_accuracy() -> None:
    x, y = separable_table()
    model = logistic_model()
    loss_before, acc_before = evaluate(model, x, y, device=CPU)

    train(model, x, y, plan=dp_plan(local_epochs=3), device=CPU)

    loss_after, acc_after = evaluate(model, x, y, device=CPU)
    assert loss_after < loss_before
    assert acc_after > acc_before
    assert acc_after >= 0.9


def test_dp_event_records_opacus_sigma_sample_rate_and_steps() -> None:
    x, y = separable_table(rows=150)  # ceil(150 / 32) = 5 batches per epoch
    plan = dp_plan(local_epochs=3, batch_size=32, noise_multiplier=1.3)

    outcome = train(logistic_model(), x, y, plan=plan, device=CPU)

    assert outcome.event is not None
    assert outcome.event.noise_multiplier == 1.3
    assert outcome.event.sample_rate == pytest.approx(1 / 5)
    assert outcome.event.steps == 3 * 5
    assert (outcome.steps, outcome.sample_rate, outcome.num_examples) == (15, 1 / 5, 150)


def test_dp_training_leaves_no_opacus_hooks_on_the_callers_model() -> None:
    x, y = separable_table()
    model = logistic_model()

    train(model, x, y, plan=dp_plan(local_epochs=1), device=CPU)

    assert type(model) is nn.Sequential  # not swapped for a GradSampleModule
    assert hooks_of(model) == []
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    clone = copy.deepcopy(model)
    pickle.dumps(model)
    again = train(clone, x, y, plan=dp_plan(local_epochs=1), device=CPU)  # Opacus accepts it
    assert again.event is not None
    assert hooks_of(clone) == []


def test_dp_training_leaves_no_unnoised_gradient_on_the_callers_model() -> None:
    x, y = separable_table()
    model = logistic_model()

    train(model, x, y, plan=dp_plan(local_epochs=1), device=CPU)

    leftovers = {
        attr
        for p in model.parameters()
        for attr in ("summed_grad", "grad_sample", "_forward_counter")
        if getattr(p, attr, None) is not None
    }
    assert leftovers == set()


def test_dp_noise_is_not_reproducible_from_torch_manual_seed() -> None:
    x, y = separable_table()
    results = []
    for _ in range(2):
        torch.manual_seed(1234)
        model = logistic_model()
        train(model, x, y, plan=dp_plan(local_epochs=1), device=CPU)
        results.append(weights(model))

    assert not torch.equal(results[0], results[1])


def test_rdp_accountant_plan_records_the_same_event() -> None:
    x, y = separable_table(rows=64)

    outcome = train(
        logistic_model(), x, y, plan=dp_plan(local_epochs=1, accountant="rdp"), device=CPU
    )

    assert outcome.event is not None
    assert (outcome.event.sample_rate, outcome.event.steps) == (0.5, 2)


# --- without DP, FedProx ----------------------------------------------------------------------


def test_training_without_dp_returns_no_privacy_event() -> None:
    x, y = separable_table(rows=100)
    model = logistic_model()
    loss_before, _ = evaluate(model, x, y, device=CPU)

    outcome = train(model, x, y, plan=dp_plan(noise_multiplier=None, batch_size=30), device=CPU)

    assert outcome.event is None
    assert outcome.steps == 2 * 4
    assert outcome.sample_rate == 0.25
    assert evaluate(model, x, y, device=CPU)[0] < loss_before


def test_fedprox_keeps_weights_closer_to_the_global_model() -> None:
    # Full-batch plain SGD: no sampling and no noise, so both runs are deterministic.
    x, y = separable_table(rows=120)
    start = weights(logistic_model())
    drift = {}
    for mu in (0.0, 1.0):
        model = logistic_model()
        plan = dp_plan(noise_multiplier=None, batch_size=120, local_epochs=20, proximal_mu=mu)
        train(model, x, y, plan=plan, device=CPU)
        drift[mu] = float(torch.linalg.vector_norm(weights(model) - start))

    assert drift[1.0] < 0.8 * drift[0.0]
    assert drift[1.0] > 0  # it still learned something


def test_training_on_no_rows_is_a_config_error() -> None:
    x = np.zeros((0, 4), dtype=np.float32)
    y = np.zeros(0, dtype=np.int64)

    with pytest.raises(ConfigError, match="no training rows"):
        train(logistic_model(), x, y, plan=dp_plan(), device=CPU)


@pytest.mark.parametrize(("rows", "batch", "steps"), [(100, 30, 4), (96, 32, 3), (5, 32, 1)])
def test_steps_and_sample_rate_follow_opacus_batches_per_epoch(
    rows: int, batch: int, steps: int
) -> None:
    assert steps_per_epoch(rows, batch) == steps == math.ceil(rows / batch)
    assert sample_rate_for(rows, batch) == 1 / steps


# --- devices ------------------------------------------------------------------------------------


def test_cpu_resolves_to_the_cpu() -> None:
    assert resolve_device("cpu") == CPU


def test_auto_uses_cuda_only_when_present() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"

    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_on_a_cpu_only_machine_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU") as info:
        resolve_device(spec)

    assert "--device auto or cpu" in info.value.hint


@pytest.mark.parametrize("spec", ["gpu", "CPU", "", "cpu:0", "tpu"])
def test_malformed_device_strings_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


# --- evaluation ---------------------------------------------------------------------------------


def identity_model() -> nn.Module:
    """Logits equal the two input features."""
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
        layer.bias.zero_()
    return layer


def test_evaluate_returns_mean_cross_entropy_and_accuracy() -> None:
    x = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]], dtype=np.float32)
    y = np.array([0, 1, 0], dtype=np.int64)  # the third row is misclassified
    expected_loss = (
        math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(2))
    ) / 3

    loss, accuracy = evaluate(identity_model(), x, y, device=CPU)

    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy == pytest.approx(2 / 3)


def test_evaluate_is_exact_across_its_2048_row_chunks() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5000, 2)).astype(np.float32)
    y = rng.integers(0, 2, size=5000).astype(np.int64)
    logits = torch.from_numpy(x)
    expected_loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)))
    expected_accuracy = float((logits.argmax(dim=1) == torch.from_numpy(y)).float().mean())

    loss, accuracy = evaluate(identity_model(), x, y, device=CPU)

    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy == pytest.approx(expected_accuracy)


def test_evaluate_on_no_rows_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no test rows"):
        evaluate(
            identity_model(),
            np.zeros((0, 2), dtype=np.float32),
            np.zeros(0, dtype=np.int64),
            device=CPU,
        )


def test_evaluation_counts_match_the_models_own_predictions_row_by_row() -> None:
    # Prepare
    x, y = separable_table(rows=120, seed=3)
    model = logistic_model(seed=1)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)).double(), dim=1).numpy()
    predicted = probs.argmax(axis=1)

    # Execute
    result = evaluate_counts(model, x, y, device=CPU, bins=10)

    # Assert: the counts are exactly the rows' (true, predicted) pairs and binned scores
    stats = result.statistics
    for true in (0, 1):
        for pred in (0, 1):
            expected = int(((y == true) & (predicted == pred)).sum())
            assert stats.confusion[true, pred] == expected
    assert stats.score_histogram is not None
    for true in (0, 1):
        expected_bins = np.bincount(
            np.minimum((probs[y == true, 1] * 10).astype(int), 9), minlength=10
        )
        assert stats.score_histogram[true].tolist() == expected_bins.tolist()
    assert (result.loss, result.accuracy) == evaluate(model, x, y, device=CPU)
    assert result.accuracy == pytest.approx(float((predicted == y).mean()))


def test_a_multiclass_evaluation_sends_no_score_histogram() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.integers(0, 3, 30).astype(np.int64)

    result = evaluate_counts(build_model("logistic", (4,), 3, seed=0), x, y, device=CPU)

    assert result.statistics.confusion.shape == (3, 3)
    assert int(result.statistics.confusion.sum()) == 30
    assert result.statistics.score_histogram is None
