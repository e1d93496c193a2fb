"""Tests for common/bk_dpsgd.py: the book-keeping engine clips, sums and noises as Opacus does."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from fedvault.common.bk_dpsgd import BKDPSGD, bk_supported, poisson_batches
from fedvault.common.models import build_model
from tests.common.test_training_modes import BUILT_IN

pytestmark = pytest.mark.unit


class Branchy(nn.Module):
    """Not an nn.Sequential: the engine must capture its layers through forward hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, dilation=1, padding=1)
        self.wide = nn.Conv2d(3, 4, kernel_size=2, dilation=2, bias=False)
        self.head = nn.Linear(4 * 2 * 2, 3)
        self.side = nn.Linear(2 * 8 * 8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.wide(torch.tanh(self.conv(x))))
        return self.head(h.flatten(1)) + self.side(x.flatten(1))


def batch(
    shape: tuple[int, ...], classes: int, n: int, *, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Rows of very different scales, so their gradient norms spread widely."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, n, dtype=torch.float64).view(n, *[1] * len(shape))
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64) * scale
    return x, torch.randint(0, classes, (n,), generator=g)


def opacus_clipped_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Opacus' hooks-mode clipped sum of per-sample gradients, and the per-sample norms."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(
            torch.optim.SGD(module.parameters(), lr=0.1),
            noise_multiplier=0.0,
            max_grad_norm=clip,
            expected_batch_size=len(y),
        )
        nn.functional.cross_entropy(module(x), y).backward()
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in model.parameters()], 1)
    optimizer.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
    module._close()
    return summed, norms.norm(dim=1)


def engine(model: nn.Module, **overrides: object) -> BKDPSGD:
    settings: dict[str, object] = {
        "max_grad_norm": 1.0,
        "noise_multiplier": 0.0,
        "expected_batch_size": 8,
        "learning_rate": 0.1,
    }
    settings.update(overrides)
    return BKDPSGD(model, **settings)  # type: ignore[arg-type]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- which models --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "shape", "classes"), BUILT_IN)
def test_every_built_in_model_is_supported(name: str, shape: tuple[int, ...], classes: int) -> None:
    assert bk_supported(build_model(name, shape, classes))


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)),  # other weights
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)),  # mixes samples
        nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)),  # grouped convolution
        nn.Sequential(nn.Conv1d(2, 2, 3)),
        nn.Sequential(nn.Flatten()),  # nothing to train
    ],
)
def test_models_with_other_layers_are_left_to_opacus(model: nn.Module) -> None:
    assert not bk_supported(model)


def test_a_layer_with_frozen_weights_is_left_to_opacus() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)

    assert not bk_supported(model)


# --- the clipped sum equals Opacus' --------------------------------------------------------


@pytest.mark.parametrize(("name", "shape", "classes"), BUILT_IN)
def test_clipped_sum_equals_opacus_hooks_for_every_built_in_model(
    name: str, shape: tuple[int, ...], classes: int
) -> None:
    model = build_model(name, shape, classes, seed=1).double()
    x, y = batch(shape, classes, 12)
    _, norms = opacus_clipped_sum(copy.deepcopy(model), x, y, 1.0)
    clip = float(norms.median())  # half the rows clipped, half not
    expected, _ = opacus_clipped_sum(copy.deepcopy(model), x, y, clip)

    summed = engine(model, max_grad_norm=clip).clipped_sum(x, y)

    assert 3 <= int((norms > clip).sum()) <= 9
    error = torch.linalg.vector_norm(summed - expected) / torch.linalg.vector_norm(expected)
    assert float(error) < 1e-6


def test_clipped_sum_equals_opacus_through_hooks_strides_dilation_and_no_bias() -> None:
    model = Branchy().double()
    x, y = batch((2, 8, 8), 3, 10)
    _, norms = opacus_clipped_sum(copy.deepcopy(model), x, y, 1.0)
    clip = float(norms.median())
    expected, _ = opacus_clipped_sum(copy.deepcopy(model), x, y, clip)

    bk = engine(model, max_grad_norm=clip)
    summed = bk.clipped_sum(x, y)

    assert bk._handles  # the hooks path, not the nn.Sequential one
    torch.testing.assert_close(summed, expected, rtol=1e-9, atol=1e-12)


def test_float32_clipped_sum_is_close_to_opacus() -> None:
    model = build_model("cnn", (1, 28, 28), 10)
    x, y = (t.float() if t.is_floating_point() else t for t in batch((1, 28, 28), 10, 16))
    expected, _ = opacus_clipped_sum(copy.deepcopy(model), x, y, 0.5)

    summed = engine(model, max_grad_norm=0.5).clipped_sum(x, y)

    error = torch.linalg.vector_norm(summed - expected) / torch.linalg.vector_norm(expected)
    assert float(error) < 1e-5


