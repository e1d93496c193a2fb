"""Tests for common/flat_sgd.py: the same updates as torch.optim.SGD, on one flat buffer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedvault.common.flat_sgd import FlatSGD

pytestmark = pytest.mark.unit


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(6, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g),
        )
        for _ in range(4)
    ]


@pytest.mark.parametrize(("momentum", "decay"), [(0.0, 0.0), (0.9, 0.0), (0.0, 0.05), (0.5, 0.01)])
def test_updates_equal_torch_sgd(momentum: float, decay: float) -> None:
    ours, theirs = model(), model()
    flat = FlatSGD(list(ours.parameters()), lr=0.3, momentum=momentum, weight_decay=decay)
    torch_sgd = torch.optim.SGD(theirs.parameters(), lr=0.3, momentum=momentum, weight_decay=decay)

    for x, y in batches():
        flat.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        flat.step()
        torch_sgd.zero_grad()
        F.cross_entropy(theirs(x), y).backward()
        torch_sgd.step()

    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_scale_multiplies_the_gradient_before_momentum_and_decay() -> None:
    ours, theirs = model(), model()
    flat = FlatSGD(list(ours.parameters()), lr=0.3, momentum=0.5, weight_decay=0.01)
    torch_sgd = torch.optim.SGD(theirs.parameters(), lr=0.3, momentum=0.5, weight_decay=0.01)

    for x, y in batches():
        flat.zero_grad()
        F.cross_entropy(ours(x), y, reduction="sum").backward()
        flat.step(scale=1 / 6)
        torch_sgd.zero_grad()
        F.cross_entropy(theirs(x), y).backward()  # mean over the 6 rows
        torch_sgd.step()

    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_close_gives_each_parameter_its_own_storage_and_no_gradient() -> None:
    net = model()
    before = copy.deepcopy(net.state_dict())
    flat = FlatSGD(list(net.parameters()), lr=0.1)
    shared = {p.untyped_storage().data_ptr() for p in net.parameters()}

    flat.close()

    assert len(shared) == 1  # while open: one buffer
    assert len({p.untyped_storage().data_ptr() for p in net.parameters()}) == 4
    assert all(p.grad is None for p in net.parameters())
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, before[name])
