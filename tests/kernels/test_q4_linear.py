"""``yaie.kernels.q4_linear``: weights on a Q4_1 grid found exactly, and the 4-bit micro-kernel
against the fp32 product."""

from __future__ import annotations

import sys

import pytest
import torch

from kernel_helpers import check
from yaie.kernels.cpu import run_parallel
from yaie.kernels.linear import linear, pack_weight
from yaie.kernels.q4_linear import (
    Q4_MAX_ROWS,
    _q4_kernel,
    find_q4_grid,
    q4_1_round_trip,
    q4_dequantize,
    q4_linear,
    q4_linear_reference,
)


def grid_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return q4_1_round_trip(torch.randn(out_features, in_features) * 0.05)


@pytest.mark.parametrize("shape", [(16, 32), (48, 96), (160, 576)])
def test_grid_found_and_given_back_exactly(shape) -> None:
    weight = grid_weight(*shape)
    q4 = find_q4_grid(weight)
    assert q4 is not None and q4.shape == shape
    assert torch.equal(q4_dequantize(q4), weight)


def test_constant_blocks_are_on_the_grid() -> None:
    """A block of one value has scale 0: every code is 0 and the value is the minimum."""
    weight = grid_weight(32, 64)
    weight[3] = 0.25
    weight[7, :32] = -1.5
    q4 = find_q4_grid(weight)
    assert q4 is not None
    assert torch.equal(q4_dequantize(q4), weight)


def test_weights_off_the_grid_are_refused() -> None:
    assert find_q4_grid(torch.randn(64, 64)) is None
    for row in (0, 40):  # inside the rows probed first, and past them (the full check)
        weight = grid_weight(64, 64)
        weight[row, 5] = torch.nextafter(weight[row, 5], torch.tensor(1.0))
        assert find_q4_grid(weight) is None, row


@pytest.mark.parametrize(
    "weight",
    [grid_weight(24, 64), grid_weight(32, 96)[:, :48], grid_weight(32, 64).bfloat16()],
    ids=["out-not-16", "in-not-32", "bf16"],
)
def test_unsupported_shapes_and_dtypes_are_refused(weight) -> None:
    assert find_q4_grid(weight) is None


def test_a_strided_view_is_read_as_its_values() -> None:
    weight = grid_weight(32, 128)[:, 32:96]
    q4 = find_q4_grid(weight)
    assert q4 is not None and torch.equal(q4_dequantize(q4), weight)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 15, 16, 17, 40])
@pytest.mark.parametrize("shape", [(48, 64), (192, 576)])
def test_kernel_writes_every_output_and_matches_the_product(rows, shape) -> None:
    weight = grid_weight(*shape, seed=rows)
    q4 = find_q4_grid(weight)
    x = torch.randn(rows, shape[1])
    out = torch.full((rows, shape[0]), float("nan"))
    run_parallel(_q4_kernel, x.numpy(), q4.codes, q4.scales, q4.mins, out.numpy())
    expected = x.double() @ weight.double().T
    check(out, expected, torch.float32)
    check(q4_linear_reference(x, q4, None), expected, torch.float32)


def test_bias_and_non_contiguous_rows() -> None:
    weight, bias = grid_weight(64, 128), torch.randn(64)
    q4 = find_q4_grid(weight)
    x = torch.randn(128, 5).T  # a transposed view
    check(q4_linear(x, q4, bias), x.double() @ weight.double().T + bias.double(), torch.float32)


@pytest.mark.parametrize("rows", [1, Q4_MAX_ROWS, Q4_MAX_ROWS + 1])
def test_linear_takes_the_4_bit_form_of_a_packed_grid_weight(rows, monkeypatch) -> None:
    """``pack_weight`` keeps the 4-bit form, and ``linear`` uses it up to ``Q4_MAX_ROWS``."""
    linear_module = sys.modules["yaie.kernels.linear"]
    taken = []
    monkeypatch.setattr(linear_module, "q4_linear", lambda *a: taken.append(1) or q4_linear(*a))
    weight = grid_weight(96, 192)
    packed = pack_weight(weight)
    assert packed is not None and packed.q4 is not None
    x = torch.randn(rows, 192)
    check(linear(x, weight, None, packed), x.double() @ weight.double().T, torch.float32)
    assert taken == ([1] if rows <= Q4_MAX_ROWS else [])