def test_an_empty_batch_has_a_zero_clipped_sum_and_a_noise_only_step() -> None:
    model = build_model("mlp", (30,), 2)
    before = flat(model)
    bk = engine(model, noise_multiplier=1.0, noise_generator=torch.Generator().manual_seed(3))
    bk.flat_grad.fill_(7.0)  # left over from an earlier step

    assert torch.count_nonzero(bk.clipped_sum(torch.zeros(0, 30), torch.zeros(0).long())) == 0
    bk.step(torch.zeros(0, 30), torch.zeros(0).long())

    replay = torch.Generator().manual_seed(3)
    noise = torch.empty(before.numel()).normal_(0.0, 1.0, generator=replay)
    torch.testing.assert_close(flat(model), before - 0.1 * noise / 8)


def test_a_layer_run_twice_in_one_forward_pass_is_refused() -> None:
    layer = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(torch.tanh(self.layer(x)))

    with pytest.raises(RuntimeError, match="shared weights"):
        engine(Twice()).clipped_sum(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))


# --- a whole step ----------------------------------------------------------------------------


def reference_steps(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    clip: float,
    sigma: float,
    expected: int,
    lr: float,
    momentum: float,
    decay: float,
    seed: int,
) -> torch.Tensor:
    """DP-SGD written out: per-row gradients one row at a time, then clip, sum, noise, SGD."""
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    velocity: torch.Tensor | None = None
    for x, y in batches:
        summed = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        for i in range(len(y)):
            loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
            summed += grad * min(1.0, clip / (float(grad.norm()) + 1e-6))
        noise = torch.empty_like(summed).normal_(0.0, sigma * clip, generator=generator)
        gradient = (summed + noise) / expected + decay * flat(model)
        velocity = gradient if velocity is None else momentum * velocity + gradient
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= lr * velocity[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
    return flat(model)


@pytest.mark.parametrize(("name", "shape", "classes"), [BUILT_IN[1], BUILT_IN[3]])
def test_three_steps_with_a_fixed_noise_generator_equal_the_reference(
    name: str, shape: tuple[int, ...], classes: int
) -> None:
    model = build_model(name, shape, classes, seed=2).double()
    reference_model = copy.deepcopy(model)
    batches = [batch(shape, classes, n, seed=n) for n in (6, 0, 9)]
    settings = {"clip": 0.3, "sigma": 0.7, "expected": 7, "lr": 0.2, "momentum": 0.9}
    bk = engine(
        model,
        max_grad_norm=settings["clip"],
        noise_multiplier=settings["sigma"],
        expected_batch_size=7,
        learning_rate=0.2,
        momentum=0.9,
        weight_decay=0.01,
        noise_generator=torch.Generator().manual_seed(5),
    )

    for x, y in batches:
        bk.step(x, y)
    expected = reference_steps(reference_model, batches, decay=0.01, seed=5, **settings)  # type: ignore[arg-type]

    torch.testing.assert_close(flat(model), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_standard_deviation_sigma_times_c(secure: bool) -> None:
    model = build_model("mlp", (1, 28, 28), 10)  # 50,890 parameters
    bk = engine(model, max_grad_norm=0.5, noise_multiplier=3.0, secure_rng=secure)

    bk.draw_noise()

    # The sample standard deviation of 50,890 normals is within 1 % of sigma·C (~5 sd).
    assert abs(float(bk.flat_grad.std()) - 1.5) < 0.015
    assert abs(float(bk.flat_grad.mean())) < 0.03


def test_close_leaves_no_hook_and_no_gradient_on_the_model() -> None:
    model = Branchy()
    bk = engine(model)
    bk.step(*(t.float() if t.is_floating_point() else t for t in batch((2, 8, 8), 3, 4)))

    bk.close()

    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


# --- Poisson sampling ------------------------------------------------------------------------


def test_poisson_batches_are_opacus_samplers_batches_for_the_same_generator_state() -> None:
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    # 3,000 rows: a chunk holds 349 steps, so 700 steps cross two chunk boundaries.
    opacus = UniformWithReplacementSampler(
        num_samples=3000, sample_rate=0.01, generator=torch.Generator().manual_seed(9), steps=700
    )

    ours = list(poisson_batches(3000, 0.01, 700, torch.Generator().manual_seed(9)))

    assert [b.tolist() for b in ours] == list(opacus)
    assert len({len(b) for b in ours}) > 5  # Poisson: batch sizes vary
