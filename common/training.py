"""Local training at one site: DP-SGD (Poisson sampling) by book-keeping or Opacus, or plain SGD.

DP-SGD: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 — per-sample
gradients clipped to ``max_grad_norm``, Gaussian noise of std ``noise_multiplier ×
max_grad_norm`` added to their sum, batches drawn by Poisson sampling at rate ``q`` so
the subsampled-Gaussian accounting of common/privacy.py applies. How the clipped
per-sample gradients are computed changes only the speed: ``bk``, the book-keeping engine
of common/bk_dpsgd.py (Bu et al., ICML 2023), for models of Linear and Conv2d layers, or
one of Opacus' grad-sample modes (hooks, ew, functorch, ghost clipping) for any model;
``auto_grad_sample_mode`` picks the fastest measured per model.

The noise and the batch sampling draw from a generator seeded from the operating
system's entropy, never from the run's configured seed: the coordinator chooses that
seed, and noise it could predict would protect nothing.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedvault.common.bk_dpsgd import BKDPSGD, bk_supported, poisson_batches
from fedvault.common.config import GRAD_SAMPLE_MODES
from fedvault.common.errors import ConfigError
from fedvault.common.flat_sgd import FlatSGD
from fedvault.common.metrics import DEFAULT_SCORE_BINS, SiteStatistics, site_statistics
from fedvault.common.registry import ACCOUNTANTS

if TYPE_CHECKING:
    from fedvault.common.privacy import PrivacyEvent

logger = logging.getLogger(__name__)

SECURE_RNG_NOTE = (
    "secure RNG is off: DP noise comes from torch's generator seeded from OS entropy, "
    "not a cryptographically secure RNG (see TrainingPlan.secure_rng, Opacus' secure_mode "
    "and the floating-point attack of Mironov, CCS 2012)."
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
    accountant: str = ACCOUNTANTS.default
    #: One of GRAD_SAMPLE_MODES; "auto" chooses per model and batch size (see
    #: ``auto_grad_sample_mode``). Only speed depends on it, never clipping, noise or epsilon.
    grad_sample_mode: str = "auto"
    #: L2 penalty on the weights, applied (as torch's SGD does) to the privatised gradient.
    weight_decay: float = 0.0
    #: BK engine only: noise from the OS's cryptographically secure RNG (slower).
    secure_rng: bool = False


@dataclass(frozen=True)
class TrainingOutcome:
    """What a round of local training did: the privacy event (None without DP) and its size."""

    steps: int
    sample_rate: float
    num_examples: int
    event: PrivacyEvent | None
    #: The engine DP-SGD ran in ("bk" or an Opacus grad-sample mode); None without DP.
    grad_sample_mode: str | None = None


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


#: Modes whose forward pass fails on an empty Poisson batch (Opacus 1.6 raises "Batch size
#: must be positive" in ew, a grouped-convolution error in functorch); train() runs those
#: steps without a forward pass. hooks and ghost handle empty batches themselves.
EMPTY_BATCH_UNSAFE_MODES: frozenset[str] = frozenset({"ew", "functorch"})


def resolve_grad_sample_mode(name: str, model: nn.Module, batch_size: int) -> str:
    """The engine to run: ``name`` itself, or the automatic choice.

    ``bk`` on a model with a layer it does not handle falls back to Opacus' choice.
    """
    if name not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"unknown grad_sample_mode '{name}'; choose one of: {', '.join(GRAD_SAMPLE_MODES)}"
        )
    if name == "bk" and not bk_supported(model):
        fallback = auto_opacus_mode(model, batch_size)
        logger.warning("model has layers the bk engine does not handle; using Opacus %s", fallback)
        return fallback
    return auto_grad_sample_mode(model, batch_size) if name == "auto" else name


#: Ghost clipping (Li et al., ICLR 2022) computes a Linear layer's per-sample gradient norms
#: from its inputs and output gradients without building the per-sample gradients, at the
#: price of a second backward pass. It pays off once those gradients are big: batch size ×
#: Linear parameters (elements per step) at least GHOST_MIN_LINEAR_ELEMENTS, or
#: GHOST_MIN_CONV_ELEMENTS when the model has convolutions, whose per-sample gradients ghost
#: still builds and whose second backward pass costs far more. Steps-only micro-measurement,
#: 1 CPU thread, Opacus 1.6 (ghost vs ew, × plain SGD): 784-64-10 MLP B 8 (0.4 M) 7.0 vs 6.7,
#: B 16 (0.8 M) 6.4 vs 7.2, B 32 (1.6 M) 16 vs 22; 30-64-2 MLP B 32 (68 k) 6.7 vs 4.2, B 512
#: (1.1 M) 4.9 vs 13.9; 28×28 CNN B 32 (3.2 M) 1.75 vs 1.72, B 64 (6.5 M) 1.78 vs 2.10,
#: B 256 (26 M) 1.72 vs 3.08; 8×8 CNN B 256 (2.3 M) 2.33 vs 2.16.
GHOST_MIN_LINEAR_ELEMENTS = 500_000
GHOST_MIN_CONV_ELEMENTS = 4_000_000


def auto_grad_sample_mode(model: nn.Module, batch_size: int) -> str:
    """The engine ``grad_sample_mode = "auto"`` runs for ``model`` at ``batch_size``.

    ``bk`` (common/bk_dpsgd.py) for every model of Linear, Conv2d and parameter-free layers,
    which it ran at 0.8-1.3× the cost of plain SGD where Opacus needed 1.7-4.2× (see
    benchmarks/RESULTS.md); Opacus' mode (``auto_opacus_mode``) for any other model.
    """
    return "bk" if bk_supported(model) else auto_opacus_mode(model, batch_size)


def auto_opacus_mode(model: nn.Module, batch_size: int) -> str:
    """The fastest measured Opacus grad-sample mode for ``model`` at ``batch_size``.

    ``ghost`` where the per-sample gradients of Linear layers are large (see
    GHOST_MIN_LINEAR_ELEMENTS), else ``ew`` (torch's expanded weights), which beat Opacus'
    ``hooks`` on the small table models and tied with it on the CNNs. All modes clip each
    sample's whole gradient to ``max_grad_norm`` and add the same noise.
    """
    modules = list(model.modules())
    linear = sum(p.numel() for m in modules if isinstance(m, nn.Linear) for p in m.parameters())
    has_conv = any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in modules)
    threshold = GHOST_MIN_CONV_ELEMENTS if has_conv else GHOST_MIN_LINEAR_ELEMENTS
    return "ghost" if batch_size * linear >= threshold else "ew"


def train(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    plan: TrainingPlan,
    device: torch.device,
) -> TrainingOutcome:
    """Train ``model`` in place on one site's rows for ``plan.local_epochs`` epochs.

    With DP the privacy event (sigma, sample rate, steps) is what the engine ran: the BK
    engine counts its own Poisson steps; under Opacus it is read back from Opacus' accountant.
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
    global_params = [p.detach().clone() for p in model.parameters()]
    model.to(device).train()
    # The rows live in two tensors; batches are cut from them by index.
    x_all = torch.from_numpy(features).to(device)
    y_all = torch.from_numpy(labels).to(device)
    rows = _Rows(x_all, y_all, [g.to(device) for g in global_params], plan)
    mode = resolve_grad_sample_mode(plan.grad_sample_mode, model, plan.batch_size)
    if plan.noise_multiplier is None:
        return _train_plain(model, rows, plan=plan)
    if plan.secure_rng and mode != "bk":
        raise ConfigError(
            f"secure_rng needs the bk engine; grad-sample mode '{mode}' runs Opacus",
            hint="Use grad-sample-mode bk or auto with a built-in model.",
        )
    if mode == "bk":
        return _train_bk(model, rows, plan=plan, device=device)
    return _train_opacus(model, rows, plan=plan, device=device, mode=mode)


@dataclass(frozen=True)
class _Rows:
    """A site's rows on the device, and what the FedProx term needs."""

    x: torch.Tensor
    y: torch.Tensor
    global_params: list[torch.Tensor]
    plan: TrainingPlan

    def proximal_step(self, model: nn.Module) -> None:
        # FedProx's proximal term mu/2·||w - w_global||² is data-independent, so its
        # gradient is applied outside DP-SGD's clipping (Li et al., MLSys 2020).
        if self.plan.proximal_mu > 0:
            scale = self.plan.learning_rate * self.plan.proximal_mu
            with torch.no_grad():
                for p, g in zip(model.parameters(), self.global_params, strict=True):
                    p.sub_(scale * (p - g))


def _train_plain(model: nn.Module, rows: _Rows, *, plan: TrainingPlan) -> TrainingOutcome:
    """Plain SGD, no DP: each epoch a shuffled split of the rows into batches.

    The permutation is drawn once per epoch and cut into index tensors (the batches a
    shuffling DataLoader would draw, without its per-batch Python lists); the update is
    common/flat_sgd.py's, torch's SGD arithmetic on one flat buffer.
    """
    n = len(rows.y)
    generator = _fresh_generator(torch.device("cpu"))
    optimizer = FlatSGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=plan.learning_rate,
        momentum=plan.momentum,
        weight_decay=plan.weight_decay,
    )
    steps = 0
    try:
        for _ in range(plan.local_epochs):
            order = torch.randperm(n, generator=generator).to(rows.x.device)
            for index in order.split(plan.batch_size):
                optimizer.zero_grad()
                F.cross_entropy(model(rows.x[index]), rows.y[index]).backward()
                optimizer.step()
                steps += 1
                rows.proximal_step(model)
    finally:
        optimizer.close()
        _clear_gradients(model)
    return TrainingOutcome(
        steps=steps,
        sample_rate=sample_rate_for(n, plan.batch_size),
        num_examples=n,
        event=None,
    )


