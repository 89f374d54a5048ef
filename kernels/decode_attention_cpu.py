"""Paged decode attention on the CPU: one numba kernel that reads the block tables directly.

The torch path (``yaie.kernels.attention``) attends decodes by gathering every context out of
the cache (``index_select`` of K and of V) and calling ``scaled_dot_product_attention`` on the
padded gather: a handful of ops per layer whose fixed costs dominate when contexts are short.
This kernel does the same arithmetic in one call, without the gather. How it works:

- one task per decode, spread over the CPU's threads by ``numba.prange``; a task handles all
  the decode's heads, so it reads whole K/V rows (every KV head of a token: one contiguous
  run of memory), once for all the query heads that share them (grouped-query attention);
- two passes over the context: scores ``q . k`` for every head, then softmax weights
  ``exp((score - max) * scale)`` accumulated into ``sum(w * v)`` and divided by ``sum(w)``
  at the end: the softmax a decode needs, with no causal mask (a decode sees its whole
  context);
- each pass walks the context as ``_LANES`` (4) interleaved lanes, each a contiguous quarter of
  it: one step reads one token of each lane. In a model step the KV cache comes from DRAM
  (the weights streamed through the caches since the layer's last visit), and a thread that
  walks one 12 KB block after another reads ~12.5 GB/s on this machine: the hardware
  prefetcher restarts at every block. Four streams read at ~20 GB/s (software prefetch did
  not help). The lanes also share each load of ``q`` and each update of the output
  accumulator among four tokens. At 16 decodes over ~130 tokens, cold, walking four blocks
  at once took a fifth off the time of walking them one after another, and sharing the
  loads another fifth;
- ``exp`` is a polynomial (``yaie.kernels.elementwise_cpu.exp``) that LLVM vectorizes, where
  ``math.exp`` is a scalar call per weight.

Measured at SmolLM2-135M shapes (9 query / 3 KV heads of 64, fp32, 2-core AMD EPYC, per layer
through ``paged_decode_attention_cpu``, medians of two runs of 15 interleaved rounds; "cold":
the K/V of as many layers as fill 128 MB visited in turn, as in a model step; "warm": one
layer's again and again, as ``yaie bench cpu-kernels`` used to measure), this kernel against
the previous one (one task per decode and KV head, one token at a time, ``math.exp``):
16 decodes over ~130 tokens 101-106 us warm / 212-213 us cold against 167-186 / 376-381 us;
64 over ~130 0.40-0.41 / 0.71-0.76 ms against 0.91-1.12 / 1.26-1.44 ms; 16 over ~1,000
0.81-0.97 / 1.27-1.31 ms against 1.93-2.28 / 2.41-2.57 ms; 1 over ~130 19 / 32-34 us against
19-21 / 36-37 us. Inside the model (the batch-16 workload of ``yaie bench latency``, contexts
of 33 to 160 tokens) a layer's call took 149 us on average against 229 us: the previous
kernel's 2x gap between the model and the warm bench was the cold cache (cold in isolation it
took as long), not per-call overhead (a call over 16 two-token contexts takes ~7 us),
per-task allocations (preallocating them did not help) or torch's threads (a oneDNN
GEMM between calls did not slow them).

``fastmath`` lets LLVM vectorize the dot products and the V accumulation over ``head_dim``, so
sums run in a different order than torch's, and ``exp`` is within 2 ulp: results
differ from the torch path by float32 rounding. The torch path stays the reference the tests
compare against, and the path for non-fp32 caches.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from yaie.kernels.cpu import run_parallel
from yaie.kernels.elementwise_cpu import exp, plain_f32

_LANES = 4
"""Interleaved walks through a context (see the module docstring). ``_scores`` and
``_weighted_values`` spell the four out: tokens ``u, t1, t2, t3`` of a step."""


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _context_rows(table: np.ndarray, block_size: int, length: int, padded: int) -> np.ndarray:
    """Cache row (``slot``) of each of a context's ``length`` tokens, by its block ``table``;
    the ``padded - length`` rows past the end repeat the last token's, so the lanes read
    valid, cached memory there (their weights are zero)."""
    rows = np.empty(padded, dtype=np.int64)
    for b in range((length + block_size - 1) // block_size):
        first, base = b * block_size, table[b] * block_size
        for j in range(min(block_size, length - first)):
            rows[first + j] = base + j
    for t in range(length, padded):
        rows[t] = rows[length - 1]
    return rows


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _scores(
    queries: np.ndarray, k_rows: np.ndarray, rows: np.ndarray, stride: int, scores: np.ndarray
) -> None:
    """``scores[h, t] = queries[h] . k[t]`` (unscaled) for the ``4 * stride`` tokens of
    ``rows``: lane ``l`` takes tokens ``l * stride + u``, one per step ``u``."""
    num_heads, head_dim = queries.shape
    num_kv_heads = k_rows.shape[1]
    group = num_heads // num_kv_heads
    for u in range(stride):
        t1, t2, t3 = stride + u, 2 * stride + u, 3 * stride + u
        k0, k1, k2, k3 = k_rows[rows[u]], k_rows[rows[t1]], k_rows[rows[t2]], k_rows[rows[t3]]
        for kv in range(num_kv_heads):
            r0, r1, r2, r3 = k0[kv], k1[kv], k2[kv], k3[kv]
            for h in range(kv * group, (kv + 1) * group):
                q_h = queries[h]
                d0 = d1 = d2 = d3 = np.float32(0.0)
                for d in range(head_dim):
                    d0 += q_h[d] * r0[d]
                    d1 += q_h[d] * r1[d]
                    d2 += q_h[d] * r2[d]
                    d3 += q_h[d] * r3[d]
                s_h = scores[h]
                s_h[u], s_h[t1], s_h[t2], s_h[t3] = d0, d1, d2, d3


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _softmax_weights(scores: np.ndarray, length: int, scale: float) -> np.ndarray:
    """Turn ``scores [H, padded]`` into unnormalized softmax weights in place (zero past
    ``length``); returns each head's sum of weights."""
    totals = np.empty(scores.shape[0], dtype=np.float32)
    for h in range(scores.shape[0]):
        s_h = scores[h]
        best = np.float32(-np.inf)
        for t in range(length):
            best = max(best, s_h[t])
        total = np.float32(0.0)
        for t in range(length):
            weight = exp((s_h[t] - best) * np.float32(scale))
            s_h[t] = weight
            total += weight
        s_h[length:] = np.float32(0.0)
        totals[h] = total
    return totals


