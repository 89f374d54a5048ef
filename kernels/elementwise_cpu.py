"""A decode step's elementwise ops on the CPU as numba kernels: RMSNorm (alone and fused with
the residual add), rotary embedding, rotary + K/V write (``rotary_write_kv``), SiLU-and-mul;
and ``exp``, the vectorizable exponential they and the CPU decode attention share.

At decode sizes these ops touch a few tens of KB, and on the torch path each is a chain of
small ops: RMSNorm casts, squares, averages, adds, takes ``rsqrt`` and multiplies twice;
``rotary_write_kv`` gathers the cos/sin rows, rolls, multiplies and adds, checks the slots for
padding and scatters K and V with ``index_copy_``; SiLU-and-mul allocates the SiLU of the gate,
then multiplies. Each torch op costs microseconds of dispatch whatever its size, and that, not
arithmetic, is what these calls cost. Each kernel here does the same arithmetic in one pass
over its operands. RMSNorm and the rotary kernels run on the calling thread: at decode sizes a
parallel launch costs more than their work, and at prefill sizes (512 rows) one thread still
beats torch's two. SiLU-and-mul is heavier per value (an ``exp`` and a division) and spreads
its rows over the threads (``run_parallel``).

Measured per call at SmolLM2-135M shapes (hidden 576, MLP 1536, 9 query / 3 KV heads of 64,
fp32, 2-core AMD EPYC, warm caches; ``yaie bench cpu-kernels``, and the same calls at 512 rows),
numba against the torch reference: RMSNorm 1 row 5.0 against 13.7 us, 16 rows 6.0 against 16.7
us, 512 rows 46 against 73 us; fused add + RMSNorm 16 rows 7.4 against 18.4 us, 512 rows 70
against 91 us; ``rotary_write_kv`` 16 rows 12.6 against 43.7 us (with Qwen3's q/k norm 22.0
against 93.0 us), 512 rows 160 against 236 us; SiLU-and-mul 16 rows 13.8 against 17.9 us, 512
rows 229 against 231 us, 1 row 7.6 against 5.8 us (the parallel launch). Inside the model they
gain more than these warm figures say (cold operands, torch's temporaries): generating 128
tokens for 16 prompts, the batch-16 workload of ``yaie bench latency``, ran at 314.1-317.3 tok/s
with these kernels and the CPU decode attention of ``yaie.kernels.decode_attention_cpu`` against
276.0-276.6 with the torch references and the previous attention kernel (medians of two runs of
10 alternated rounds in one process, same greedy tokens). In a separate run (5 alternated
rounds), swapping torch's SiLU-and-mul for this one alone took the same workload from 311.7 to
326.6 tok/s, and one request's decode from 52.3 to 54.0 tok/s: the parallel launch's cost does
not show there.

Kernels take numpy views of the tensors (no copies) and, like the CUDA kernels, trust their
indices: positions must lie in the cos/sin table and slots in the cache (numba does not check
bounds; the engine guarantees both). ``fastmath`` lets LLVM vectorize sums and reorder
arithmetic, and ``exp`` is a polynomial, so results differ from the references by float32
rounding; the torch references stay what the tests compare against, and the path for other
dtypes (numba has no bfloat16) and devices.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

from yaie.kernels.cpu import run_parallel

_NO_ROWS = np.empty((0, 0), dtype=np.float32)
_NO_WEIGHT = np.empty(0, dtype=np.float32)


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits`` (an LLVM bitcast, which vectorizes)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(inline="always", fastmath=True, error_model="numpy")
def exp(x: float) -> float:
    """``exp(x)`` in float32 within 2 ulp, ``x`` clamped to ``[-87, 88]`` (so the result is a
    normal number, ~1.6e-38 to ~1.7e38).

    numba has no vector math library here: ``math.exp`` is a scalar call per value, which
    keeps the loop around it from vectorizing. This is Cephes' ``expf``: ``x = n ln2 + r``
    with ``|r| <= ln2 / 2`` (``ln2`` split in two parts, so ``r`` is exact), ``exp(r)`` by a
    degree-7 polynomial and ``2^n`` built from its IEEE bits; straight-line arithmetic that
    LLVM vectorizes (16 values per AVX-512 instruction).
    """
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.float32(math.floor(x * np.float32(1.4426950408889634) + np.float32(0.5)))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _inv_rms(row: np.ndarray, eps: float) -> np.float32:
    """``1 / sqrt(mean(row^2) + eps)``, summed in fp32."""
    squares = np.float32(0.0)
    for i in range(row.shape[0]):
        squares += row[i] * row[i]
    return np.float32(1.0) / np.float32(math.sqrt(squares / np.float32(row.shape[0]) + eps))


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _rms_normalize(row: np.ndarray, weight: np.ndarray, eps: float, dst: np.ndarray) -> None:
    """``dst = row / rms(row) * weight`` (``dst`` may be ``row``)."""
    inv = _inv_rms(row, eps)
    for i in range(row.shape[0]):
        dst[i] = row[i] * inv * weight[i]


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _rms_norm_kernel(
    x: np.ndarray, residual: np.ndarray, weight: np.ndarray, out: np.ndarray, eps: float
) -> None:
    """``out[r] = x[r] / rms(x[r]) * weight`` for every row; with a ``residual`` (not empty),
    ``residual[r] += x[r]`` first, and the sum is what gets normalized (the reference's order:
    add, store, then normalize the stored sum)."""
    fused = residual.shape[0] > 0
    for r in range(x.shape[0]):
        row = x[r]
        if fused:
            summed = residual[r]
            for i in range(row.shape[0]):
                summed[i] += row[i]
            row = summed
        _rms_normalize(row, weight, eps, out[r])


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _rotate(src: np.ndarray, cos_sin: np.ndarray, is_neox: bool, dst: np.ndarray) -> None:
    """``dst = src`` rotated by one position's ``cos_sin [2, D]`` row (``build_cos_sin_cache``'s
    layout: full-width ``cos``, signed ``sin``); ``dst`` must not overlap ``src``.

    Pair ``i`` is channels ``(i, i + D/2)`` (NeoX) or ``(2i, 2i + 1)`` (GPT-J); its first
    channel takes the table's columns ``i``, its second columns ``D/2 + i``, as the reference
    reads them: ``x * cos + partner(x) * sin``.
    """
    half = src.shape[0] // 2
    cos, sin = cos_sin[0], cos_sin[1]
    for i in range(half):
        if is_neox:
            first, second = src[i], src[half + i]
        else:
            first, second = src[2 * i], src[2 * i + 1]
        rotated_first = first * cos[i] + second * sin[i]
        rotated_second = second * cos[half + i] + first * sin[half + i]
        if is_neox:
            dst[i], dst[half + i] = rotated_first, rotated_second
        else:
            dst[2 * i], dst[2 * i + 1] = rotated_first, rotated_second


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _rotate_in_place(
    heads: np.ndarray, cos_sin: np.ndarray, is_neox: bool, scratch: np.ndarray
) -> None:
    """Rotate every head row of ``heads [H, D]`` in place, through ``scratch [D]``."""
    for h in range(heads.shape[0]):
        _rotate(heads[h], cos_sin, is_neox, scratch)
        heads[h, :] = scratch


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _rotary_kernel(
    positions: np.ndarray, q: np.ndarray, k: np.ndarray, table: np.ndarray, is_neox: bool
) -> None:
    """``apply_rotary``: rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` in place."""
    scratch = np.empty(q.shape[2], dtype=np.float32)
    for t in range(q.shape[0]):
        cos_sin = table[positions[t]]
        _rotate_in_place(q[t], cos_sin, is_neox, scratch)
        _rotate_in_place(k[t], cos_sin, is_neox, scratch)


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _rotary_write_kv_kernel(
    positions: np.ndarray,
    qkv: np.ndarray,
    table: np.ndarray,
    q_weight: np.ndarray,
    k_weight: np.ndarray,
    eps: float,
    k_rows: np.ndarray,
    v_rows: np.ndarray,
    slot_mapping: np.ndarray,
    num_heads: int,
) -> None:
    """``rotary_write_kv`` for token rows ``qkv [T, Hq + 2 Hkv, D]``: q heads normalized (when
    ``q_weight`` is not empty) and rotated in place; k heads normalized, rotated and stored at
    row ``slot_mapping[t]`` of ``k_rows [slots, Hkv, D]``; v heads copied to ``v_rows``. A
    negative slot (padding) stores nothing, so its keys are not even computed. NeoX pairing.

    As in the reference, normalized values are rounded to fp32 before they rotate.
    """
    num_kv_heads = k_rows.shape[1]
    has_norm = q_weight.shape[0] > 0
    normed = np.empty(qkv.shape[2], dtype=np.float32)
    rotated = np.empty(qkv.shape[2], dtype=np.float32)
    for t in range(qkv.shape[0]):
        cos_sin = table[positions[t]]
        slot = slot_mapping[t]
        heads = num_heads + num_kv_heads if slot >= 0 else num_heads
        for h in range(heads):
            src = qkv[t, h]
            if has_norm:
                _rms_normalize(src, q_weight if h < num_heads else k_weight, eps, normed)
                src = normed
            dst = qkv[t, h] if h < num_heads else k_rows[slot, h - num_heads]
            _rotate(src, cos_sin, True, rotated)
            for i in range(dst.shape[0]):
                dst[i] = rotated[i]
        if slot >= 0:
            for h in range(num_kv_heads):
                src, dst = qkv[t, num_heads + num_kv_heads + h], v_rows[slot, h]
                for i in range(dst.shape[0]):
                    dst[i] = src[i]


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _silu_and_mul_row(gate: np.ndarray, up: np.ndarray, dst: np.ndarray) -> None:
    """``dst = silu(gate) * up``; ``silu(g) = g / (1 + exp(-g))``, as torch computes it."""
    for i in range(dst.shape[0]):
        g = gate[i]
        dst[i] = g / (np.float32(1.0) + exp(-g)) * up[i]


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
def _silu_and_mul_kernel(x: np.ndarray, out: np.ndarray) -> None:
    """``out[r] = silu(gate) * up`` for ``x[r] = [gate | up]``, rows spread over the threads.

    The row loop is a function of its own: written inside the ``prange`` body, it compiled to
    slower code (512 rows: 248 against 213-231 us).
    """
    size = out.shape[1]
    for r in numba.prange(x.shape[0]):
        _silu_and_mul_row(x[r, :size], x[r, size:], out[r])


# --- support checks and launches ------------------------------------------------------------------
#
# The checks run before every call, so they read only cheap tensor attributes (``is_cpu``, not
# ``device.type``, which builds a device object), and launches view tensors through numpy
# (``Tensor.numpy`` is free of copies; numpy's ``reshape`` costs a sixth of torch's ``view``).


def plain_f32(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is a CPU float32 tensor numba may read and write (no autograd);
    the CPU decode attention checks its operands with it too."""
    return all(t.is_cpu and t.dtype == torch.float32 and not t.requires_grad for t in tensors)


def _vector_f32(weight: torch.Tensor, size: int) -> bool:
    """Whether ``weight`` (a parameter: it may require grad) is a CPU float32 vector of ``size``."""
    return weight.is_cpu and weight.dtype == torch.float32 and weight.shape == (size,)


def rms_norm_cpu_supported(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None
) -> bool:
    """Whether ``rms_norm_cpu`` handles these operands: contiguous CPU float32 rows (and a
    residual of their shape), a float32 weight of one row's size."""
    operands = (x,) if residual is None else (x, residual)
    return (
        plain_f32(*operands)
        and x.dim() >= 1
        and x.numel() > 0
        and _vector_f32(weight, x.shape[-1])
        and all(t.is_contiguous() for t in operands)
        and (residual is None or residual.shape == x.shape)
    )


def rms_norm_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rms_norm`` (or, given ``residual``, ``fused_add_rms_norm``: ``residual += x`` in place,
    then the norm of the sum) in the numba kernel; ``rms_norm_cpu_supported`` must hold.
    ``out`` (contiguous, ``x``'s shape) may be given."""
    out = torch.empty_like(x) if out is None else out
    shape = (-1, x.shape[-1])
    _rms_norm_kernel(
        x.numpy().reshape(shape),
        _NO_ROWS if residual is None else residual.numpy().reshape(shape),
        weight.detach().numpy(),
        out.numpy().reshape(shape),
        eps,
    )
    return out


def _table_fits(table: torch.Tensor, head_dim: int) -> bool:
    return table.is_contiguous() and table.shape[1:] == (2, head_dim) and head_dim % 2 == 0


def _indices_fit(t: torch.Tensor, tokens: int) -> bool:
    return t.is_cpu and t.shape == (tokens,) and not t.is_floating_point()


def rotary_cpu_supported(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> bool:
    """Whether ``apply_rotary_cpu`` handles these operands: CPU float32 ``[T, heads, D]`` views
    (slices of a fused QKV output qualify) and table."""
    return (
        plain_f32(q, k, cos_sin_cache)
        and q.dim() == k.dim() == 3
        and q.shape[0] == k.shape[0] > 0
        and k.shape[2] == q.shape[2]
        and _table_fits(cos_sin_cache, q.shape[2])
        and _indices_fit(positions, q.shape[0])
    )


def apply_rotary_cpu(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """``apply_rotary`` in the numba kernel: rotates ``q`` and ``k`` in place."""
    _rotary_kernel(positions.numpy(), q.numpy(), k.numpy(), cos_sin_cache.numpy(), is_neox)


def rotary_write_kv_cpu_supported(
    positions: torch.Tensor,
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None,
) -> bool:
    """Whether ``rotary_write_kv_cpu`` handles these operands: a contiguous CPU float32
    ``qkv [T, Hq + 2 Hkv, D]``, contiguous float32 caches ``[blocks, block_size, Hkv, D]`` and
    table, float32 q/k norm weights of ``D`` values."""
    head_dim = qkv.shape[-1]
    return (
        plain_f32(qkv, cos_sin_cache, k_cache, v_cache)
        and qkv.dim() == 3
        and qkv.shape[0] > 0
        and qkv.shape[1] == num_heads + 2 * num_kv_heads
        and qkv.is_contiguous()
        and _table_fits(cos_sin_cache, head_dim)
        and k_cache.shape == v_cache.shape
        and k_cache.shape[2:] == (num_kv_heads, head_dim)
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and (qk_norm is None or all(_vector_f32(w, head_dim) for w in qk_norm[:2]))
        and _indices_fit(positions, qkv.shape[0])
        and _indices_fit(slot_mapping, qkv.shape[0])
    )


def rotary_write_kv_cpu(
    positions: torch.Tensor,
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """``rotary_write_kv`` in the numba kernel: q is rotated in place and returned as a view of
    ``qkv`` (as the CUDA kernel does); ``rotary_write_kv_cpu_supported`` must hold."""
    if qk_norm is None:
        q_weight = k_weight = _NO_WEIGHT
        eps = 0.0
    else:
        q_weight, k_weight = qk_norm[0].detach().numpy(), qk_norm[1].detach().numpy()
        eps = qk_norm[2]
    rows = (-1, num_kv_heads, qkv.shape[-1])
    _rotary_write_kv_kernel(
        positions.numpy(),
        qkv.numpy(),
        cos_sin_cache.numpy(),
        q_weight,
        k_weight,
        eps,
        k_cache.numpy().reshape(rows),
        v_cache.numpy().reshape(rows),
        slot_mapping.numpy(),
        num_heads,
    )
    return qkv[:, :num_heads]


def silu_and_mul_cpu_supported(x: torch.Tensor) -> bool:
    """Whether ``silu_and_mul_cpu`` handles ``x``: contiguous CPU float32 rows of even size."""
    return (
        plain_f32(x)
        and x.dim() >= 1
        and x.numel() > 0
        and x.shape[-1] % 2 == 0
        and x.is_contiguous()
    )


def silu_and_mul_cpu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu_and_mul`` in the numba kernel: ``[..., 2I] -> [..., I]``, a fresh contiguous
    tensor unless ``out`` (contiguous) is given; ``silu_and_mul_cpu_supported`` must hold."""
    out = torch.empty(*x.shape[:-1], x.shape[-1] // 2) if out is None else out
    run_parallel(
        _silu_and_mul_kernel,
        x.numpy().reshape(-1, x.shape[-1]),
        out.numpy().reshape(-1, out.shape[-1]),
    )
    return out
