"""Model-update validation before aggregation: structure, finiteness, and an L2 norm bound.

Framework-free (numpy only). The coordinator checks every site's returned model against the
global model it sent that round; an update that fails is excluded from aggregation and
reported with the site and a one-line reason (``UpdateRejected``).

The norm bound for DP-SGD updates, ``default_update_norm_bound``, follows from how Opacus
runs DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016): each step's
gradient is a sum of per-sample gradients clipped to ``C`` plus Gaussian noise, divided by
the expected batch size, so how far honest local training can move the model is bounded
(with overwhelming probability) by the training settings alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedvault.common.errors import UpdateRejected

#: Standard deviations of slack in the high-probability bound: each of its two random terms
#: exceeds its bound with probability at most exp(-k²/2) (≈ 1.5e-8 for k = 6).
CONFIDENCE_SDS = 6.0
#: Multiplies the high-probability bound, for what the analysis leaves out (float rounding,
#: a site re-planning its noise after a restart).
SAFETY_FACTOR = 2.0


def _keys(names: set[str]) -> str:
    return ", ".join(repr(name) for name in sorted(names))


def check_finite(update: Mapping[str, np.ndarray]) -> None:
    """Raise UpdateRejected naming the first array with NaN or infinite values, and how many."""
    for key in sorted(update):
        values = np.asarray(update[key])
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.integer):
            continue
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise UpdateRejected(f"non-finite values in '{key}': {bad} of {values.size}")


def validate_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    max_norm: float | None,
) -> float:
    """Check a site's returned model against the global model it trained from.

    The update must have exactly the reference's keys, each array with the reference's
    shape and dtype, only finite values, and ``‖update − reference‖`` (the L2 norm over all
    arrays together) at most ``max_norm`` (None or 0: no norm check). Returns that norm;
    raises UpdateRejected with a one-line reason otherwise.
    """
    missing, extra = set(reference) - set(update), set(update) - set(reference)
    if missing or extra:
        parts = [f"missing {_keys(missing)}"] if missing else []
        parts += [f"unexpected {_keys(extra)}"] if extra else []
        raise UpdateRejected(f"arrays do not match the global model: {'; '.join(parts)}")
    for key in sorted(reference):
        got, expected = np.asarray(update[key]), np.asarray(reference[key])
        if got.shape != expected.shape:
            raise UpdateRejected(
                f"shape of '{key}' is {got.shape}, the global model's is {expected.shape}"
            )
        if got.dtype != expected.dtype:
            raise UpdateRejected(
                f"dtype of '{key}' is {got.dtype}, the global model's is {expected.dtype}"
            )
    check_finite(update)
    squared = 0.0
    for key in sorted(reference):
        diff = np.asarray(update[key], dtype=np.float64) - np.asarray(
            reference[key], dtype=np.float64
        )
        squared += float(np.dot(diff.ravel(), diff.ravel()))
    norm = math.sqrt(squared)
    if not math.isfinite(norm):  # finite float32 values whose squares overflow float64 cannot
        raise UpdateRejected("update norm is not finite")  # occur, but say so if they ever do
    if max_norm and norm > max_norm:
        raise UpdateRejected(f"update norm {norm:.4g} is above the bound {max_norm:.4g}")
    return norm


def steps_for(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(q, steps) of one round of local training, as common/training.py and Opacus run it.

    q = 1 / ceil(n / B) and ceil(n / B) steps per epoch (``sample_rate_for`` and
    ``steps_per_epoch`` in common/training.py; repeated here to keep this module numpy-only).
    """
    per_epoch = max(1, math.ceil(num_examples / batch_size))
    return 1.0 / per_epoch, local_epochs * per_epoch


