"""Book-keeping DP-SGD for models of Linear and Conv2d layers, without Opacus' per-sample pass.

Bu, Wang, Zha, Karypis, "Differentially Private Optimization on Large Model at Small Cost",
ICML 2023 (the book-keeping, BK, algorithm). One backward pass goes to the layer outputs
only; each trainable layer's per-sample gradient norm is then computed from its input ``a``
and output gradient ``g``: for a Linear layer on (batch, features) inputs in closed form,
``‖g_i‖² (‖a_i‖² + 1)`` (the "ghost norm" of Goodfellow 2015 and Li et al., ICLR 2022), with no
per-sample gradient built; for a Conv2d (or a Linear on sequences) from small per-sample
gradients through ``unfold``. The clip factors ``min(1, C / (‖g_i‖ + 1e-6))`` (Opacus'
formula) then weight one matrix product per layer that writes the clipped sum into a flat
buffer that already holds the Gaussian noise N(0, (σC)²) (drawn in place, in one call), and
one update (common/flat_sgd.py: torch's SGD arithmetic, momentum and weight decay on the
privatised gradient) divides by the expected batch size and moves the parameters.

This is DP-SGD exactly as Opacus runs it (Abadi et al., CCS 2016): the same clipping, noise
and scaling; only the way the clipped sum is computed differs. Models with any other
parameterised layer are left to Opacus (see ``bk_supported``).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from fedvault.common.flat_sgd import FlatSGD

#: Layers whose clipped per-sample gradients this module computes.
BK_LAYERS = (nn.Linear, nn.Conv2d)
#: Parameter-free layers that still mix the samples of a batch: never run under BK.
_MIXING = (nn.modules.batchnorm._BatchNorm,)
#: Opacus' guard against dividing by a zero per-sample norm.
CLIP_EPS = 1e-6

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bk_supported(model: nn.Module) -> bool:
    """Whether every trainable layer of ``model`` is one BK handles and nothing mixes samples."""
    has_layer = False
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, _MIXING):
            return False
        if not own:
            continue
        if not isinstance(module, BK_LAYERS) or not all(p.requires_grad for p in own):
            return False
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            return False
        has_layer = True
    return has_layer


def _sequential_leaves(model: nn.Module) -> list[nn.Module] | None:
    """The leaves of a tree of plain ``nn.Sequential``, in order; None for any other model."""
    if type(model) is not nn.Sequential:
        return None
    leaves: list[nn.Module] = []
    for child in model:
        if type(child) is nn.Sequential:
            inner = _sequential_leaves(child)
            if inner is None:
                return None
            leaves.extend(inner)
        elif len(list(child.children())) == 0:
            leaves.append(child)
        else:
            return None
    return leaves


def _direct(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module.forward`` where calling it skips nothing (no hooks anywhere), else ``module``."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
    global_hooks = (
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    )
    return module if any(hooks) or global_hooks else module.forward


class SecureGaussian:
    """N(0, 1) from the OS's cryptographically secure RNG, hardened as Opacus' secure_mode does.

    Uniform bits from ``secrets`` feed a Box-Muller transform in float64; each value is the
    sum of four such normals over 2, which defeats the floating-point attack of Mironov
    (CCS 2012) as in Holohan and Braghin (arXiv 2107.10138, §5.1), Opacus' fix.
    """

    def fill_(self, out: torch.Tensor) -> torch.Tensor:
        n = out.numel()
        total = torch.zeros(n, dtype=torch.float64)
        for _ in range(4):
            raw = torch.frombuffer(bytearray(secrets.token_bytes(16 * n)), dtype=torch.int64)
            bits = (raw.view(2, n) >> 11) & (2**53 - 1)  # 53 random bits each
            u = bits.to(torch.float64).add_(1.0).mul_(2.0**-53)  # uniform in (0, 1]
            total += torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos(2 * math.pi * u[1])
        return out.copy_(total.div_(2).view_as(out))


def poisson_batches(
    num_rows: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Row indices of ``steps`` Poisson batches: each row independently with ``sample_rate``.

    The same draws as Opacus' UniformWithReplacementSampler (one ``torch.rand(num_rows)``
    per step, kept where below the rate), made a few hundred steps at a time.
    """
    chunk = max(1, (1 << 20) // num_rows)
    for start in range(0, steps, chunk):
        count = min(chunk, steps - start)
        mask = torch.rand(count, num_rows, generator=generator) < sample_rate
        hits = mask.nonzero()[:, 1]  # row-major: step by step, rows in order
        yield from hits.split(mask.sum(1).tolist())


class BKDPSGD:
    """One DP-SGD optimizer over ``model``'s parameters: ``step(x, y)`` does a whole step."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: int,
        learning_rate: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        noise_generator: torch.Generator | None = None,
        secure_rng: bool = False,
        criterion: Criterion | None = None,
    ) -> None:
        if not bk_supported(model):
            raise ValueError("BK DP-SGD needs a model of Linear/Conv2d and parameter-free layers")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.noise_std = float(noise_multiplier) * self.max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.generator = noise_generator
        self.secure = SecureGaussian() if secure_rng else None
        #: Per-sample losses summed: their gradients are the per-sample gradients.
        self.criterion: Criterion = criterion or (
            lambda out, y: F.cross_entropy(out, y, reduction="sum")
        )
        self.layers = [m for m in model.modules() if isinstance(m, BK_LAYERS)]
        self.params = [p for m in self.layers for p in m.parameters(recurse=False)]
        # Parameters and gradients become views of two flat buffers (common/flat_sgd.py).
        self.optimizer = FlatSGD(
            self.params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay
        )
        self.flat_grad = self.optimizer.grad
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for layer in self.layers:  # weight then bias, as views of flat_grad
            views = [cast(torch.Tensor, p.grad) for p in layer.parameters(recurse=False)]
            self._views[id(layer)] = (views[0], views[1] if len(views) > 1 else None)
        self._clip = torch.tensor(self.max_grad_norm, dtype=self.flat_grad.dtype)
        self._clip = self._clip.to(self.flat_grad.device)
        leaves = _sequential_leaves(model)
        # A leaf without hooks is called through forward(), skipping nn.Module's dispatch.
        self._leaves = None if leaves is None else [(leaf, _direct(leaf)) for leaf in leaves]
        self._captured: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._handles = []
        if self._leaves is None:  # any other module tree: capture through forward hooks
            self._handles = [layer.register_forward_hook(self._capture) for layer in self.layers]

    def _capture(self, layer: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        self._captured.append((layer, inputs[0].detach(), output))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self._captured.clear()
        if self._leaves is None:
            return cast(torch.Tensor, self.model(x))
        for leaf, call in self._leaves:
            out = call(x)
            if isinstance(leaf, BK_LAYERS):
                self._captured.append((leaf, x.detach(), out))
            x = out
        return x

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Write the sum of the clipped per-sample gradients into ``flat_grad``; return it."""
        self.flat_grad.zero_()
        self._accumulate_clipped(x, y)
        return self.flat_grad

    def _accumulate_clipped(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the clipped per-sample gradients of the batch to ``flat_grad``."""
        if len(y) == 0:
            return
        loss = self.criterion(self._forward(x), y)
        captured = list(self._captured)
        self._captured.clear()
        if len({id(layer) for layer, _, _ in captured}) != len(captured):
            raise RuntimeError("BK DP-SGD: a layer ran twice in one forward pass (shared weights)")
        out_grads = torch.autograd.grad(loss, [out for _, _, out in captured])
        parts: list[torch.Tensor] = []  # per-sample squared norms, per layer
        ghost: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        materialised: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = []
        for (layer, a, _), g in zip(captured, out_grads, strict=True):
            if isinstance(layer, nn.Linear) and a.dim() == 2:
                # Ghost norm: the per-sample gradient g_i a_iᵀ has norm ‖g_i‖·‖a_i‖.
                a_sq, g_sq = torch.linalg.vecdot(a, a), torch.linalg.vecdot(g, g)
                bias = layer.bias is not None
                parts.append(torch.addcmul(g_sq, g_sq, a_sq) if bias else g_sq * a_sq)
                ghost.append((layer, a, g))
            else:
                per_w, per_b = _per_sample_gradients(layer, a, g)
                parts.append(per_w.flatten(1).square().sum(1))
                if per_b is not None:
                    parts.append(torch.linalg.vecdot(per_b, per_b))
                materialised.append((layer, per_w, per_b))
        squared = parts[0]
        for part in parts[1:]:
            squared.add_(part)
        # Opacus' clip factor min(1, C / (norm + 1e-6)).
        factor = torch.div(self._clip, squared.sqrt_().add_(CLIP_EPS)).clamp_(max=1.0)
        for layer, a, g in ghost:  # Σ_i c_i g_i a_iᵀ = (c·g)ᵀ a, one product per layer
            weight_view, bias_view = self._views[id(layer)]
            # g * c, not in place: autograd may hand the same g to two layers
            weight_view.addmm_((g * factor.unsqueeze(1)).t(), a)
            if bias_view is not None:
                bias_view.addmv_(g.t(), factor)
        for layer, per_w, per_b in materialised:  # Σ_i c_i G_i, one product per tensor
            weight_view, bias_view = self._views[id(layer)]
            weight_view.view(-1).addmv_(per_w.flatten(1).t(), factor)
            if bias_view is not None and per_b is not None:
                bias_view.addmv_(per_b.t(), factor)

    def draw_noise(self) -> None:
        """Fill ``flat_grad`` with N(0, (σC)²) in one draw: the clipped sum is added to it."""
        if self.noise_std == 0:
            self.flat_grad.zero_()
        elif self.secure is not None:
            self.secure.fill_(self.flat_grad).mul_(self.noise_std)
        else:
            self.flat_grad.normal_(0.0, self.noise_std, generator=self.generator)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One DP-SGD step on the batch ``(x, y)``; an empty batch makes a noise-only step.

        The noise is drawn first, into the gradient buffer, and the clipped sum added to it;
        the division by the expected batch size is folded into the update.
        """
        self.draw_noise()
        self._accumulate_clipped(x, y)
        self.optimizer.step(scale=1.0 / self.expected_batch_size)

    def close(self) -> None:
        """Detach the hooks and the flat buffers from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer.close()


def _per_sample_gradients(
    layer: nn.Module, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample weight gradients (batch, out, in…) and bias gradients (batch, out)."""
    bias = getattr(layer, "bias", None)
    if isinstance(layer, nn.Linear):  # sequence inputs: (batch, …, features)
        a3, g3 = a.flatten(1, -2), g.flatten(1, -2)
        return torch.bmm(g3.transpose(1, 2), a3), (g3.sum(1) if bias is not None else None)
    conv = cast(nn.Conv2d, layer)
    unfolded = F.unfold(
        a,
        conv.kernel_size,
        dilation=conv.dilation,
        padding=conv.padding,  # type: ignore[arg-type]
        stride=conv.stride,
    )
    g3 = g.flatten(2)  # (batch, out, positions)
    return torch.bmm(g3, unfolded.transpose(1, 2)), (g3.sum(2) if bias is not None else None)
