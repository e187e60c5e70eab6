"""The registry of kinds: bad registrations get clear errors, KINDS is a live view, and each kernel
family's own table of kinds is exactly what the registry declares."""

from __future__ import annotations

import pytest
import torch

import globalpool as gp
from globalpool import reference_defs, registry
from globalpool.kernels import cpu_numba, cpu_packed, cuda_triton
from globalpool.registry import Param, kinds, spec


def mean_pool(x, mask):
    if mask is not None:
        return torch.where(mask, x, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    return x.mean(-1)


@pytest.fixture
def clean():
    """Unregister whatever the test registered; check the registry is as it was."""
    before = kinds()
    yield
    for name in set(kinds()) - set(before):
        gp.unregister_kind(name)
    assert kinds() == before


def test_register_and_unregister(clean):
    entry = gp.register_kind("mean2", mean_pool, summary="mean")
    assert isinstance(entry, gp.KindSpec) and spec("mean2") is entry
    assert not entry.builtin and entry.kernels == frozenset() and entry.width == 1
    torch.testing.assert_close(gp.pool(torch.ones(2, 3, 4), "mean2"), torch.ones(2, 3))
    gp.unregister_kind("mean2")
    assert "mean2" not in gp.KINDS
    with pytest.raises(ValueError, match="kind must be one of"):
        gp.unregister_kind("mean2")


def test_duplicate_name(clean):
    gp.register_kind("mean2", mean_pool)
    with pytest.raises(ValueError, match="'mean2' is already registered"):
        gp.register_kind("mean2", mean_pool)
    gp.register_kind("mean2", mean_pool, replace=True, summary="again")
    assert spec("mean2").summary == "again"


@pytest.mark.parametrize("name", ("avg", "gem", "last"))
def test_builtin_name_refused(name, clean):
    with pytest.raises(ValueError, match=f"'{name}' is a built-in kind"):
        gp.register_kind(name, mean_pool)
    with pytest.raises(ValueError, match=f"'{name}' is a built-in kind"):
        gp.register_kind(name, mean_pool, replace=True)
    assert spec(name).builtin


@pytest.mark.parametrize("name", ("avg", "attention"))
def test_unregister_builtin_refused(name):
    with pytest.raises(ValueError, match="built-in kind and cannot be unregistered"):
        gp.unregister_kind(name)
    assert name in gp.KINDS


def test_missing_composition(clean):
    with pytest.raises(TypeError, match="compose"):
        gp.register_kind("mean2")  # type: ignore[call-arg]


@pytest.mark.parametrize("compose", (None, "avg", 3))
def test_non_callable_composition(compose, clean):
    with pytest.raises(TypeError, match=r"compose for kind 'mean2' must be a callable"):
        gp.register_kind("mean2", compose)


@pytest.mark.parametrize("name", ("", "two words", "1st", 3, None))
def test_bad_name(name, clean):
    with pytest.raises(ValueError, match="name must be a Python identifier"):
        gp.register_kind(name, mean_pool)


@pytest.mark.parametrize("width", (0, -1, 1.5, 2.0, True, "2", None))
def test_bad_width(width, clean):
    with pytest.raises(ValueError, match="width for kind 'mean2' must be a positive int"):
        gp.register_kind("mean2", mean_pool, width=width)


@pytest.mark.parametrize("pname", ("mask", "layout", "kind", "backend", "keepdim", "x"))
def test_parameter_name_colliding_with_a_pool_argument(pname, clean):
    with pytest.raises(ValueError, match=f"parameter name '{pname}' of kind 'mean2' collides"):
        gp.register_kind("mean2", mean_pool, params=(Param(pname, 1.0),))
    with pytest.raises(ValueError, match="collides"):
        gp.register_kind("mean2", mean_pool, params={pname: 1.0})


@pytest.mark.parametrize("name", ("p", "eps", "r", "weights", "mask", "layout"))
def test_kind_name_equal_to_a_parameter_name(name, clean):
    with pytest.raises(ValueError, match=f"name '{name}' collides with a parameter"):
        gp.register_kind(name, mean_pool)


def test_duplicate_parameter(clean):
    with pytest.raises(ValueError, match="parameter 't' of kind 'mean2' is given twice"):
        gp.register_kind("mean2", mean_pool, params=(Param("t", 1.0), Param("t", 2.0)))


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (Param("t", 0.0, minimum=0.0, inclusive=False), "> 0"),
        (Param("t", -1.0, minimum=0.0), ">= 0"),
        (Param("t", 0.5, minimum=1.0), ">= 1"),
    ],
)
def test_default_outside_its_range(param, expected, clean):
    with pytest.raises(ValueError, match=f"default of parameter 't' of kind 'mean2' must be "
                                         f"{expected}"):
        gp.register_kind("mean2", mean_pool, params=(param,))