def default_update_norm_bound(
    *,
    num_params: int,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    learning_rate: float,
    momentum: float,
    max_grad_norm: float,
    noise_multiplier: float,
    confidence_sds: float = CONFIDENCE_SDS,
    safety_factor: float = SAFETY_FACTOR,
) -> float:
    """An L2 bound on ``‖w_T − w_0‖`` after one round of local DP-SGD that an honest site
    exceeds with probability at most ``2·exp(−k²/2)`` (k = ``confidence_sds``), times
    ``safety_factor``.

    Derivation, for Opacus' DP-SGD with Poisson sampling and mean loss reduction:

    - ``q = 1/ceil(n/B)`` and ``T = epochs·ceil(n/B)`` steps (``steps_for``); Opacus divides
      by the expected batch size ``B_e = int(n·q)``. Step t's gradient is
      ``g_t = (Σ_{i∈batch_t} clip_C(∇ℓ_i) + ξ_t) / B_e`` with ``ξ_t ~ N(0, σ²C²·I_d)``,
      each of the n rows in ``batch_t`` independently with probability q.
    - SGD with heavy-ball momentum μ (torch's: ``v_t = μ·v_{t−1} + g_t``,
      ``w_t = w_{t−1} − lr·v_t``) moves the model by ``Δ = −lr·Σ_t c_t·g_t`` with
      ``c_t = (1 − μ^{T−t+1})/(1 − μ)``, at most ``c_max = (1 − μ^T)/(1 − μ)``. FedProx's
      proximal step multiplies Δ by ``1 − lr·mu`` after each step; when ``lr·mu ≤ 2`` that
      only shrinks every coefficient, so the bound still holds.
    - Clipped part: ``‖Σ_t c_t·Σ_{i∈batch_t} clip_C(∇ℓ_i)‖ ≤ C·X`` with
      ``X = Σ_t c_t·|batch_t|``, a sum of n·T independent terms in ``[0, c_max]`` with mean
      ``m = n·q·Σc_t`` and variance at most ``v = n·q·Σc_t²``. Bernstein's inequality
      (Boucheron, Lugosi & Massart, "Concentration Inequalities", 2013, Thm 2.10) gives
      ``P(X ≥ m + x) ≤ exp(−x²/(2(v + c_max·x/3)))``, which is ``exp(−k²/2)`` at
      ``x = c_max·k²/6 + sqrt(c_max²·k⁴/36 + k²·v)``.
    - Noise part: ``Σ_t c_t·ξ_t ~ N(0, σ²C²·Σc_t²·I_d)``: the c_t are fixed and the ξ_t
      independent, whatever the clipped part did. For ``Z ~ N(0, I_d)``, ``E‖Z‖ ≤ √d`` and
      ``‖·‖`` is 1-Lipschitz, so Gaussian concentration (Tsirelson–Ibragimov–Sudakov; ibid.,
      Thm 5.6) gives ``P(‖Z‖ ≥ √d + k) ≤ exp(−k²/2)``.

    Together, with probability at least ``1 − 2·exp(−k²/2)`` (d = ``num_params``)::

        ‖Δ‖ ≤ lr·C/B_e · (m + x + σ·sqrt(Σc_t²)·(√d + k))

    For μ = 0 this is ``lr·C/B_e·(n·T·q + x + σ·√T·(√d + k))``, about
    ``lr·T·C·(1 + σ(√d + k)/(√T·B_e))``: the sum of the per-step worst cases, except that
    the independent noise adds up like √T rather than T. Without clipping (no DP) no such
    bound exists: the caller uses the configured ``max-update-norm`` instead.
    """
    for name, value in (
        ("num_params", num_params),
        ("num_examples", num_examples),
        ("batch_size", batch_size),
        ("local_epochs", local_epochs),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not (learning_rate > 0 and max_grad_norm > 0 and noise_multiplier >= 0):
        raise ValueError(
            "learning_rate and max_grad_norm must be > 0 and noise_multiplier >= 0, got "
            f"{learning_rate}, {max_grad_norm}, {noise_multiplier}"
        )
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    q, steps = steps_for(num_examples, batch_size, local_epochs)
    expected_batch = max(1, int(num_examples * q))  # as Opacus computes it
    weights = (1 - momentum ** np.arange(1, steps + 1)) / (1 - momentum)
    sum_c, sum_c2, c_max = float(weights.sum()), float(np.square(weights).sum()), weights[-1]
    k = confidence_sds
    mean = num_examples * q * sum_c
    variance = num_examples * q * sum_c2
    excess = c_max * k**2 / 6 + math.sqrt((c_max * k**2 / 6) ** 2 + k**2 * variance)
    noise = noise_multiplier * math.sqrt(sum_c2) * (math.sqrt(num_params) + k)
    scale = learning_rate * max_grad_norm / expected_batch
    return float(safety_factor * scale * (mean + excess + noise))