def _train_bk(
    model: nn.Module, rows: _Rows, *, plan: TrainingPlan, device: torch.device
) -> TrainingOutcome:
    """DP-SGD by the book-keeping engine, with Opacus' Poisson sampling, rate and step count.

    Each step draws every row independently with probability q from the sampling generator,
    exactly as Opacus' UniformWithReplacementSampler does; an epoch is ``int(1 / q)`` steps
    and the clipped sum is divided by the expected batch size ``int(n · q)``, as Opacus does.
    """
    assert plan.noise_multiplier is not None
    n = len(rows.y)
    q = sample_rate_for(n, plan.batch_size)
    sampler = _fresh_generator(torch.device("cpu"))
    engine = BKDPSGD(
        model,
        max_grad_norm=plan.max_grad_norm,
        noise_multiplier=plan.noise_multiplier,
        expected_batch_size=int(n * q),
        learning_rate=plan.learning_rate,
        momentum=plan.momentum,
        weight_decay=plan.weight_decay,
        noise_generator=_fresh_generator(device),
        secure_rng=plan.secure_rng,
    )
    steps = 0
    try:
        for index in poisson_batches(n, q, plan.local_epochs * int(1 / q), sampler):
            index = index.to(device)
            engine.step(rows.x[index], rows.y[index])
            steps += 1
            rows.proximal_step(model)
    finally:
        engine.close()
        _clear_gradients(model)
    from fedvault.common.privacy import PrivacyEvent

    event = PrivacyEvent(noise_multiplier=float(plan.noise_multiplier), sample_rate=q, steps=steps)
    return TrainingOutcome(
        steps=steps, sample_rate=q, num_examples=n, event=event, grad_sample_mode="bk"
    )