@pytest.mark.parametrize("default", (float("nan"), float("inf"), "1", True))
def test_default_not_a_finite_number(default, clean):
    with pytest.raises(ValueError, match="must be a finite number or None"):
        gp.register_kind("mean2", mean_pool, params=(Param("t", default),))


def test_params_of_the_wrong_type(clean):
    with pytest.raises(TypeError, match="params for kind 'mean2' must be"):
        gp.register_kind("mean2", mean_pool, params="t")
    with pytest.raises(TypeError, match="must be Param objects"):
        gp.register_kind("mean2", mean_pool, params=("t",))


def test_two_per_position_parameters(clean):
    with pytest.raises(ValueError, match="at most one per-position parameter"):
        gp.register_kind("mean2", mean_pool, params=(Param("a", per_position=True),
                                                     Param("b", per_position=True)))


@pytest.mark.parametrize("arg", ("reference", "reference_grad", "keras"))
def test_non_callable_reference(arg, clean):
    with pytest.raises(TypeError, match=f"{arg} for kind 'mean2' must be callable or None"):
        gp.register_kind("mean2", mean_pool, **{arg: 1.0})


def test_unknown_kernel_family(clean):
    with pytest.raises(ValueError, match=r"kernels for kind 'mean2' must be among \['cpu', "):
        gp.register_kind("mean2", mean_pool, kernels=("gpu",))


@pytest.mark.parametrize("family", sorted(registry.KERNEL_FAMILIES))
def test_kernels_on_a_user_kind(family, clean):
    with pytest.raises(ValueError, match="only globalpool's own kinds have fused kernels"):
        gp.register_kind("mean2", mean_pool, kernels=(family,))


def test_kinds_is_a_live_view(clean):
    before = tuple(gp.KINDS)
    assert "mean2" not in gp.KINDS
    gp.register_kind("mean2", mean_pool)
    assert "mean2" in gp.KINDS and gp.KINDS[-1] == "mean2" and len(gp.KINDS) == len(before) + 1
    assert (*before, "mean2") == gp.KINDS and kinds() == (*before, "mean2")
    assert list(gp.KINDS) == [*before, "mean2"]
    gp.unregister_kind("mean2")
    assert "mean2" not in gp.KINDS and before == gp.KINDS


def test_builtin_kinds_come_first():
    builtins = [k for k in kinds() if spec(k).builtin]
    assert list(kinds()[: len(builtins)]) == builtins
    assert set(builtins) >= {"avg", "max", "gem", "lse", "attention", "first", "last"}


# --------------------------------------------------------------------------------------------
# each kernel family's own kinds equal the registry's declaration

FAMILY_TABLES = {
    # the grid kernels: the max-family modes, the sum-family modes and lse's own kernel
    "cpu": lambda: {*cpu_numba._MAX_MODE, *cpu_numba._SUM_MODE, "lse"},
    "packed": lambda: set(cpu_packed.MODES),
    "cuda": lambda: set(cuda_triton.KIND_CODES),
}


@pytest.mark.parametrize("family", sorted(registry.KERNEL_FAMILIES))
def test_kernel_table_matches_the_registry(family):
    assert set(FAMILY_TABLES) == set(registry.KERNEL_FAMILIES)
    declared = {k for k in kinds() if family in spec(k).kernels}
    assert declared == FAMILY_TABLES[family]()


def test_cpu_max_kinds_match_the_registry():
    declared = {k for k in kinds() if "cpu" in spec(k).kernels and k in cpu_numba._MAX_MODE}
    assert declared == cpu_numba.MAX_KINDS


def test_reference_defines_every_builtin_kind():
    builtins = {k for k in kinds() if spec(k).builtin}
    assert builtins == set(reference_defs.FORWARD) == set(reference_defs.GRAD)
    for k in builtins:
        assert spec(k).reference is reference_defs.FORWARD[k]
        assert spec(k).reference_grad is reference_defs.GRAD[k]
