"""Tests for the grad-sample mode of common/training.py: every mode clips and noises alike."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fedvault.common.training as training
from fedvault.common.config import GRAD_SAMPLE_MODES
from fedvault.common.errors import ConfigError
from fedvault.common.models import build_model
from fedvault.common.training import TrainingPlan, auto_grad_sample_mode, auto_opacus_mode, train

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
#: Every built-in model on the data shape it is meant for (benchmarks/dp_overhead's cases).
BUILT_IN = [
    ("logistic", (30,), 2),
    ("mlp", (30,), 2),
    ("mlp", (1, 28, 28), 10),
    ("cnn", (1, 8, 8), 10),
    ("cnn", (1, 28, 28), 10),
]
EXPLICIT_MODES = [m for m in GRAD_SAMPLE_MODES if m != "auto"]
OPACUS_MODES = [m for m in EXPLICIT_MODES if m != "bk"]
#: fedvault refuses sigma = 0 (no privacy); this sigma adds noise ~1e-12, far below the checks.
NO_NOISE = 1e-9


def rows(shape: tuple[int, ...], classes: int, n: int, *, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, size=n).astype(np.int64)
    return x, y


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def plan(**overrides: object) -> TrainingPlan:
    settings: dict[str, object] = {
        "local_epochs": 3,
        "batch_size": 32,
        "learning_rate": 0.5,
        "max_grad_norm": 1e-3,
        "noise_multiplier": NO_NOISE,
    }
    settings.update(overrides)
    return TrainingPlan(**settings)  # type: ignore[arg-type]


@pytest.fixture
def seeded_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch sampling and noise drawn from fixed seeds, so two runs see the same batches."""
    counter = iter(range(1000))

    def fixed(device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(1000 + next(counter) % 2)  # loader: 1000, noise: 1001
        return generator

    monkeypatch.setattr(training, "_fresh_generator", fixed)


def run(
    name: str, shape: tuple[int, ...], classes: int, x: np.ndarray, y: np.ndarray, p: TrainingPlan
) -> tuple[torch.Tensor, training.TrainingOutcome]:
    model = build_model(name, shape, classes, seed=0)
    before = flat(model)
    outcome = train(model, x, y, plan=p, device=CPU)
    return flat(model) - before, outcome


# --- the automatic choice --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "shape", "classes"), BUILT_IN)
def test_auto_mode_runs_every_built_in_model_in_the_bk_engine(
    name: str, shape: tuple[int, ...], classes: int
) -> None:
    model = build_model(name, shape, classes)

    assert auto_grad_sample_mode(model, 32) == "bk"
    assert auto_opacus_mode(model, 32) in OPACUS_MODES


def test_auto_mode_leaves_a_model_with_other_layers_to_opacus() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))

    assert auto_grad_sample_mode(model, 32) == auto_opacus_mode(model, 32) == "ew"


def test_opacus_auto_mode_uses_ghost_clipping_where_it_was_measured_fastest() -> None:
    wide_mlp = build_model("mlp", (1, 28, 28), 10)
    cnn_28 = build_model("cnn", (1, 28, 28), 10)
    small_table = build_model("logistic", (30,), 2)

    assert auto_opacus_mode(wide_mlp, 32) == "ghost"
    assert auto_opacus_mode(cnn_28, 256) == "ghost"
    assert auto_opacus_mode(small_table, 32) != "ghost"


def test_secure_rng_outside_the_bk_engine_is_a_config_error() -> None:
    x, y = rows((30,), 2, 16)
    p = plan(grad_sample_mode="hooks", secure_rng=True)

    with pytest.raises(ConfigError, match="secure_rng needs the bk engine"):
        train(build_model("logistic", (30,), 2), x, y, plan=p, device=CPU)


def test_secure_rng_trains_in_the_bk_engine_with_unpredictable_noise(
    seeded_sampling: None,
) -> None:
    # The torch generators are seeded alike; only the secure noise can tell two runs apart.
    x, y = rows((30,), 2, 16)
    p = plan(secure_rng=True, noise_multiplier=1.0, local_epochs=1)

    first, out = run("logistic", (30,), 2, x, y, p)
    second, _ = run("logistic", (30,), 2, x, y, p)

    assert out.grad_sample_mode == "bk" and out.event is not None
    assert torch.isfinite(first).all() and not torch.equal(first, second)


