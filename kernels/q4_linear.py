"""CPU projections on 4-bit weights: a weight that came from a Q4_1 GGUF is kept in 4 bits,
so a decode step reads 0.75 bytes a weight instead of 4, and computes with the same fp32 values.

**Why it is exact.** GGUF's Q4_1 cuts every weight row into blocks of 32 input features and
stores each block as a scale ``d`` and a minimum ``m`` (both float16) and 32 codes ``q`` of 4
bits; the weight is ``d * q + m``. Loading dequantizes that into fp32 (so do transformers and
every other reader), and the fp32 tensor holds nothing more than the grid: each block takes at
most 16 distinct values. ``find_q4_grid`` recovers ``d``, ``m`` and ``q`` from the fp32 weight
and keeps them only if ``d * q + m`` gives back every weight exactly (``d * q`` is exact in
fp32, an 11-bit times a 4-bit integer, so one rounding, the addition, makes the value, as in
the loader). Any other weight (a float checkpoint, a block off the grid) keeps the fp32 paths
of ``yaie.kernels.linear``. Recovering the grid from the values, rather than passing the GGUF
blocks through the loader, keeps merged projections (QKV, gate/up) and every loader path alike.

**Why it is faster.** At decode sizes a CPU projection is a weight stream: at one row it reads
4 bytes to do one multiply-add, at 16 rows the multiply-adds are only just enough to hide the
stream. Reading 0.75 bytes instead (4 bits, plus an fp32 scale and minimum per 32) makes one
row's projections about 4x faster, and at 16 rows leaves the multiply-adds alone on the
critical path. The arithmetic stays fp32: each weight is rebuilt with one fused multiply-add
just before use, which at 16 rows is one extra instruction per 16 multiply-adds.

**The micro-kernel.** ``out[r, n] = sum_k x[r, k] w[n, k]``. A task owns 16 output features
(one AVX-512 register of fp32, ``LANES``) and a tile of up to 16 rows; it keeps one accumulator
register per row. For each pair of input features it loads 16 bytes of codes (the two features'
codes for the 16 outputs), rebuilds the two weight vectors (``d * q + m``, the scale and minimum
loaded as vectors for the 16 outputs), and adds ``x[r, k] * w`` into each row's accumulator: 2
vectors of weights, then 32 fused multiply-adds with a broadcast ``x``. numba's vectorizers do
not find this (they vectorize over ``k`` and pay a horizontal sum per accumulator, 15x slower
here), so the tile is written as LLVM vector IR (``_tile``); the loop over tiles is ordinary
numba. The layout is chosen for it (``Q4Weight``): for output tile ``t`` and feature pair
``j``, ``codes[t, j]`` is 16 bytes holding feature ``2j`` in the low nibble and ``2j + 1`` in
the high one, lane ``l`` for output ``16 t + l``; ``scales[t, b]`` and ``mins[t, b]`` are 16
fp32 each for block ``b``.

Measured on the default model's shapes (SmolLM2-135M, the 120 projections of the 30 layers,
each a distinct weight so every step streams them from memory; 2-core AMD EPYC, 2 threads;
``yaie bench cpu-kernels``): see ``docs/benchmarks.md`` and guide chapter 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from yaie.kernels.cpu import run_parallel

BLOCK = 32
"""Input features that share one scale and one minimum (GGUF's Q4_1 block)."""

LANES = 16
"""Output features one task computes at once: one AVX-512 register of fp32."""

LEVELS = 15
"""The largest 4-bit code."""

Q4_MAX_ROWS = 64
"""Most rows ``yaie.kernels.linear`` sends here; above, oneDNN's fp32 GEMM (measured as a tie
at 64 rows, and prefills are compute-bound, where reading fewer bytes gains nothing)."""

ACCUMULATORS = 8
"""Independent accumulator registers a micro-kernel keeps at least (``_tile``)."""

_PROBE_ROWS = LANES
"""Rows checked first, so that a weight off the grid is turned down after a glance."""


@dataclass(frozen=True, slots=True)
class Q4Weight:
    """A ``[out, in]`` weight as 4-bit codes in the micro-kernel's layout (module docstring):
    ``codes`` uint8 ``[out/16, in/2, 16]``, ``scales`` and ``mins`` fp32 ``[out/16, in/32, 16]``."""

    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        tiles, pairs, _ = self.codes.shape
        return tiles * LANES, pairs * 2


def _grid(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(q, d, m)`` with ``blocks == d * q + m`` exactly, for fp32 ``blocks [..., 32]``, or
    ``None``.

    ``m`` is the block's smallest value (the weight of code 0) and ``d`` its spread over 15
    rounded to float16, as GGUF's quantizer stores it; the codes are then the nearest levels,
    and the check is on every value.
    """
    low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    with np.errstate(all="ignore"):
        scale = ((high - low) / np.float32(LEVELS)).astype(np.float16).astype(np.float32)
        codes = np.rint((blocks - low) / np.where(scale > 0, scale, np.float32(1)))
    codes = np.clip(np.nan_to_num(codes), 0, LEVELS).astype(np.uint8)
    if not np.array_equal(scale * codes.astype(np.float32) + low, blocks):
        return None
    return codes, scale[..., 0], low[..., 0]


def find_q4_grid(weight: torch.Tensor) -> Q4Weight | None:
    """``weight [out, in]`` as a ``Q4Weight`` if every block of 32 input features lies on a
    4-bit grid (module docstring), else ``None``. CPU fp32 weights whose output features are
    a multiple of 16 only."""
    if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    out_features, in_features = weight.shape
    if out_features % LANES or in_features % BLOCK or out_features == 0:
        return None
    blocks = weight.detach().numpy().reshape(out_features, in_features // BLOCK, BLOCK)
    if _grid(blocks[:_PROBE_ROWS]) is None:
        return None
    found = _grid(blocks)
    if found is None:
        return None
    codes, scales, mins = found
    tiles = out_features // LANES
    by_lane = codes.reshape(tiles, LANES, in_features).transpose(0, 2, 1)  # [tile, k, lane]
    return Q4Weight(
        codes=np.ascontiguousarray(by_lane[:, 0::2] | (by_lane[:, 1::2] << 4)),
        scales=np.ascontiguousarray(scales.reshape(tiles, LANES, -1).transpose(0, 2, 1)),
        mins=np.ascontiguousarray(mins.reshape(tiles, LANES, -1).transpose(0, 2, 1)),
    )


def q4_1_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """The fp32 values a Q4_1 GGUF of ``weight [out, in]`` loads as: llama.cpp's quantizer
    (float16 scale and minimum per 32 input features, codes rounded from the float32 minimum),
    then the readers' ``d * q + m``. For tests and benchmarks without a GGUF at hand."""
    blocks = weight.detach().float().numpy().reshape(weight.shape[0], -1, BLOCK)
    low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    spread = (high - low) / np.float32(LEVELS)
    inverse = np.where(spread > 0, 1 / np.where(spread > 0, spread, 1), 0).astype(np.float32)
    codes = np.minimum(LEVELS, ((blocks - low) * inverse + np.float32(0.5)).astype(np.int8))
    scale = spread.astype(np.float16).astype(np.float32)
    values = scale * codes.astype(np.float32) + low.astype(np.float16).astype(np.float32)
    return torch.from_numpy(values.reshape(weight.shape))


def q4_dequantize(weight: Q4Weight) -> torch.Tensor:
    """The fp32 ``[out, in]`` weight back from its codes (the reference's weight)."""
    tiles, pairs, _ = weight.codes.shape
    codes = np.empty((tiles, pairs * 2, LANES), dtype=np.float32)
    codes[:, 0::2] = weight.codes & 15
    codes[:, 1::2] = weight.codes >> 4
    by_block = codes.reshape(tiles, -1, BLOCK, LANES)
    values = weight.scales[:, :, None] * by_block + weight.mins[:, :, None]
    return torch.from_numpy(values.reshape(tiles, pairs * 2, LANES).transpose(0, 2, 1).reshape(
        tiles * LANES, pairs * 2).copy())


def q4_linear_reference(x: torch.Tensor, weight: Q4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` with the dequantized weight, in torch."""
    return F.linear(x, q4_dequantize(weight), bias)


_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_VEC = ir.VectorType(_F32, LANES)
_INT_VEC = ir.VectorType(_I32, LANES)
_BYTE_VEC = ir.VectorType(ir.IntType(8), LANES)


def _tile(rows: int):
    """The micro-kernel for ``rows`` rows, as a numba intrinsic emitting LLVM vector IR:
    ``out[r0:r0+rows, 16t:16t+16] = x[r0:r0+rows] W[16t:16t+16]^T`` (module docstring).

    A fused multiply-add waits about four cycles for the sum it adds to, so a tile of few rows
    would stall on its one accumulator per row: each row keeps ``ACCUMULATORS // rows`` of them
    instead, taking turns over the products (the loop body handles several feature pairs), and
    sums them at the end.
    """
    chains = max(1, ACCUMULATORS // rows)
    unroll = max(1, chains // 2)  # feature pairs per loop iteration: two products each

    @intrinsic
    def tile(typingctx, x, codes, scales, mins, out, t, r0):
        def codegen(context, builder, signature, args):
            x_ary, codes_ary, scales_ary, mins_ary, out_ary = (
                context.make_array(ty)(context, builder, value)
                for ty, value in zip(signature.args[:5], args[:5]))
            x_ty, codes_ty, scales_ty, mins_ty, out_ty = signature.args[:5]
            index = context.get_value_type(types.intp)
            tile_index, first_row = (builder.sext(a, index) if a.type != index else a
                                     for a in args[5:])
            fmuladd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_VEC, [_VEC] * 3), "llvm.fmuladd.v16f32")

            def const(value):
                return ir.Constant(index, value)

            def vector_at(ary, ty, vector, *at):
                """A pointer to the 16 values starting at ``ary[at]``."""
                p = cgutils.get_item_pointer(context, builder, ty, ary, list(at))
                return builder.bitcast(p, vector.as_pointer())

            def weights(pair):
                """The fp32 weights of features ``2 pair`` and ``2 pair + 1`` for the tile's 16
                outputs: ``d * q + m``, from 16 bytes of codes."""
                block = builder.udiv(pair, const(BLOCK // 2))
                packed = builder.load(vector_at(codes_ary, codes_ty, _BYTE_VEC, tile_index, pair,
                                                const(0)), align=1)
                packed = builder.zext(packed, _INT_VEC)
                scale = builder.load(vector_at(scales_ary, scales_ty, _VEC, tile_index, block,
                                               const(0)), align=4)
                low = builder.load(vector_at(mins_ary, mins_ty, _VEC, tile_index, block, const(0)),
                                   align=4)
                return [builder.call(fmuladd, [scale, builder.uitofp(code, _VEC), low])
                        for code in (builder.and_(packed, ir.Constant(_INT_VEC, [15] * LANES)),
                                     builder.lshr(packed, ir.Constant(_INT_VEC, [4] * LANES)))]

            def broadcast(row, feature):
                value = builder.load(cgutils.get_item_pointer(context, builder, x_ty, x_ary,
                                                              [row, feature]))
                one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), value,
                                             ir.Constant(_I32, 0))
                return builder.shuffle_vector(one, ir.Constant(_VEC, ir.Undefined),
                                              ir.Constant(_INT_VEC, [0] * LANES))

            zero = ir.Constant(_VEC, [0.0] * LANES)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(chains)]
                    for _ in range(rows)]
            row_of = [builder.add(first_row, const(r)) for r in range(rows)]
            steps = builder.udiv(builder.extract_value(codes_ary.shape, 1), const(unroll))
            with cgutils.for_range(builder, steps) as loop:
                for u in range(unroll):
                    pair = builder.add(builder.mul(loop.index, const(unroll)), const(u))
                    for half, w in enumerate(weights(pair)):
                        feature = builder.add(builder.shl(pair, const(1)), const(half))
                        for r in range(rows):
                            acc = accs[r][(2 * u + half) % chains]
                            builder.store(builder.call(fmuladd, [broadcast(row_of[r], feature), w,
                                                                 builder.load(acc)]), acc)
            column = builder.mul(tile_index, const(LANES))
            for r in range(rows):
                total = builder.load(accs[r][0])
                for acc in accs[r][1:]:
                    total = builder.fadd(total, builder.load(acc))
                builder.store(total, vector_at(out_ary, out_ty, _VEC, row_of[r], column), align=4)
            return context.get_dummy_value()

        return types.void(x, codes, scales, mins, out, t, r0), codegen

    return tile


_tile16, _tile8, _tile4, _tile2, _tile1 = (_tile(rows) for rows in (16, 8, 4, 2, 1))


@numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _q4_kernel(x, codes, scales, mins, out):
    """``out = x W^T``: each task one tile of 16 output features for all rows, 16 rows at a
    time, the rest in tiles of 8, 4, 2 and 1."""
    num_rows = x.shape[0]
    for t in numba.prange(codes.shape[0]):
        r = 0
        while num_rows - r >= 16:
            _tile16(x, codes, scales, mins, out, t, r)
            r += 16
        if num_rows - r >= 8:
            _tile8(x, codes, scales, mins, out, t, r)
            r += 8
        if num_rows - r >= 4:
            _tile4(x, codes, scales, mins, out, t, r)
            r += 4
        if num_rows - r >= 2:
            _tile2(x, codes, scales, mins, out, t, r)
            r += 2
        if num_rows - r >= 1:
            _tile1(x, codes, scales, mins, out, t, r)


def q4_linear(x: torch.Tensor, weight: Q4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [T, in] W^T + b`` for float32 rows on the CPU, ``W`` as 4-bit codes."""
    x = x if x.is_contiguous() else x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    run_parallel(_q4_kernel, x.numpy(), weight.codes, weight.scales, weight.mins, out.numpy())
    return out if bias is None else out.add_(bias)
