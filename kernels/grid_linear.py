"""CPU projections on quantized weights: a weight that came from a Q4_1 or Q8_0 GGUF is kept in
its 4 or 8 bits, so a decode step reads 0.75 or 1.125 bytes a weight instead of 4, and computes
with the same fp32 values.

**Why it is exact.** GGUF's Q4_1 and Q8_0 cut every weight row into blocks of 32 input features.
Q4_1 stores a block as a scale ``d`` and a minimum ``m`` (both float16) and 32 codes ``q`` of 4
bits, and the weight is ``d * q + m``; Q8_0 as a float16 scale and 32 signed 8-bit codes, the
weight ``d * q``. Loading dequantizes that into fp32 (so do transformers and every other
reader), and the fp32 tensor holds nothing more than the grid: each block takes at most 16 (256)
distinct values. ``find_grid`` recovers ``d``, ``q`` and ``m`` from the fp32 weight and keeps them
only if they give back every weight exactly (``d * q`` is exact in fp32, an 11-bit times a 4- or
8-bit integer, so at most one rounding, the addition of ``m``, makes the value, as in the
loader). Any other weight (a float checkpoint, a block off the grid) keeps the fp32 paths of
``yaie.kernels.linear``. Recovering the grid from the values, rather than passing the GGUF
blocks through the loader, keeps merged projections (QKV, gate/up), tied embeddings and every
loader path alike.

**Why it is faster.** At decode sizes a CPU projection is a weight stream: at one row it reads
4 bytes to do one multiply-add, at 16 rows the multiply-adds are only just enough to hide the
stream. Reading a quarter of the bytes makes one row's projections about 4x faster, and at 16
rows leaves the multiply-adds alone on the critical path. The arithmetic stays fp32: each weight
is rebuilt with one multiply(-add) just before use, which at 16 rows is one extra instruction
per 16 multiply-adds.

**The micro-kernel.** ``out[r, n] = sum_k x[r, k] w[n, k]``. A task owns 16 output features
(one AVX-512 register of fp32, ``LANES``) and a tile of up to 16 rows; it keeps at least
``ACCUMULATORS`` accumulator registers (one per row at 16 rows). Each 16-byte load of codes gives
the weight vectors of the 16 outputs for two input features (Q4_1: feature ``2j`` in the low
nibbles, ``2j + 1`` in the high ones) or one (Q8_0); the scale (and minimum) are loaded as
vectors too, the weights rebuilt, and each row adds ``x[r, k] * w`` into its accumulator with a
broadcast ``x``. numba's vectorizers do not find this (they vectorize over ``k`` and pay a
horizontal sum per accumulator, 15x slower here), so the tile is written as LLVM vector IR
(``_output_tile``); the loop over tiles is ordinary numba. The layout is chosen for it
(``GridWeight``): ``codes[t, j]`` is 16 bytes, lane ``l`` for output ``16 t + l``;
``scales[t, b]`` and ``mins[t, b]`` are 16 fp32 each for block ``b``.

Measured on the default model's shapes (SmolLM2-135M: its 120 layer projections are Q4_1, its
tied embedding and LM head Q8_0; 2-core AMD EPYC, 2 threads; ``yaie bench cpu-kernels``): see
``docs/benchmarks.md`` and guide chapter 11.
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
"""Input features that share one scale (and minimum): the block of GGUF's Q4_1 and Q8_0."""

LANES = 16
"""Output features one task computes at once: one AVX-512 register of fp32."""

GRID_MAX_ROWS = 64
"""Most rows ``yaie.kernels.linear`` sends here; above, oneDNN's fp32 GEMM (measured as a tie
at 64 rows, and prefills are compute-bound, where reading fewer bytes gains nothing)."""

ACCUMULATORS = 8
"""Independent accumulator registers a micro-kernel keeps at least (``_output_tile``)."""

_CHECK_ROWS = 256
"""Rows of a weight checked at a time: their temporaries stay in the caches, and a weight off
the grid is turned down after its first rows."""

_Q4_LEVELS = 15  # the largest 4-bit code
_Q8_LEVELS = 127  # the largest 8-bit code in magnitude
_NO_MINS = np.empty((0, 0, LANES), dtype=np.float32)