def _train_opacus(
    model: nn.Module, rows: _Rows, *, plan: TrainingPlan, device: torch.device, mode: str
) -> TrainingOutcome:
    """DP-SGD by Opacus in grad-sample ``mode``; the privacy event is read back from Opacus'
    own accountant, so what is recorded is exactly what Opacus did."""
    # Opacus is imported here, not at module level: a deployed site starts a fresh
    # process per message, and evaluating a model must not pay for Opacus' import.
    from opacus import PrivacyEngine

    assert plan.noise_multiplier is not None
    dataset = TensorDataset(rows.x, rows.y)
    generator = _fresh_generator(torch.device("cpu"))
    loader = DataLoader(dataset, batch_size=plan.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=plan.learning_rate,
        momentum=plan.momentum,
        weight_decay=plan.weight_decay,
    )
    criterion: Callable[[torch.Tensor, torch.Tensor], Any] = nn.CrossEntropyLoss()
    engine = PrivacyEngine(accountant=plan.accountant, secure_mode=False)
    prepared: tuple[Any, ...] = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        noise_generator=_fresh_generator(device),
        grad_sample_mode=mode,
    )
    if mode == "ghost":  # Opacus' loss wrapper runs ghost clipping's two backward passes
        module, optimizer, criterion, loader = prepared
    else:
        module, optimizer, loader = prepared

    # Opacus' Poisson sampler picks the rows: each row independently with probability q,
    # one draw of the loader's generator per step.
    batches = loader.batch_sampler
    if batches is None:
        raise RuntimeError("the training loader has no batch sampler")
    steps = 0
    for _ in range(plan.local_epochs):
        for indices in batches:
            optimizer.zero_grad(set_to_none=True)
            index = torch.as_tensor(indices, dtype=torch.long, device=device)
            if len(index) == 0 and mode in EMPTY_BATCH_UNSAFE_MODES:
                _empty_batch_gradients(model)  # noise only, as Opacus' hooks mode does
            else:
                loss = criterion(module(rows.x[index]), rows.y[index])
                loss.backward()
            optimizer.step()
            steps += 1
            rows.proximal_step(model)

    history = engine.accountant.history
    if len(history) != 1:
        raise RuntimeError(f"expected one Opacus accounting entry, got {history}")
    sigma, q, opacus_steps = history[0]
    if opacus_steps != steps:
        raise RuntimeError(f"Opacus counted {opacus_steps} steps, fedvault {steps}")
    from opacus.grad_sample.gsm_base import AbstractGradSampleModule

    from fedvault.common.privacy import PrivacyEvent

    optimizer.zero_grad(set_to_none=True)  # drops grad, grad_sample and summed_grad
    if isinstance(module, AbstractGradSampleModule):
        module._close()  # detach Opacus' hooks from the caller's model
    _clear_gradients(model)
    event = PrivacyEvent(noise_multiplier=float(sigma), sample_rate=float(q), steps=steps)
    return TrainingOutcome(
        steps=steps,
        sample_rate=float(q),
        num_examples=len(rows.y),
        event=event,
        grad_sample_mode=mode,
    )