@numba.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _weighted_values(
    weights: np.ndarray, v_rows: np.ndarray, rows: np.ndarray, stride: int, acc: np.ndarray
) -> None:
    """``acc[h] = sum_t weights[h, t] * v[t]``, walking ``rows`` in the lanes of ``_scores``:
    one update of ``acc[h]`` adds four tokens."""
    num_heads, head_dim = acc.shape
    num_kv_heads = v_rows.shape[1]
    group = num_heads // num_kv_heads
    acc[:] = np.float32(0.0)
    for u in range(stride):
        t1, t2, t3 = stride + u, 2 * stride + u, 3 * stride + u
        v0, v1, v2, v3 = v_rows[rows[u]], v_rows[rows[t1]], v_rows[rows[t2]], v_rows[rows[t3]]
        for kv in range(num_kv_heads):
            r0, r1, r2, r3 = v0[kv], v1[kv], v2[kv], v3[kv]
            for h in range(kv * group, (kv + 1) * group):
                w_h = weights[h]
                w0, w1, w2, w3 = w_h[u], w_h[t1], w_h[t2], w_h[t3]
                acc_h = acc[h]
                for d in range(head_dim):
                    acc_h[d] += w0 * r0[d] + w1 * r1[d] + w2 * r2[d] + w3 * r3[d]


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
def _decode_kernel(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    out: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    query_start_loc: np.ndarray,
    seq_ids: np.ndarray,
    scale: float,
) -> None:
    """``out[row, h] = softmax(q[row, h] . K^T * scale) V`` over request ``s``'s context, for
    every decode ``s`` in ``seq_ids`` (its one query at ``row = query_start_loc[s]``, a context
    of at least one token) and query head ``h``."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_blocks, block_size, num_kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    k_rows = k_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)
    v_rows = v_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)
    for i in numba.prange(seq_ids.shape[0]):
        seq = seq_ids[i]
        row, length = query_start_loc[seq], seq_lens[seq]
        stride = (length + _LANES - 1) // _LANES
        rows = _context_rows(block_tables[seq], block_size, length, _LANES * stride)
        scores = np.empty((num_heads, _LANES * stride), dtype=np.float32)
        _scores(q[row], k_rows, rows, stride, scores)
        totals = _softmax_weights(scores, length, scale)
        acc = np.empty((num_heads, head_dim), dtype=np.float32)
        _weighted_values(scores, v_rows, rows, stride, acc)
        for h in range(num_heads):
            inv_total = np.float32(1.0) / totals[h]
            for d in range(head_dim):
                out[row, h, d] = acc[h, d] * inv_total


def cpu_decode_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether ``paged_decode_attention_cpu`` handles these operands: fp32 CPU tensors whose
    query heads are a multiple of the KV heads, caches contiguous."""
    return (
        plain_f32(q, k_cache, v_cache)
        and k_cache.shape == v_cache.shape
        and q.shape[1] % k_cache.shape[2] == 0
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
    )


def paged_decode_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_ids: torch.Tensor,
    scale: float,
) -> None:
    """Write ``out[query_start_loc[s]]`` for every decode request ``s`` in ``seq_ids``.

    Same contract as the CUDA kernel's ``paged_decode_attention``: ``q, out [T, Hq, D]``,
    caches ``[num_blocks, block_size, Hkv, D]``, int32 ``block_tables [num_seqs, max_blocks]``,
    ``seq_lens``, ``query_start_loc``, ``seq_ids``.
    """
    if seq_ids.shape[0] == 0:
        return
    run_parallel(
        _decode_kernel,
        q.contiguous().numpy(),
        k_cache.numpy(),
        v_cache.numpy(),
        out.numpy(),
        block_tables.numpy(),
        seq_lens.numpy(),
        query_start_loc.numpy(),
        seq_ids.numpy(),
        scale,
    )
