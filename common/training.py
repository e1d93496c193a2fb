"""Local training at one site: DP-SGD with Opacus (Poisson sampling), or plain SGD as a baseline.

DP-SGD: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 — per-sample
gradients clipped to ``max_grad_norm``, Gaussian noise of std ``noise_multiplier ×
max_grad_norm`` added to their sum, batches drawn by Poisson sampling at rate ``q`` so
the subsampled-Gaussian accounting of common/privacy.py applies.

The noise and the batch sampling draw from a generator seeded from the operating
system's entropy, never from the run's configured seed: the coordinator chooses that
seed, and noise it could predict would protect nothing.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.errors import ConfigError
from common.privacy import PrivacyEvent

logger = logging.getLogger(__name__)

SECURE_RNG_NOTE = (
    "Opacus secure_mode is off: DP noise comes from torch's generator seeded from OS entropy, "
    "not a cryptographically secure RNG (see Opacus' secure_mode and the floating-point "
    "attack of Mironov, CCS 2012)."
)


@dataclass(frozen=True, kw_only=True)
class TrainingPlan:
    """What one site does in one round. ``noise_multiplier=None`` means no DP (baseline)."""

    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0
    proximal_mu: float = 0.0
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: str = "prv"


@dataclass(frozen=True)
class TrainingOutcome:
    """What a round of local training did: the privacy event (None without DP) and its size."""

    steps: int
    sample_rate: float
    num_examples: int
    event: PrivacyEvent | None


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch; with Poisson sampling Opacus runs this many steps per epoch."""
    return max(1, math.ceil(num_examples / batch_size))


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q, as Opacus derives it: 1 / (batches per epoch)."""
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def resolve_device(spec: str) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a device; ``auto`` uses CUDA when present."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device '{spec}' requested but this machine has no CUDA GPU visible to torch",
                hint="Use --device auto or cpu, or install a CUDA build of torch.",
            )
        index = 0 if spec == "cuda" else spec.split(":", 1)[1]
        if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
            raise ConfigError(
                f"device '{spec}' does not exist; "
                f"this machine has {torch.cuda.device_count()} GPU(s)"
            )
        return torch.device(f"cuda:{int(index)}")
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{spec}'")


def _fresh_generator(device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def train(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    plan: TrainingPlan,
    device: torch.device,
) -> TrainingOutcome:
    """Train ``model`` in place on one site's rows for ``plan.local_epochs`` epochs.

    With DP the privacy event is read back from Opacus' own accountant, so what is
    recorded is exactly what Opacus did (its sample rate, its step count).
    """
    if len(labels) == 0:
        raise ConfigError("a site has no training rows")
    with warnings.catch_warnings():
        # Two known, harmless warnings: Opacus' "Secure RNG turned off" (fedvault states that
        # caveat once per run, see SECURE_RNG_NOTE) and torch's full-backward-hook notice.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _train(model, features, labels, plan=plan, device=device)


def _train(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    plan: TrainingPlan,
    device: torch.device,
) -> TrainingOutcome:
    num_examples = len(labels)
    global_params = [p.detach().clone() for p in model.parameters()]
    model.to(device).train()
    dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    generator = _fresh_generator(torch.device("cpu"))
    loader = DataLoader(dataset, batch_size=plan.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.learning_rate, momentum=plan.momentum)
    criterion = nn.CrossEntropyLoss()

    engine: PrivacyEngine | None = None
    module: nn.Module = model
    if plan.noise_multiplier is not None:
        engine = PrivacyEngine(accountant=plan.accountant, secure_mode=False)
        module, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True,
            noise_generator=_fresh_generator(device),
        )

    steps = 0
    global_on_device = [g.to(device) for g in global_params]
    for _ in range(plan.local_epochs):
        for batch_x, batch_y in loader:
            optimizer.zero_grad(set_to_none=True)
            out = module(batch_x.to(device))
            loss = criterion(out, batch_y.to(device))
            loss.backward()
            optimizer.step()
            steps += 1
            if plan.proximal_mu > 0:
                # FedProx's proximal term mu/2·||w - w_global||² is data-independent, so its
                # gradient is applied outside DP-SGD's clipping (Li et al., MLSys 2020).
                with torch.no_grad():
                    for p, g in zip(model.parameters(), global_on_device, strict=True):
                        p.sub_(plan.learning_rate * plan.proximal_mu * (p - g))

    if engine is not None:
        history = engine.accountant.history
        if len(history) != 1:
            raise RuntimeError(f"expected one Opacus accounting entry, got {history}")
        sigma, q, opacus_steps = history[0]
        if opacus_steps != steps:
            raise RuntimeError(f"Opacus counted {opacus_steps} steps, fedvault {steps}")
        optimizer.zero_grad(set_to_none=True)  # drops grad, grad_sample and summed_grad
        if isinstance(module, AbstractGradSampleModule):
            module._close()  # detach Opacus' hooks from the caller's model
        _clear_gradients(model)
        event = PrivacyEvent(noise_multiplier=float(sigma), sample_rate=float(q), steps=steps)
        return TrainingOutcome(
            steps=steps, sample_rate=float(q), num_examples=num_examples, event=event
        )
    _clear_gradients(model)
    sample_rate = sample_rate_for(num_examples, plan.batch_size)
    return TrainingOutcome(
        steps=steps, sample_rate=sample_rate, num_examples=num_examples, event=None
    )


def _clear_gradients(model: nn.Module) -> None:
    """Leave no gradient on the model: Opacus' ``summed_grad`` is the un-noised clipped sum."""
    for param in model.parameters():
        param.grad = None
        for attr in ("grad_sample", "summed_grad", "_current_grad_sample"):
            if hasattr(param, attr):
                delattr(param, attr)


@torch.no_grad()
def evaluate(
    model: nn.Module, features: np.ndarray, labels: np.ndarray, *, device: torch.device
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on the given rows."""
    if len(labels) == 0:
        raise ConfigError("a site has no test rows")
    model.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), 2048):
        x = torch.from_numpy(features[start : start + 2048]).to(device)
        y = torch.from_numpy(labels[start : start + 2048]).to(device)
        out = model(x)
        total_loss += float(criterion(out, y))
        correct += int((out.argmax(dim=1) == y).sum())
    return total_loss / len(labels), correct / len(labels)
