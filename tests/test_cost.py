"""The cost model (`alloc.cost`) gives exactly the bits the packer stores, for every grid setting."""

import itertools

import pytest
import torch

from flexquant.alloc.cost import Layout, fixed_bits, linear_bits, result_bits
from flexquant.config import GridConfig
from flexquant.nn import QuantLinear
from flexquant.quant import rtn_quantize
from flexquant.transforms.rotate import Rotation

GRIDS = [dict(sym=s, scale_bits=sb, zero_bits=zb, group_size=g)
         for s, sb, zb, g in itertools.product((False, True), (16, 8), (8, 4), (24, 32, 64))]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
@pytest.mark.parametrize("bits", [(2, 3, 4), (2, 4, 16), (8, 3, 16)])
def test_planned_bits_equal_stored_bits(grid, bits):
    if grid["zero_bits"] == 4 and max(b for b in bits if b < 16) > 4:
        pytest.skip("4-bit zero points hold at most 4-bit groups")
    g = grid["group_size"]
    m, n = 40, 6 * g
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(g))
    group_bits = torch.tensor([bits[i % 3] for i in range(n // g)], dtype=torch.uint8)
    r = rtn_quantize(W, GridConfig(bits=4, **grid), group_bits)
    for perm, rotation in ((None, None), (torch.randperm(n), None), (torch.randperm(n), Rotation.random(n, 0))):
        r.perm = perm
        q = QuantLinear.from_result(r, rotation=rotation)
        assert result_bits(r, rotation) == q.stored_bits()
        layout = Layout(m, n, g, grid["sym"], grid["scale_bits"], grid["zero_bits"], perm is not None,
                        rotation is not None)
        assert linear_bits(layout, group_bits.tolist()) == q.stored_bits()


def test_a_stored_rotation_factor_is_counted():
    """n = 43·2^k has no Hadamard factor: its orthogonal 43×43 factor is stored in float32 and paid for."""
    n = 43 * 8
    R = Rotation.random(n, 0)
    assert not bool((R.factor.abs() == 1).all())
    r = rtn_quantize(torch.randn(8, n), GridConfig(bits=4, group_size=8))
    q = QuantLinear.from_result(r, rotation=R)
    assert result_bits(r, R) == q.stored_bits()
    assert result_bits(r, R) - result_bits(r) == 352 + 32 * 43 * 43  # signs in 11 int32 words + the factor


def test_fixed_bits_do_not_depend_on_the_widths():
    layout = Layout(16, 128, 32, False, 8, 4, True, True)
    assert linear_bits(layout, [2, 2, 2, 2]) - linear_bits(layout, [3, 2, 2, 2]) == -16 * 32
    assert fixed_bits(layout) == linear_bits(layout, [1, 1, 1, 1]) - 16 * 128
