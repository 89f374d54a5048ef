"""``yaie.kernels.grid_linear``: weights on a Q4_1 or Q8_0 grid found exactly, and the
micro-kernel against the fp32 product."""

from __future__ import annotations

import sys

import pytest
import torch
from kernel_helpers import check, gguf_round_trip

from yaie.kernels.cpu import run_parallel
from yaie.kernels.grid_linear import (
    GRID_MAX_ROWS,
    _grid_kernel,
    find_grid,
    grid_dequantize,
    grid_linear,
    grid_linear_reference,
)
from yaie.kernels.linear import linear, pack_weight

BITS = {"Q4_1": 4, "Q8_0": 8}


def grid_weight(out_features: int, in_features: int, kind: str = "Q4_1",
                seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return gguf_round_trip(torch.randn(out_features, in_features) * 0.05, kind)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("shape", [(16, 32), (48, 96), (160, 576)])
def test_grid_found_and_given_back_exactly(kind, shape) -> None:
    weight = grid_weight(*shape, kind=kind)
    grid = find_grid(weight)
    assert grid is not None and grid.shape == shape and grid.bits == BITS[kind]
    assert torch.equal(grid_dequantize(grid), weight)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_constant_and_zero_blocks_are_on_the_grid(kind) -> None:
    """A block of one value (Q4_1: scale 0, every code 0) or of zeros (Q8_0)."""
    weight = grid_weight(32, 64, kind=kind)
    weight[3] = 0.0
    if kind == "Q4_1":
        weight[7, :32] = -1.5
    grid = find_grid(weight)
    assert grid is not None and grid.bits == BITS[kind]
    assert torch.equal(grid_dequantize(grid), weight)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_weights_off_the_grid_are_refused(kind) -> None:
    assert find_grid(torch.randn(64, 64)) is None
    for row in (0, 300):  # in the first rows checked, and in a later part
        weight = grid_weight(320, 64, kind=kind)
        weight[row, 5] = torch.nextafter(weight[row, 5], torch.tensor(1.0))
        assert find_grid(weight) is None, row


@pytest.mark.parametrize(
    "weight",
    [grid_weight(24, 64), grid_weight(32, 96)[:, :48], grid_weight(32, 64).bfloat16()],
    ids=["out-not-16", "in-not-32", "bf16"],
)
def test_unsupported_shapes_and_dtypes_are_refused(weight) -> None:
    assert find_grid(weight) is None


def test_a_strided_view_is_read_as_its_values() -> None:
    weight = grid_weight(32, 128)[:, 32:96]
    grid = find_grid(weight)
    assert grid is not None and torch.equal(grid_dequantize(grid), weight)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 15, 16, 17, 40])
@pytest.mark.parametrize("shape", [(48, 64), (192, 576)])
def test_kernel_writes_every_output_and_matches_the_product(kind, rows, shape) -> None:
    weight = grid_weight(*shape, kind=kind, seed=rows)
    grid = find_grid(weight)
    x = torch.randn(rows, shape[1])
    out = torch.full((rows, shape[0]), float("nan"))
    run_parallel(_grid_kernel, x.numpy(), grid.codes, grid.scales, grid.mins, out.numpy())
    expected = x.double() @ weight.double().T
    check(out, expected, torch.float32)
    check(grid_linear_reference(x, grid, None), expected, torch.float32)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_bias_and_non_contiguous_rows(kind) -> None:
    weight, bias = grid_weight(64, 128, kind=kind), torch.randn(64)
    grid = find_grid(weight)
    x = torch.randn(128, 5).T  # a transposed view
    check(grid_linear(x, grid, bias), x.double() @ weight.double().T + bias.double(), torch.float32)


@pytest.mark.parametrize("rows", [1, GRID_MAX_ROWS, GRID_MAX_ROWS + 1])
def test_linear_takes_the_grid_of_a_packed_weight(rows, monkeypatch) -> None:
    """``pack_weight`` keeps the grid, and ``linear`` uses it up to ``GRID_MAX_ROWS`` rows."""
    linear_module = sys.modules["yaie.kernels.linear"]
    taken = []
    monkeypatch.setattr(linear_module, "grid_linear", lambda *a: taken.append(1) or grid_linear(*a))
    weight = grid_weight(96, 192)
    packed = pack_weight(weight)
    assert packed is not None and packed.grid is not None
    x = torch.randn(rows, 192)
    check(linear(x, weight, None, packed), x.double() @ weight.double().T, torch.float32)
    assert taken == ([1] if rows <= GRID_MAX_ROWS else [])