@dataclass(frozen=True, slots=True)
class GridWeight:
    """A ``[out, in]`` weight as codes in the micro-kernel's layout (module docstring).

    Q4_1: ``codes`` uint8 ``[out/16, in/2, 16]`` (two features a byte), ``scales`` and ``mins``
    fp32 ``[out/16, in/32, 16]``. Q8_0: ``codes`` int8 ``[out/16, in, 16]``, ``scales`` as above,
    ``mins`` empty. The codes' dtype tells the two apart, here and in the kernel.
    """

    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray

    @property
    def bits(self) -> int:
        return 4 if self.codes.dtype == np.uint8 else 8

    @property
    def shape(self) -> tuple[int, int]:
        tiles, loads, _ = self.codes.shape
        return tiles * LANES, loads * (8 // self.bits)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.mins.nbytes


def _half(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to float16, as fp32."""
    return values.astype(np.float16).astype(np.float32)


def _checked(blocks: np.ndarray, codes: np.ndarray, scale: np.ndarray,
             low: np.ndarray | None) -> bool:
    """Whether ``scale * codes (+ low)`` gives back every value of ``blocks`` exactly."""
    values = scale * codes.astype(np.float32)
    return np.array_equal(values if low is None else values + low, blocks)


def _q4_1_grid(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(q, d, m)`` with ``blocks == d * q + m``, for fp32 ``blocks [..., 32]``, or ``None``.

    ``m`` is the block's smallest value (the weight of code 0) and ``d`` its spread over 15
    rounded to float16, as the quantizer stores it; the codes are the nearest levels.
    """
    low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    with np.errstate(all="ignore"):  # non-finite weights fail the check
        scale = _half((high - low) / np.float32(_Q4_LEVELS))
        codes = np.rint((blocks - low) / np.where(scale > 0, scale, np.float32(1)))
        codes = np.clip(codes, 0, _Q4_LEVELS).astype(np.uint8)
    return (codes, scale, low) if _checked(blocks, codes, scale, low) else None


def _q8_0_grid(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(q, d)`` with ``blocks == d * q``, for fp32 ``blocks [..., 32]``, or ``None``: ``d`` is
    the block's largest magnitude over 127 rounded to float16, as the quantizer stores it."""
    with np.errstate(all="ignore"):  # non-finite weights fail the check
        scale = _half(np.abs(blocks).max(-1, keepdims=True) / np.float32(_Q8_LEVELS))
        codes = np.rint(blocks / np.where(scale > 0, scale, np.float32(1)))
        codes = np.clip(codes, -_Q8_LEVELS - 1, _Q8_LEVELS).astype(np.int8)
    return (codes, scale) if _checked(blocks, codes, scale, None) else None


def _whole_grid(blocks: np.ndarray, grid):
    """``grid`` (``_q4_1_grid`` or ``_q8_0_grid``) over every row of ``blocks [out, n, 32]``,
    ``_CHECK_ROWS`` rows at a time, the parts joined; ``None`` at the first part off the grid."""
    parts = []
    for start in range(0, blocks.shape[0], _CHECK_ROWS):
        found = grid(blocks[start : start + _CHECK_ROWS])
        if found is None:
            return None
        parts.append(found)
    return tuple(np.concatenate(part) for part in zip(*parts))


def _by_lane(values: np.ndarray) -> np.ndarray:
    """``[out, n, ...]`` per output feature -> ``[out/16, n, 16]``, lane ``l`` of tile ``t``
    holding output ``16 t + l``."""
    out = values.shape[0]
    return values.reshape(out // LANES, LANES, -1).transpose(0, 2, 1)


def find_grid(weight: torch.Tensor) -> GridWeight | None:
    """``weight [out, in]`` as a ``GridWeight`` if every block of 32 input features lies on a
    Q4_1 grid, or else every block on a Q8_0 grid (module docstring); otherwise ``None``. CPU
    fp32 weights whose output features are a multiple of 16 only."""
    if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    out_features, in_features = weight.shape
    if out_features % LANES or in_features % BLOCK or out_features == 0:
        return None
    blocks = weight.detach().numpy().reshape(out_features, in_features // BLOCK, BLOCK)
    if (found := _whole_grid(blocks, _q4_1_grid)) is not None:
        codes, scales, mins = found
        codes = _by_lane(codes.reshape(out_features, in_features))
        return GridWeight(
            codes=np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)),
            scales=np.ascontiguousarray(_by_lane(scales)),
            mins=np.ascontiguousarray(_by_lane(mins)),
        )
    if (found := _whole_grid(blocks, _q8_0_grid)) is not None:
        codes, scales = found
        return GridWeight(
            codes=np.ascontiguousarray(_by_lane(codes.reshape(out_features, in_features))),
            scales=np.ascontiguousarray(_by_lane(scales)),
            mins=_NO_MINS,
        )
    return None


def grid_dequantize(weight: GridWeight) -> torch.Tensor:
    """The fp32 ``[out, in]`` weight back from its codes (the reference's weight)."""
    tiles, loads, _ = weight.codes.shape
    if weight.bits == 4:
        codes = np.empty((tiles, loads * 2, LANES), dtype=np.float32)
        codes[:, 0::2] = weight.codes & 15
        codes[:, 1::2] = weight.codes >> 4
    else:
        codes = weight.codes.astype(np.float32)
    features = codes.shape[1]
    values = weight.scales[:, :, None] * codes.reshape(tiles, -1, BLOCK, LANES)
    if weight.bits == 4:
        values += weight.mins[:, :, None]
    by_row = values.reshape(tiles, features, LANES).transpose(0, 2, 1)
    return torch.from_numpy(by_row.reshape(tiles * LANES, features).copy())


def grid_linear_reference(x: torch.Tensor, weight: GridWeight,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` with the dequantized weight, in torch."""
    return F.linear(x, grid_dequantize(weight), bias)


_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_VEC = ir.VectorType(_F32, LANES)
_INT_VEC = ir.VectorType(_I32, LANES)
_BYTE_VEC = ir.VectorType(ir.IntType(8), LANES)


TILE_ROWS = (16, 8, 4, 2, 1)
"""Row counts of the micro-kernel: 16 rows at a time, the rest by 8, 4, 2 and 1."""


@intrinsic
def _output_tile(typingctx, x, codes, scales, mins, out, t):
    """``out[:, 16t:16t+16] = x W[16t:16t+16]^T`` for every row of ``x``, as LLVM vector IR
    (module docstring): the micro-kernel for 16 rows in a loop, then for 8, 4, 2 and 1 where
    the rows left call for it.

    A fused multiply-add waits about four cycles for the sum it adds to, so a tile of few rows
    would stall on its one accumulator per row: each row keeps ``ACCUMULATORS // rows`` of them
    instead, taking turns over the products (the loop body handles several loads of codes), and
    sums them at the end.
    """
    q4_1 = codes.dtype == types.uint8
    per_load = 2 if q4_1 else 1  # input features a 16-byte load of codes covers

    def codegen(context, builder, signature, args):
        x_ary, codes_ary, scales_ary, mins_ary, out_ary = (
            context.make_array(ty)(context, builder, value)
            for ty, value in zip(signature.args[:5], args[:5]))
        x_ty, codes_ty, scales_ty, mins_ty, out_ty = signature.args[:5]
        index = context.get_value_type(types.intp)
        tile_index = builder.sext(args[5], index) if args[5].type != index else args[5]
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC] * 3), "llvm.fmuladd.v16f32")

        def const(value):
            return ir.Constant(index, value)

        def vector_at(ary, ty, vector, *at):
            """A pointer to the 16 values starting at ``ary[at]``."""
            p = cgutils.get_item_pointer(context, builder, ty, ary, list(at))
            return builder.bitcast(p, vector.as_pointer())

        def weights(load):
            """The fp32 weights of the ``per_load`` features of 16 bytes of codes, for the
            tile's 16 outputs: ``d * q + m`` (Q4_1) or ``d * q`` (Q8_0)."""
            block = builder.udiv(load, const(BLOCK // per_load))
            packed = builder.load(vector_at(codes_ary, codes_ty, _BYTE_VEC, tile_index, load,
                                            const(0)), align=1)
            scale = builder.load(vector_at(scales_ary, scales_ty, _VEC, tile_index, block,
                                           const(0)), align=4)
            if not q4_1:
                return [builder.fmul(scale, builder.sitofp(packed, _VEC))]
            packed = builder.zext(packed, _INT_VEC)
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

        def rows_from(first_row, rows):
            """The micro-kernel for rows ``first_row .. first_row + rows - 1``."""
            chains = max(1, ACCUMULATORS // rows)
            unroll = max(1, chains // per_load)
            zero = ir.Constant(_VEC, [0.0] * LANES)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(chains)]
                    for _ in range(rows)]
            row_of = [builder.add(first_row, const(r)) for r in range(rows)]
            steps = builder.udiv(builder.extract_value(codes_ary.shape, 1), const(unroll))
            with cgutils.for_range(builder, steps) as loop:
                for u in range(unroll):
                    load = builder.add(builder.mul(loop.index, const(unroll)), const(u))
                    for part, w in enumerate(weights(load)):
                        feature = builder.add(builder.mul(load, const(per_load)), const(part))
                        for r in range(rows):
                            acc = accs[r][(per_load * u + part) % chains]
                            builder.store(builder.call(fmuladd, [broadcast(row_of[r], feature), w,
                                                                 builder.load(acc)]), acc)
            column = builder.mul(tile_index, const(LANES))
            for r in range(rows):
                total = builder.load(accs[r][0])
                for acc in accs[r][1:]:
                    total = builder.fadd(total, builder.load(acc))
                builder.store(total, vector_at(out_ary, out_ty, _VEC, row_of[r], column), align=4)

        num_rows = builder.extract_value(x_ary.shape, 0)
        widest, *rest = TILE_ROWS
        whole = builder.udiv(num_rows, const(widest))
        with cgutils.for_range(builder, whole) as loop:
            rows_from(builder.mul(loop.index, const(widest)), widest)
        done = builder.mul(whole, const(widest))
        for rows in rest:
            fits = builder.icmp_unsigned(">=", builder.sub(num_rows, done), const(rows))
            with builder.if_then(fits):
                rows_from(done, rows)
            done = builder.select(fits, builder.add(done, const(rows)), done)
        return context.get_dummy_value()

    return types.void(x, codes, scales, mins, out, t), codegen


@numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _grid_kernel(x, codes, scales, mins, out):
    """``out = x W^T``: each task one tile of 16 output features, for every row."""
    for t in numba.prange(codes.shape[0]):
        _output_tile(x, codes, scales, mins, out, t)


def grid_linear(x: torch.Tensor, weight: GridWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [T, in] W^T + b`` for float32 rows on the CPU, ``W`` as codes on its grid."""
    x = x if x.is_contiguous() else x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    run_parallel(_grid_kernel, x.numpy(), weight.codes, weight.scales, weight.mins, out.numpy())
    return out if bias is None else out.add_(bias)
