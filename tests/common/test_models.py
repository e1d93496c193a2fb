"""Tests for common/models.py: the registry, output shapes, Opacus compatibility, seeding."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedvault.common.errors import ConfigError
from fedvault.common.models import MODELS, build_model, default_model_for

pytestmark = pytest.mark.unit

TABLE = (30,)
DIGITS = (1, 8, 8)
FASHION = (1, 28, 28)
#: Every (model, feature shape) pair the registry must support.
CASES = [
    ("logistic", TABLE),
    ("logistic", DIGITS),
    ("mlp", TABLE),
    ("mlp", DIGITS),
    ("mlp", FASHION),
    ("cnn", DIGITS),
    ("cnn", FASHION),
]


def batch_for(shape: tuple[int, ...], size: int = 5) -> torch.Tensor:
    return torch.randn(size, *shape)


def test_registry_holds_the_three_models() -> None:
    assert sorted(MODELS) == ["cnn", "logistic", "mlp"]


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_model_maps_a_batch_to_one_logit_per_class(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10)

    out = model(batch_for(shape, size=5))

    assert out.shape == (5, 10)


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_model_is_opacus_compatible(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 3)

    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # inputs need no grad
@pytest.mark.parametrize(("name", "shape"), [("mlp", TABLE), ("cnn", DIGITS)])
def test_opacus_computes_a_per_sample_gradient_for_every_parameter(
    name: str, shape: tuple[int, ...]
) -> None:
    model = GradSampleModule(build_model(name, shape, 3))

    model(batch_for(shape, size=4)).sum().backward()

    for parameter in model.parameters():
        assert parameter.grad_sample is not None
        assert parameter.grad_sample.shape == (4, *parameter.shape)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_seed_gives_identical_weights_and_another_seed_different(name: str) -> None:
    shape = DIGITS

    first = build_model(name, shape, 4, seed=3).state_dict()
    same = build_model(name, shape, 4, seed=3).state_dict()
    other = build_model(name, shape, 4, seed=4).state_dict()

    assert first.keys() == same.keys()
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_cnn_has_no_batch_norm() -> None:
    model = build_model("cnn", FASHION, 10)

    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_cnn_on_a_table_shape_is_a_config_error_with_a_hint() -> None:
    with pytest.raises(ConfigError, match=r"model 'cnn' needs image features") as info:
        build_model("cnn", TABLE, 2)

    assert "logistic" in info.value.hint


def test_cnn_on_a_tiny_image_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="at least 4×4 pixels, got 3×3"):
        build_model("cnn", (1, 3, 3), 2)


def test_unknown_model_is_a_config_error_listing_the_names() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet'; choose one of: auto, ") as info:
        build_model("resnet", TABLE, 2)

    for name in MODELS:
        assert name in str(info.value)


def test_fewer_than_two_classes_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="num_classes must be >= 2, got 1"):
        build_model("logistic", TABLE, 1)


@pytest.mark.parametrize(("kind", "name"), [("image", "cnn"), ("table", "logistic")])
def test_auto_picks_cnn_for_images_and_logistic_for_tables(kind: str, name: str) -> None:
    assert default_model_for(kind) == name
