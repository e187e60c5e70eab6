"""Every head on every model: forward and backward shapes, input-size freedom, the registry."""

from __future__ import annotations

import pytest
import torch

from globalpool import HEADS
from globalpool.lab.models import (
    CNN1D,
    DATASET_MODELS,
    MODELS,
    MultiScaleNet,
    build_model,
    count_parameters,
    resolve_model_name,
)

# (model, input shape (C, *S), small-width kwargs)
CASES = [
    ("cnn1d", (1, 40), {}),
    ("cnn2d", (1, 24, 24), {"width": 4}),
    ("resnet18", (3, 32, 32), {"width": 4, "hidden": 32}),
    ("multiscale", (1, 40), {"width": 4}),
    ("multiscale", (3, 16, 16), {"width": 4}),
    ("multiscale", (1, 8, 8, 8), {"width": 2}),
]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize(("model", "shape", "kwargs"), CASES, ids=lambda c: str(c))
def test_every_head_on_every_model(model, shape, kwargs, head):
    torch.manual_seed(0)
    net = build_model(model, head, 7, in_channels=shape[0], spatial_size=shape[1:], **kwargs)
    x = torch.randn(3, *shape, requires_grad=True)
    logits = net(x)
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "every parameter gets a gradient"
    assert count_parameters(net.head) < count_parameters(net)
    assert net.head_name == head
    assert net.fixed_input_size == (head == "fc")


@pytest.mark.parametrize(("model", "shape", "kwargs"), CASES[:4], ids=lambda c: str(c))
def test_pooling_heads_take_any_size_and_fc_refuses(model, shape, kwargs):
    bigger = tuple(s + 8 for s in shape[1:])
    for head in ("avg", "catavgmax", "nin"):
        net = build_model(model, head, 5, in_channels=shape[0], spatial_size=shape[1:], **kwargs)
        assert net(torch.randn(2, shape[0], *bigger)).shape == (2, 5)
    fc = build_model(model, "fc", 5, in_channels=shape[0], spatial_size=shape[1:], **kwargs)
    with pytest.raises(ValueError, match="flatten"):
        fc(torch.randn(2, shape[0], *bigger))


def test_cnn1d_is_the_mnist1d_paper_backbone():
    net = CNN1D("fc", 10, hidden=16)
    convs = [m for m in net.backbone if isinstance(m, torch.nn.Conv1d)]
    assert [
        (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs
    ] == [(1, 25, 5, 2, 1), (25, 25, 3, 2, 1), (25, 25, 3, 2, 1)]
    assert net.feature_shape == (25, 5)  # 125 flattened features, as in the paper
    assert count_parameters(net.backbone) == 3950
    assert net(torch.randn(4, 40)).shape == (4, 10)  # (N, L) is read as one channel


def test_head_parameter_counts():
    avg = CNN1D("avg")
    cat = CNN1D("catavgmax")
    fc = CNN1D("fc", hidden=256)
    assert count_parameters(avg.head) == 25 * 10 + 10
    assert count_parameters(cat.head) == 50 * 10 + 10
    assert count_parameters(fc.head) == 125 * 256 + 256 + 256 * 10 + 10


def test_multiscale_concatenates_stage_features():
    net = MultiScaleNet("catavgmax", 10, in_channels=1, spatial_size=(32,), width=4, stages=3)
    assert [s[0] for s in net.feature_shapes] == [4, 8, 16]
    assert net.head.feature_width == 2 * (4 + 8 + 16)
    assert net.head.fc.in_features == 56


def test_registry_by_model_and_dataset():
    assert set(MODELS) == {"cnn1d", "cnn2d", "resnet18", "resnet18-w16", "multiscale", "fastnet"}
    for dataset, name in DATASET_MODELS.items():
        assert resolve_model_name(dataset) == name
    assert resolve_model_name("folder:/some/where") == "cnn2d"
    net = build_model("digits-shifted", "gem", 10, in_channels=1, spatial_size=(24, 24))
    assert type(net).__name__ == "CNN2D"


@pytest.mark.parametrize("bad", ["vgg", "", "folderx"])
def test_unknown_model(bad):
    with pytest.raises(ValueError, match="model must be one of"):
        build_model(bad, "avg", 10, in_channels=1, spatial_size=(40,))


def test_unknown_head():
    with pytest.raises(ValueError, match="head"):
        build_model("cnn1d", "median", 10, in_channels=1, spatial_size=(40,))


def test_too_small_input():
    with pytest.raises(ValueError, match="spatial_size"):
        build_model("resnet18", "avg", 10, in_channels=3, spatial_size=(4, 4))


@pytest.mark.parametrize(
    "name",
    ["base", "cnn1d", "cnn2d", "resnet_cifar", "multiscale", "registry", "__init__"],
)
def test_model_doctests(name):
    import doctest
    import importlib

    module = importlib.import_module(
        "globalpool.lab.models" if name == "__init__" else f"globalpool.lab.models.{name}"
    )
    assert doctest.testmod(module).failed == 0
