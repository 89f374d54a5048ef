"""FlashAttention forward and backward in numba.cuda, on contiguous q/k/v (educational).

The engine's attention is paged (``prefill_attention``, ``decode_attention``); this module is the
algorithm in its plainest form, forward *and* backward, checked against torch autograd of
``attention_reference``. Inputs are ``[B, H, L, D]`` (one head count for q, k and v), computed
in fp32: the wrapper converts other dtypes on the way in and out.

**Forward.** ``S = scale Q K^T``, ``P = softmax(S)`` (causal: key ``j > i`` masked),
``O = P V``. Block ``(tile, h, b)`` owns ``TILE`` query rows of one head and never materialises
a row of ``S``: it walks the keys in tiles of ``TILE``, staging K and V in shared memory, and
keeps per row a running max ``m``, sum ``l`` and unnormalised output ``acc`` (online softmax,
in base 2: ``Q`` is pre-scaled by ``scale * log2(e)`` and ``exp2`` is one instruction):
``m' = max(m, rowmax(S_tile))``, ``l = l 2^(m - m') + rowsum(2^(S_tile - m'))``,
``acc = acc 2^(m - m') + 2^(S_tile - m') V_tile``, and finally ``O = acc / l``. It also stores
``lse = m + log2(l)`` per row, all the backward pass needs to rebuild ``P`` exactly:
``P_ij = 2^(scale log2(e) q_i . k_j - lse_i)``.

**Backward.** With ``dO`` given: ``dV = P^T dO``; ``dP = dO V^T``;
``dS = P o (dP - delta)`` where ``delta_i = sum_j P_ij dP_ij = dO_i . O_i`` (a row dot product,
computed by torch); ``dQ = scale dS K``; ``dK = scale dS^T Q``. Two kernels recompute ``P``
tile by tile instead of storing it (``L^2`` memory): ``_dkdv`` gives each block a key tile and
walks the query tiles that see it, accumulating ``dK`` and ``dV`` for its keys in registers;
``_dq`` gives each block a query tile and walks its key tiles, accumulating ``dQ``. Splitting the
work this way keeps every output owned by one block: no atomics, deterministic results.

**Threads.** ``THREADS = 128``; ``LANES = 8`` consecutive lanes share a row of a tile. For
scores, lane ``l`` of row ``r`` owns keys ``l`` and ``l + 8`` of the tile, so a row's maximum
and sum take three xor-shuffle steps; for outputs, the lane owns dims ``l, l + 8, ...``.
Shared rows are padded by one float: the eight rows a warp reads at once fall in distinct banks.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from yaie.kernels._numba import (
    NEG_SCORE,
    array_view,
    cuda,
    runs_here,
    stream_for,
    xor_shuffle,
)

TILE = 16
THREADS = 128
LANES = THREADS // TILE
MAX_HEAD_DIM = 128
"""Four ``TILE x (D + 1)`` fp32 tiles must fit the 48 KB of static shared memory."""



@cuda.jit(device=True)
def _stage(tile, src, b, h, start, scale, tid):
    """``tile[r, :] = scale * src[b, h, start + r, :]`` for the ``TILE`` rows; zeros past the
    sequence. Consecutive threads copy consecutive elements of a row."""
    length = src.shape[2]
    dim = src.shape[3]
    for item in range(tid, TILE * dim, THREADS):
        r = item // dim
        d = item % dim
        i = start + r
        tile[r, d] = src[b, h, i, d] * scale if i < length else np.float32(0.0)


@cuda.jit(device=True)
def _row_reduce(value, is_max):
    """Max (``is_max``) or sum of ``value`` over the ``LANES`` lanes of a row; all get it."""
    width = LANES // 2
    while width > 0:
        other = xor_shuffle(value, width)
        value = max(value, other) if is_max else value + other
        width //= 2
    return value


@cuda.jit(device=True)
def _probabilities(sq, sk, sv, sdo, slse, sdelta, r, lane, qi, kj0, length, causal,
                   scale_log2, sp, sds, head_dim):
    """Rebuild ``P`` and ``dS`` for row ``r`` (query ``qi``), keys ``lane, lane + LANES``
    of the staged tiles (key ``kj0`` first); stores them in ``sp``/``sds`` ``[row, key]``."""
    for c in range(2):
        col = lane + LANES * c
        key = kj0 + col
        s = np.float32(0.0)
        dp = np.float32(0.0)
        for d in range(head_dim):
            s += sq[r, d] * sk[col, d]
            dp += sdo[r, d] * sv[col, d]
        visible = qi < length and key < length and not (causal and key > qi)
        p = math.exp2(s * scale_log2 - slse[r]) if visible else np.float32(0.0)
        sp[r, col] = p
        sds[r, col] = p * (dp - sdelta[r])


@functools.cache
def _kernels(head_dim: int):
    """``(forward, dkdv, dq)`` for one head dim (it sizes shared tiles and registers)."""
    dims = head_dim // LANES
    padded = head_dim + 1
    padded_tile = TILE + 1
    one = np.float32(1.0)

    @cuda.jit(cache=True, fastmath=True)
    def forward(q, k, v, o, lse, scale_log2, causal):
        """Block ``(tile, h, b)``: ``o`` and ``lse`` (base 2) of ``TILE`` query rows."""
        qt, h, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        length = q.shape[2]
        tid = cuda.threadIdx.x
        r, lane = tid // LANES, tid % LANES
        i = qt * TILE + r
        sq = cuda.shared.array((TILE, padded), np.float32)
        sk = cuda.shared.array((TILE, padded), np.float32)
        sv = cuda.shared.array((TILE, padded), np.float32)
        sp = cuda.shared.array((TILE, padded_tile), np.float32)
        _stage(sq, q, b, h, qt * TILE, scale_log2, tid)

        m = NEG_SCORE
        lsum = np.float32(0.0)
        acc = cuda.local.array(dims, np.float32)
        for j in range(dims):
            acc[j] = np.float32(0.0)
        n_tiles = qt + 1 if causal else (length + TILE - 1) // TILE
        for kt in range(n_tiles):
            cuda.syncthreads()  # the previous tile's readers are done
            _stage(sk, k, b, h, kt * TILE, one, tid)
            _stage(sv, v, b, h, kt * TILE, one, tid)
            cuda.syncthreads()
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            for d in range(head_dim):
                s0 += sq[r, d] * sk[lane, d]
                s1 += sq[r, d] * sk[lane + LANES, d]
            key0 = kt * TILE + lane
            key1 = key0 + LANES
            if i >= length or key0 >= length or (causal and key0 > i):
                s0 = NEG_SCORE
            if i >= length or key1 >= length or (causal and key1 > i):
                s1 = NEG_SCORE
            new_m = max(m, _row_reduce(max(s0, s1), True))
            p0 = math.exp2(s0 - new_m) if s0 > NEG_SCORE else np.float32(0.0)
            p1 = math.exp2(s1 - new_m) if s1 > NEG_SCORE else np.float32(0.0)
            corr = math.exp2(m - new_m)
            lsum = lsum * corr + _row_reduce(p0 + p1, False)
            m = new_m
            sp[r, lane] = p0
            sp[r, lane + LANES] = p1
            cuda.syncthreads()  # the row's P is complete
            for j in range(dims):
                acc[j] *= corr
            for kk in range(TILE):
                p = sp[r, kk]
                for j in range(dims):
                    acc[j] += p * sv[kk, lane + LANES * j]

        if i < length:
            for j in range(dims):
                o[b, h, i, lane + LANES * j] = acc[j] / lsum
            if lane == 0:
                lse[b, h, i] = m + math.log2(lsum)

    @cuda.jit(cache=True, fastmath=True)
    def dkdv(q, k, v, do, lse, delta, dk, dv, scale, scale_log2, causal):
        """Block ``(tile, h, b)``: ``dK``, ``dV`` of ``TILE`` keys; thread row = key."""
        kt, h, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        length = q.shape[2]
        tid = cuda.threadIdx.x
        r, lane = tid // LANES, tid % LANES
        sk = cuda.shared.array((TILE, padded), np.float32)
        sv = cuda.shared.array((TILE, padded), np.float32)
        sq = cuda.shared.array((TILE, padded), np.float32)
        sdo = cuda.shared.array((TILE, padded), np.float32)
        sp = cuda.shared.array((TILE, padded_tile), np.float32)
        sds = cuda.shared.array((TILE, padded_tile), np.float32)
        slse = cuda.shared.array(TILE, np.float32)
        sdelta = cuda.shared.array(TILE, np.float32)
        _stage(sk, k, b, h, kt * TILE, one, tid)
        _stage(sv, v, b, h, kt * TILE, one, tid)
        dk_acc = cuda.local.array(dims, np.float32)
        dv_acc = cuda.local.array(dims, np.float32)
        for j in range(dims):
            dk_acc[j] = np.float32(0.0)
            dv_acc[j] = np.float32(0.0)
        for qt in range(kt if causal else 0, (length + TILE - 1) // TILE):
            cuda.syncthreads()
            _stage(sq, q, b, h, qt * TILE, one, tid)
            _stage(sdo, do, b, h, qt * TILE, one, tid)
            if tid < TILE:
                qi = qt * TILE + tid
                slse[tid] = lse[b, h, qi] if qi < length else np.float32(0.0)
                sdelta[tid] = delta[b, h, qi] if qi < length else np.float32(0.0)
            cuda.syncthreads()
            # Thread row r is query row r here: P and dS for this (query, key) tile pair.
            _probabilities(sq, sk, sv, sdo, slse, sdelta, r, lane, qt * TILE + r, kt * TILE,
                           length, causal, scale_log2, sp, sds, head_dim)
            cuda.syncthreads()
            # Thread row r is key r: dV_r += sum_i P_ir dO_i, dK_r += sum_i dS_ir Q_i.
            for qq in range(TILE):
                p = sp[qq, r]
                ds = sds[qq, r]
                for j in range(dims):
                    dv_acc[j] += p * sdo[qq, lane + LANES * j]
                    dk_acc[j] += ds * sq[qq, lane + LANES * j]
        key = kt * TILE + r
        if key < length:
            for j in range(dims):
                dk[b, h, key, lane + LANES * j] = dk_acc[j] * scale
                dv[b, h, key, lane + LANES * j] = dv_acc[j]

    @cuda.jit(cache=True, fastmath=True)
    def dq(q, k, v, do, lse, delta, dq_out, scale, scale_log2, causal):
        """Block ``(tile, h, b)``: ``dQ`` of ``TILE`` query rows."""
        qt, h, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        length = q.shape[2]
        tid = cuda.threadIdx.x
        r, lane = tid // LANES, tid % LANES
        i = qt * TILE + r
        sq = cuda.shared.array((TILE, padded), np.float32)
        sdo = cuda.shared.array((TILE, padded), np.float32)
        sk = cuda.shared.array((TILE, padded), np.float32)
        sv = cuda.shared.array((TILE, padded), np.float32)
        sp = cuda.shared.array((TILE, padded_tile), np.float32)
        sds = cuda.shared.array((TILE, padded_tile), np.float32)
        slse = cuda.shared.array(TILE, np.float32)
        sdelta = cuda.shared.array(TILE, np.float32)
        _stage(sq, q, b, h, qt * TILE, one, tid)
        _stage(sdo, do, b, h, qt * TILE, one, tid)
        if tid < TILE:
            qi = qt * TILE + tid
            slse[tid] = lse[b, h, qi] if qi < length else np.float32(0.0)
            sdelta[tid] = delta[b, h, qi] if qi < length else np.float32(0.0)
        acc = cuda.local.array(dims, np.float32)
        for j in range(dims):
            acc[j] = np.float32(0.0)
        n_tiles = qt + 1 if causal else (length + TILE - 1) // TILE
        for kt in range(n_tiles):
            cuda.syncthreads()
            _stage(sk, k, b, h, kt * TILE, one, tid)
            _stage(sv, v, b, h, kt * TILE, one, tid)
            cuda.syncthreads()
            _probabilities(sq, sk, sv, sdo, slse, sdelta, r, lane, i, kt * TILE, length,
                           causal, scale_log2, sp, sds, head_dim)
            cuda.syncthreads()
            for kk in range(TILE):
                ds = sds[r, kk]
                for j in range(dims):
                    acc[j] += ds * sk[kk, lane + LANES * j]
        if i < length:
            for j in range(dims):
                dq_out[b, h, i, lane + LANES * j] = acc[j] * scale

    return forward, dkdv, dq



def _grid(q: torch.Tensor) -> tuple[int, int, int]:
    return (-(-q.shape[2] // TILE), q.shape[1], q.shape[0])


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd glue: the numba forward saves ``lse``; the backward runs ``dkdv`` and ``dq``."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):  # type: ignore[override]
        q32, k32, v32 = (t.detach().float().contiguous() for t in (q, k, v))
        o = torch.empty_like(q32)
        lse = torch.empty(q32.shape[:3], dtype=torch.float32, device=q.device)
        forward_kernel, _, _ = _kernels(q.shape[3])
        forward_kernel[_grid(q32), THREADS, stream_for(q32)](
            array_view(q32), array_view(k32), array_view(v32), array_view(o), array_view(lse),
            np.float32(scale * math.log2(math.e)), causal,
        )
        ctx.save_for_backward(q32, k32, v32, o, lse)
        ctx.causal, ctx.scale, ctx.dtype = causal, scale, q.dtype
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q32, k32, v32, o, lse = ctx.saved_tensors
        do = grad_out.detach().float().contiguous()
        delta = (do * o).sum(-1)
        dq, dk, dv = torch.empty_like(q32), torch.empty_like(k32), torch.empty_like(v32)
        _, dkdv_kernel, dq_kernel = _kernels(q32.shape[3])
        stream = stream_for(q32)
        common = [array_view(t) for t in (q32, k32, v32, do, lse, delta)]
        scale = np.float32(ctx.scale)
        scale_log2 = np.float32(ctx.scale * math.log2(math.e))
        dkdv_kernel[_grid(k32), THREADS, stream](
            *common, array_view(dk), array_view(dv), scale, scale_log2, ctx.causal
        )
        dq_kernel[_grid(q32), THREADS, stream](*common, array_view(dq), scale, scale_log2, ctx.causal)
        return dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None, None


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> torch.Tensor:
    """``softmax(scale Q K^T + mask) V`` spelled out in torch: the autograd ground truth."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        length = q.shape[-2]
        hidden = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores.softmax(-1) @ v


def flash_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the numba kernels handle these operands where they live."""
    return (
        runs_here(q)
        and q.dim() == 4
        and q.shape == k.shape == v.shape
        and q.shape[3] % LANES == 0
        and q.shape[3] <= MAX_HEAD_DIM
    )


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``q, k, v [B, H, L, D]``, differentiable; the numba kernels where they
    run (``flash_supported``), else ``attention_reference``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if flash_supported(q, k, v):
        return FlashAttentionFunction.apply(q, k, v, causal, scale)
    return attention_reference(q, k, v, causal, scale)
