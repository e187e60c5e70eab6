"""The NiN head: softplus class maps by default, ``activation="relu"`` the original head, and the
optional class-map batch norm (BatchNorm1d without a mask, statistics of the real positions only
with one)."""

from __future__ import annotations

import pytest
import torch

import globalpool as gp
from globalpool.class_map_norm import ClassMapNorm


def test_equals_batchnorm1d_without_a_mask_in_train_and_eval():
    torch.manual_seed(0)
    ours, ref = ClassMapNorm(3).double(), torch.nn.BatchNorm1d(3).double()
    for _ in range(3):
        z = torch.randn(4, 6, 3, dtype=torch.float64) * 3 + 1
        torch.testing.assert_close(ours(z), ref(z.movedim(-1, 1)).movedim(1, -1))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(z), ref(z.movedim(-1, 1)).movedim(1, -1))


def test_masked_statistics_are_those_of_the_real_positions():
    torch.manual_seed(0)
    z = torch.randn(3, 5, 2, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.4
    mask[:, 0] = True
    poisoned = torch.where(mask.unsqueeze(-1), z, 1e9)
    ours, ref = ClassMapNorm(2).double(), torch.nn.BatchNorm1d(2).double()
    got = ours(poisoned, mask)[mask]  # (real positions, classes)
    torch.testing.assert_close(got, ref(z[mask]))  # BatchNorm1d of the real positions only
    torch.testing.assert_close(ours.running_var, ref.running_var)
    # a batch without two real positions leaves the running statistics alone
    ours(z, torch.zeros(3, 5, dtype=torch.bool))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)


@pytest.mark.parametrize("activation", ["relu", "softplus"])
def test_nin_class_maps_formula(activation):
    torch.manual_seed(0)
    head = gp.NiNHead(4, 3, activation=activation)
    x = torch.randn(2, 4, 5, 6)
    z = torch.einsum("kc,nchw->nkhw", head.conv.weight, x) + head.conv.bias[:, None, None]
    act = torch.relu if activation == "relu" else torch.nn.functional.softplus
    torch.testing.assert_close(head(x), act(z).mean((2, 3)))
    assert "norm" not in dict(head.named_modules())


@pytest.mark.parametrize(("options", "alive"), [
    (dict(activation="relu"), False),  # the original head: the dead map gets no gradient
    (dict(), True),  # softplus
    (dict(activation="relu", norm=True), True),
])
def test_a_negative_class_map_still_learns(options, alive):
    torch.manual_seed(0)
    x = torch.rand(8, 4, 7)  # non-negative features, as after a ReLU backbone
    head = gp.NiNHead(4, 3, backend="torch", **options)
    with torch.no_grad():
        head.conv.bias[0] = -20.0  # class 0's map negative everywhere
    head(x)[:, 0].sum().backward()
    assert bool(head.conv.weight.grad[0].abs().sum() > 0) == alive


def test_nin_options_are_checked():
    with pytest.raises(TypeError, match="norm must be a bool"):
        gp.NiNHead(4, 3, norm="yes")
    with pytest.raises(ValueError, match=r"activation must be one of \('softplus', 'relu'\), got 'tanh'"):
        gp.NiNHead(4, 3, activation="tanh")
