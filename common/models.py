"""Model registry: small Opacus-compatible networks for tables and 8×8 / 28×28 images.

Every model is built from the data's schema alone (feature shape, number of classes), so the
coordinator can create the initial global model without seeing any data. No BatchNorm
(it mixes samples, which DP-SGD forbids); the CNN uses tanh activations, which Papernot et
al., "Tempered Sigmoid Activations for Deep Learning with Differential Privacy" (AAAI 2021)
found better than ReLU under gradient clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fedvault.common.errors import ConfigError

Builder = Callable[[tuple[int, ...], int], nn.Module]


def _flat(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def logistic(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened features."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat(feature_shape), num_classes))


def mlp(feature_shape: tuple[int, ...], num_classes: int, hidden: int = 64) -> nn.Module:
    """A two-layer perceptron for tables."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_flat(feature_shape), hidden),
        nn.Tanh(),
        nn.Linear(hidden, num_classes),
    )


def cnn(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small two-block CNN for single-channel images (8×8 digits, 28×28 Fashion-MNIST)."""
    if len(feature_shape) != 3:
        raise ConfigError(
            "model 'cnn' needs image features (channels, height, width), "
            f"got shape {feature_shape}",
            hint="Use model 'logistic' or 'mlp' for tables.",
        )
    channels, height, width = feature_shape
    if min(height, width) < 4:
        raise ConfigError(f"model 'cnn' needs images of at least 4×4 pixels, got {height}×{width}")
    features = nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        flat = features(torch.zeros(1, *feature_shape)).shape[1]
    return nn.Sequential(features, nn.Linear(flat, 64), nn.Tanh(), nn.Linear(64, num_classes))


MODELS: dict[str, Builder] = {"logistic": logistic, "mlp": mlp, "cnn": cnn}


def default_model_for(kind: str) -> str:
    """The model used when the config says ``auto``: CNN for images, logistic for tables."""
    return "cnn" if kind == "image" else "logistic"


def build_model(
    name: str, feature_shape: tuple[int, ...], num_classes: int, *, seed: int = 0
) -> nn.Module:
    """Build model ``name`` for the given schema, with deterministic initial weights."""
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; choose one of: auto, {', '.join(MODELS)}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    torch.manual_seed(seed)
    return MODELS[name](tuple(feature_shape), num_classes)
