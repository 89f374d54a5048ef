"""Prefill/extend attention over the paged KV cache in numba.cuda (FlashAttention-style tiling).

A prefill chunk of ``n`` new tokens of a request whose context ends at ``seq_len`` attends
causally with an offset: new token ``i`` sits at position ``seq_len - n + i`` and sees keys
``0 ..= seq_len - n + i``, i.e. the cached prefix (radix-tree hits, earlier chunks) plus the new
tokens up to itself. The batch is ragged: request ``s`` owns query rows
``query_start_loc[s]:query_start_loc[s + 1]`` and a context of ``seq_lens[s]`` tokens in its
block table. ``yaie.kernels.flash_attention`` has the same algorithm on contiguous tensors
without paging or GQA, and its backward pass.

**Who owns what.** Block ``(tile, kv_head, j)`` owns a tile of ``ROWS`` query rows of prefill
request ``j``: ``ROWS / G`` consecutive new tokens times the ``G`` query heads that share KV head
``kv_head``, so each K/V tile loaded serves all of them (grouped-query attention). Row
``r = token * G + head``. The block walks the context in tiles of ``KEYS`` keys, from key 0 up
to the tile's last query position; the tiles are staged in shared memory as fp32 (each K/V row
read from the paged cache once per block, as 8-byte words, coalesced across the block's threads).
``LPR = threads / ROWS`` consecutive lanes share a row: for scores, lane ``l`` of the row owns
keys ``l, l + LPR, ...`` of the tile; for the output, dims ``l, l + LPR, ...``.

**Per key tile (online softmax, base 2).** ``S = Q K^T`` (``Q`` pre-scaled by
``scale * log2(e)``; masked keys get a large negative score), row maxima by shuffles across the
row's ``LPR`` lanes, ``m' = max(m, rowmax(S))``, ``P = 2^(S - m')`` (masked entries 0), then
``l = l 2^(m - m') + rowsum(P)`` and ``acc = acc 2^(m - m') + P V``; ``P`` goes through shared
memory because the lanes that computed a row's scores each need the whole row for ``P V``.
At the end ``out = acc / l``. Shared rows are padded by one float so the strided reads of a warp
(eight rows, or four keys at a time) fall in different banks.

The arithmetic runs on the CUDA cores in fp32 (numba has no tensor-core matrix instructions),
so torch's flash kernel, on tensor cores, is much faster; see ``yaie.kernels.attention`` for
which one the engine uses and ``yaie.bench.attention_kernels`` for the figures.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from yaie.kernels._numba import (
    F32,
    KINDS,
    NEG_SCORE,
    array_view,
    cuda,
    pack,
    runs_here,
    stream_for,
    unpack,
    words,
    words_fit,
    xor_shuffle,
)

THREADS = 128



def tile_shape(head_dim: int) -> tuple[int, int]:
    """``(ROWS, KEYS)``: 32 x 32 tiles up to ``D = 128`` (37 KB of shared memory), 16 x 16
    above, to stay inside the 48 KB a block may statically allocate."""
    return (32, 32) if head_dim <= 128 else (16, 16)


@cuda.jit(device=True)
def _stage(tile, cache, block_tables, seq, k0, limit, kv_head, kv_stride, tid, keys, row_words,
           block_size, kind):
    """Copy keys ``k0 .. k0 + keys`` (zeros from ``limit`` on) of one head into ``tile`` (fp32).

    Thread ``tid`` takes words ``tid, tid + THREADS, ...`` of the tile in key-major order, so
    consecutive threads read consecutive words of a cache row.
    """
    vec = 2 if kind == F32 else 4
    for item in range(tid, keys * row_words, THREADS):
        kk = item // row_words
        w = item % row_words
        t = k0 + kk
        word = np.uint64(0)
        if t < limit:
            slot = block_tables[seq, t // block_size] * block_size + t % block_size
            word = np.uint64(cache[slot * kv_stride + kv_head * row_words + w])
        for e in range(vec):
            tile[kk, w * vec + e] = unpack(word, e, kind)


@functools.cache
def prefill_kernel(kind: int, group: int, head_dim: int, block_size: int):
    """The prefill kernel for one storage kind, GQA group, head dim and block size.

    Compile-time constants (closure cells) size the shared tiles and per-lane registers.
    """
    rows, keys = tile_shape(head_dim)
    lpr = THREADS // rows
    keys_per_lane = keys // lpr
    dims_per_lane = head_dim // lpr
    vec = 2 if kind == F32 else 4
    row_words = head_dim // vec
    tokens_per_tile = rows // group
    padded_dim, padded_keys = head_dim + 1, keys + 1  # one float of padding: no bank conflicts

    @cuda.jit(cache=True, fastmath=True)
    def paged_prefill(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                      seq_ids, kv_stride, scale_log2):
        """out/q: words ``[T, Hq, W]``; caches: flat words (see ``decode_attention``)."""
        tile = cuda.blockIdx.x
        kv_head = cuda.blockIdx.y
        seq = seq_ids[cuda.blockIdx.z]
        q_start = query_start_loc[seq]
        n_new = query_start_loc[seq + 1] - q_start
        first = tile * tokens_per_tile
        if first >= n_new:
            return
        seq_len = seq_lens[seq]
        offset = seq_len - n_new  # position of new token 0
        tid = cuda.threadIdx.x
        r = tid // lpr
        lane = tid % lpr
        token = first + r // group
        row_ok = r < tokens_per_tile * group and token < n_new
        pos = offset + token  # this row's query position

        sq = cuda.shared.array((rows, padded_dim), np.float32)
        skv = cuda.shared.array((keys, padded_dim), np.float32)
        sp = cuda.shared.array((rows, padded_keys), np.float32)

        # Stage the query tile (scaled into base-2 logits); padding rows are zeros.
        for item in range(tid, rows * row_words, THREADS):
            rr = item // row_words
            w = item % row_words
            tok = first + rr // group
            ok = rr < tokens_per_tile * group and tok < n_new
            word = np.uint64(0)
            if ok:
                word = np.uint64(q[q_start + tok, kv_head * group + rr % group, w])
            for e in range(vec):
                sq[rr, w * vec + e] = unpack(word, e, kind) * scale_log2

        m = NEG_SCORE
        lsum = np.float32(0.0)
        acc = cuda.local.array(dims_per_lane, np.float32)
        for j in range(dims_per_lane):
            acc[j] = np.float32(0.0)
        s = cuda.local.array(keys_per_lane, np.float32)

        last = offset + min(n_new, first + tokens_per_tile) - 1  # last query position here
        for k0 in range(0, last + 1, keys):
            cuda.syncthreads()  # the previous tile's P V is done with skv
            _stage(skv, k_cache, block_tables, seq, k0, last + 1, kv_head, kv_stride, tid, keys,
                   row_words, block_size, kind)
            cuda.syncthreads()

            # Scores of this lane's keys, masked past the row's own position.
            for c in range(keys_per_lane):
                s[c] = np.float32(0.0)
            for d in range(head_dim):
                qv = sq[r, d]
                for c in range(keys_per_lane):
                    s[c] += qv * skv[lane + lpr * c, d]
            tile_max = NEG_SCORE
            for c in range(keys_per_lane):
                if not row_ok or k0 + lane + lpr * c > pos:
                    s[c] = NEG_SCORE
                tile_max = max(tile_max, s[c])
            width = lpr // 2
            while width > 0:
                tile_max = max(tile_max, xor_shuffle(tile_max, width))
                width //= 2
            new_m = max(m, tile_max)
            corr = math.exp2(m - new_m)
            m = new_m
            row_sum = np.float32(0.0)
            for c in range(keys_per_lane):
                p = math.exp2(s[c] - new_m) if s[c] > NEG_SCORE else np.float32(0.0)
                sp[r, lane + lpr * c] = p
                row_sum += p
            width = lpr // 2
            while width > 0:
                row_sum += xor_shuffle(row_sum, width)
                width //= 2
            lsum = lsum * corr + row_sum
            cuda.syncthreads()  # P complete; skv may now be overwritten with V

            _stage(skv, v_cache, block_tables, seq, k0, last + 1, kv_head, kv_stride, tid, keys,
                   row_words, block_size, kind)
            cuda.syncthreads()
            for j in range(dims_per_lane):
                acc[j] *= corr
            for kk in range(keys):
                p = sp[r, kk]
                for j in range(dims_per_lane):
                    acc[j] += p * skv[kk, lane + lpr * j]

        # Lane ``lane`` owns dims lane + LPR j; a word needs ``vec`` consecutive dims, so the
        # row's lanes hand their values over through shared memory and write whole words.
        inv = np.float32(1.0) / lsum if row_ok else np.float32(0.0)
        for j in range(dims_per_lane):
            sq[r, lane + lpr * j] = acc[j] * inv
        cuda.syncthreads()
        if row_ok:
            head = kv_head * group + r % group
            for w in range(lane, row_words, lpr):
                word = np.uint64(0)
                for e in range(vec):
                    word |= pack(sq[r, w * vec + e], e, kind)
                out[q_start + token, head, w] = word

    return paged_prefill


def prefill_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the numba prefill kernel handles these operands where they live."""
    kind = KINDS.get(q.dtype)
    if kind is None or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return False
    head_dim, num_kv_heads = q.shape[2], k_cache.shape[2]
    rows, _ = tile_shape(head_dim)
    vec = 2 if kind == F32 else 4
    group = q.shape[1] // num_kv_heads if q.shape[1] % num_kv_heads == 0 else 0
    return (
        runs_here(q)
        and 0 < group <= rows
        and head_dim % vec == 0
        and head_dim % (THREADS // rows) == 0
        and head_dim <= 256
        and k_cache.shape == v_cache.shape
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and words_fit(q)
    )



def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_ids: torch.Tensor,
    max_query_len: int,
    scale: float,
) -> None:
    """Write the output rows of every prefill request ``s`` in ``seq_ids`` into ``out``.

    Shapes as in ``decode_attention.paged_decode_attention``; ``max_query_len`` bounds the new
    tokens of any of these requests (it sizes the grid; surplus tiles exit at once).
    """
    num_prefills = seq_ids.shape[0]
    if num_prefills == 0 or max_query_len == 0:
        return
    kind = KINDS[q.dtype]
    num_kv_heads, block_size, head_dim = k_cache.shape[2], k_cache.shape[1], q.shape[2]
    group = q.shape[1] // num_kv_heads
    rows, _ = tile_shape(head_dim)
    tiles = -(-max_query_len // (rows // group))
    kv_stride = num_kv_heads * head_dim * k_cache.element_size() // 8
    kernel = prefill_kernel(kind, group, head_dim, block_size)
    kernel[(tiles, num_kv_heads, num_prefills), THREADS, stream_for(q)](
        words(out), words(q), words(k_cache.view(-1)), words(v_cache.view(-1)),
        *(array_view(t) for t in (block_tables, seq_lens, query_start_loc, seq_ids)),
        np.int64(kv_stride), np.float32(scale * math.log2(math.e)),
    )