def _empty_batch_gradients(model: nn.Module) -> None:
    """Give every parameter an empty per-sample gradient, for a step on an empty batch.

    Poisson sampling may draw no row at all. Opacus' DP optimizer then clips and sums
    nothing and adds the noise alone, which is the DP-SGD step the accountant counts; its
    ``ew`` and ``functorch`` modes cannot run a forward pass on zero rows, so the empty
    per-sample gradients are set here instead of by a backward pass.
    """
    for param in model.parameters():
        if param.requires_grad:
            empty = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
            param.grad_sample = empty  # type: ignore[attr-defined]  # Opacus' attribute


def _clear_gradients(model: nn.Module) -> None:
    """Leave no gradient on the model: Opacus' ``summed_grad`` is the un-noised clipped sum."""
    for param in model.parameters():
        param.grad = None
        for attr in ("grad_sample", "summed_grad", "_current_grad_sample", "_norm_sample"):
            if hasattr(param, attr):
                delattr(param, attr)


@torch.no_grad()
def evaluate(
    model: nn.Module, features: np.ndarray, labels: np.ndarray, *, device: torch.device
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on the given rows."""
    result = evaluate_counts(model, features, labels, device=device)
    return result.loss, result.accuracy


@dataclass(frozen=True)
class Evaluation:
    """One site's evaluation: mean loss, accuracy and the counts the coordinator aggregates."""

    loss: float
    accuracy: float
    statistics: SiteStatistics


def evaluate_counts(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    device: torch.device,
    bins: int = DEFAULT_SCORE_BINS,
) -> Evaluation:
    """Loss, accuracy, confusion matrix and (binary tasks) the histogram of class-1
    probabilities of ``model`` on the given rows (common/metrics.py); no row leaves here."""
    if len(labels) == 0:
        raise ConfigError("a site has no test rows")
    model.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss = 0.0
    predictions, scores = [], []
    with torch.no_grad():
        for start in range(0, len(labels), 2048):
            x = torch.from_numpy(features[start : start + 2048]).to(device)
            y = torch.from_numpy(labels[start : start + 2048]).to(device)
            out = model(x)
            total_loss += float(criterion(out, y))
            predictions.append(out.argmax(dim=1).cpu().numpy())
            if out.shape[1] == 2:
                scores.append(torch.softmax(out.double(), dim=1)[:, 1].cpu().numpy())
    predicted = np.concatenate(predictions)
    stats = site_statistics(
        labels,
        predicted,
        num_classes=int(out.shape[1]),
        positive_scores=np.concatenate(scores) if scores else None,
        bins=bins,
    )
    correct = int(np.trace(stats.confusion))
    return Evaluation(total_loss / len(labels), correct / len(labels), stats)
