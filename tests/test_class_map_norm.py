"""The NiN head's class-map batch norm: BatchNorm1d without a mask, statistics of the real
positions only with one; ``norm=False`` is the original NiN head."""

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


def test_nin_without_norm_is_the_original_head():
    torch.manual_seed(0)
    head = gp.NiNHead(4, 3, norm=False)
    x = torch.randn(2, 4, 5, 6)
    want = torch.relu(torch.einsum("kc,nchw->nkhw", head.conv.weight, x)
                      + head.conv.bias[:, None, None]).mean((2, 3))
    torch.testing.assert_close(head(x), want)
    assert "norm" not in dict(head.named_modules())


def test_nin_norm_keeps_every_class_map_alive():
    torch.manual_seed(0)
    x = torch.rand(8, 4, 7)  # non-negative features, as after a ReLU backbone
    for norm in (False, True):
        head = gp.NiNHead(4, 3, norm=norm, backend="torch")
        with torch.no_grad():
            head.conv.bias[0] = -100.0  # class 0's map negative everywhere
        head(x)[:, 0].sum().backward()
        alive = head.conv.weight.grad[0].abs().sum() > 0
        assert bool(alive) == norm  # dead (no gradient) without the norm, learning with it


def test_nin_norm_must_be_a_bool():
    with pytest.raises(TypeError, match="norm must be a bool"):
        gp.NiNHead(4, 3, norm="yes")
