"""Every head refuses a wrong channel count with a ValueError naming both counts, and the check
(shape only) survives torch.compile(fullgraph=True) and torch.export."""

from __future__ import annotations

import re

import pytest
import torch

import globalpool as gp

OWNERS = {"fc": "FlattenFCHead", "nin": "NiNHead"}
LAYOUTS = ("channels_first", "channels_last")


def _input(channels: int, spatial: tuple[int, ...], layout: str) -> torch.Tensor:
    shape = (2, channels, *spatial) if layout == "channels_first" else (2, *spatial, channels)
    return torch.randn(shape)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", gp.HEADS)
@pytest.mark.parametrize("spatial", [(5,), (4, 4), (2, 3, 2)], ids=["1d", "2d", "3d"])
def test_wrong_channel_count_names_expected_and_received(name, layout, spatial):
    head = gp.make_head(name, 12, 3, spatial_size=spatial, hidden=8, layout=layout, backend="torch")
    owner = OWNERS.get(name, "ClassifierHead")
    dim = 1 if layout == "channels_first" else 1 + len(spatial)
    expected = (
        f"{owner}(in_channels=12) got input with 5 channels (dim {dim} for layout='{layout}')"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        head(_input(5, spatial, layout))
    assert head(_input(12, spatial, layout)).shape == (2, 3)  # the right count still works


def test_catavgmax_head_reports_channels_not_feature_width():
    head = gp.ClassifierHead(512, 10, pool="catavgmax")  # its Linear takes 1024 features
    message = "ClassifierHead(in_channels=512) got input with 256 channels (dim 1 for layout="
    with pytest.raises(ValueError, match=re.escape(message)):
        head(torch.randn(2, 256, 7, 7))


def test_attention_pool_names_its_channels():
    with pytest.raises(ValueError, match=re.escape("AttentionPool(channels=6) got input with 5")):
        gp.AttentionPool(6)(torch.randn(2, 5, 4))


@pytest.mark.parametrize("name", ["avg", "catavgmax", "gem", "attention", "nin", "fc"])
def test_check_compiles_fullgraph_and_exports(name):
    head = gp.make_head(name, 6, 3, spatial_size=(5, 5), hidden=8, backend="torch").eval()
    x = torch.randn(2, 6, 5, 5)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), head(x))
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(head, (x,), dynamic_shapes=({0: batch},))
    assert exported.module()(torch.randn(4, 6, 5, 5)).shape == (4, 3)


def test_check_compiles_with_dynamic_shapes():
    head = gp.make_head("avg", 6, 3, backend="torch").eval()
    compiled = torch.compile(head, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(2, 6, 5, 5), (3, 6, 4, 7)]:
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), head(x))


def test_compiled_head_still_names_the_channel_counts():
    head = gp.make_head("gem", 6, 3, backend="torch").eval()
    expected = re.escape("ClassifierHead(in_channels=6) got input with 5 channels")
    with pytest.raises(ValueError, match=expected):  # graph break: eager raises it
        torch.compile(head, backend="aot_eager")(torch.randn(2, 5, 4, 4))
    with pytest.raises(Exception, match=expected):  # fullgraph: dynamo reports the same error
        torch.compile(head, fullgraph=True, backend="aot_eager")(torch.randn(2, 5, 4, 4))