def test_bk_mode_on_a_model_it_cannot_run_falls_back_to_opacus() -> None:
    model = nn.Sequential(nn.Linear(30, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    x, y = rows((30,), 2, 16)

    outcome = train(model, x, y, plan=plan(grad_sample_mode="bk", local_epochs=1), device=CPU)

    assert outcome.grad_sample_mode == "ew"
    assert outcome.event is not None and outcome.event.steps == 1


@pytest.mark.parametrize("sigma", [1.0, None])
def test_unknown_mode_is_a_config_error_listing_the_valid_names(sigma: float | None) -> None:
    x, y = rows((30,), 2, 8)
    bad = plan(grad_sample_mode="fast", noise_multiplier=sigma)

    with pytest.raises(ConfigError, match="auto, bk, hooks, ew, functorch, ghost"):
        train(build_model("logistic", (30,), 2), x, y, plan=bad, device=CPU)


# --- clipping and noise, whatever the mode -----------------------------------------------------


@pytest.mark.parametrize(("name", "shape", "classes"), BUILT_IN)
def test_auto_mode_clips_every_per_sample_gradient(
    name: str, shape: tuple[int, ...], classes: int
) -> None:
    # Rows <= batch size: q = 1, so every step sums all 4 rows and divides by 4. With each
    # per-sample gradient clipped to C and no noise, one step moves the weights by at most
    # lr·C, so 3 steps by at most 3·lr·C. Unclipped gradients here are ~100-1000× larger.
    x, y = rows(shape, classes, 4)
    p = plan(grad_sample_mode="auto", max_grad_norm=1e-3, learning_rate=0.5)

    update, outcome = run(name, shape, classes, x, y, p)

    bound = p.local_epochs * p.learning_rate * p.max_grad_norm
    assert outcome.grad_sample_mode == auto_grad_sample_mode(
        build_model(name, shape, classes), p.batch_size
    )
    assert outcome.event is not None and outcome.event.steps == 3
    assert 0 < float(torch.linalg.vector_norm(update)) <= bound * (1 + 1e-4)


@pytest.mark.parametrize(("name", "shape", "classes"), BUILT_IN)
def test_auto_mode_adds_noise_of_std_sigma_c_over_the_expected_batch(
    name: str, shape: tuple[int, ...], classes: int, seeded_sampling: None
) -> None:
    # Same batches (q = 1) with sigma ≈ 0 and sigma = 20: the difference is the noise,
    # lr·N(0, (sigma·C)²·I)/4 per step, plus at most 2·lr·C per step from the gradients.
    # Its norm concentrates at lr·sigma·C·sqrt(3·d)/4 over 3 steps and d parameters.
    x, y = rows(shape, classes, 4)
    sigma = 20.0
    clean, _ = run(name, shape, classes, x, y, plan(noise_multiplier=NO_NOISE))
    noisy, _ = run(name, shape, classes, x, y, plan(noise_multiplier=sigma))

    d = clean.numel()
    expected = 0.5 * sigma * 1e-3 * math.sqrt(3 * d) / 4
    measured = float(torch.linalg.vector_norm(noisy - clean))
    assert 0.8 * expected < measured < 1.2 * expected


@pytest.mark.parametrize("mode", ["bk", "hooks", "ew", "functorch"])
@pytest.mark.parametrize(("name", "shape", "classes"), BUILT_IN)
def test_ghost_clipping_gives_the_same_update_as_every_other_mode(
    name: str, shape: tuple[int, ...], classes: int, mode: str, seeded_sampling: None
) -> None:
    # 40 rows at batch size 8: q = 1/5, Poisson batches of varying size, the same in both
    # runs (same sampling seed). Clipping must be active for the check to mean anything.
    x, y = rows(shape, classes, 40)
    common = {
        "local_epochs": 1,
        "batch_size": 8,
        "max_grad_norm": 0.05,
        "momentum": 0.5,
        "weight_decay": 0.01,
    }

    ghost, g_out = run(name, shape, classes, x, y, plan(grad_sample_mode="ghost", **common))
    other, o_out = run(name, shape, classes, x, y, plan(grad_sample_mode=mode, **common))

    assert (g_out.grad_sample_mode, o_out.grad_sample_mode) == ("ghost", mode)
    assert g_out.event == o_out.event
    torch.testing.assert_close(ghost, other, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", EXPLICIT_MODES)
def test_every_mode_survives_empty_poisson_batches_and_counts_their_steps(
    mode: str, seeded_sampling: None
) -> None:
    # Batch size 1 over 20 rows: q = 1/20, so about 36 % of the 20 steps draw no row; with
    # the sampling seed fixed, check that this run's batches include an empty one.
    x, y = rows((1, 8, 8), 10, 20)
    replay = torch.Generator().manual_seed(1000)
    sizes = [int((torch.rand(20, generator=replay) < 1 / 20).sum()) for _ in range(20)]
    assert 0 in sizes
    model = build_model("cnn", (1, 8, 8), 10)
    before = flat(model)

    outcome = train(
        model,
        x,
        y,
        plan=plan(batch_size=1, local_epochs=1, grad_sample_mode=mode, noise_multiplier=1.0),
        device=CPU,
    )

    assert outcome.event is not None and outcome.event.steps == 20
    assert torch.isfinite(flat(model)).all()
    assert not torch.equal(flat(model), before)
    assert type(model) is nn.Sequential  # the caller's model, with nothing of Opacus left on it
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(
        hasattr(p, attr)
        for p in model.parameters()
        for attr in ("grad_sample", "_norm_sample", "summed_grad", "_forward_counter")
    )
