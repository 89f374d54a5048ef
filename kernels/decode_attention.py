"""Paged decode attention in numba.cuda: one new query token per request over its block table.

A decode step is memory-bound: each request's query is one row per head, but its whole context
of K and V must come from device memory. The kernel's job is to read every byte of K and V once,
with wide coalesced loads and enough of them in flight, and to do the softmax without a second
pass over the context. Queries and the output are ``[T, Hq, D]`` rows; the caches are
``[num_blocks, block_size, Hkv, D]`` (see ``yaie.kernels``), read as 8-byte words
(``yaie.kernels._numba``: 4 bf16/fp16 values or 2 fp32 values per load, fp32 arithmetic; numba
has no bfloat16, so a bf16 value is 16 raw bits that become a float32 by ``bits << 16``).

**Who owns what.** Block ``(kv_head, i, part)`` owns decode request ``i``'s KV head ``kv_head``
over partition ``part`` of its context, and with it *all* ``G = Hq / Hkv`` query heads that share
that KV head (grouped-query attention): each K/V row is loaded once and used G times, from
registers. Inside the block, a *token group* of ``LT`` consecutive lanes owns one token at a
time; lane ``l`` of the group holds words ``l, l + LT, ...`` of the token's ``D``-value row
(``LT = min(32, words_per_row / 2)``, two words a lane when ``LT < 32``). A warp thus loads whole
rows (256 contiguous bytes for a bf16 ``D = 128`` head) per instruction. Each iteration, token
group ``k`` takes the run of ``CHUNK`` consecutive tokens after ``k`` earlier runs: the run lies
in one cache block (one block-table lookup). The loop is software-pipelined: while a run is
computed, the ``2 x CHUNK x words_per_lane`` 8-byte K and V loads of the group's next run and
the block-table entry of the run after that are already in flight, so neither round trip to
memory waits on the arithmetic or on the other (about 48 KB in flight per multiprocessor for
bf16 ``D = 128``, continuously: what it takes to cover device-memory latency at full
bandwidth). Without the pipeline, each iteration waited for its table lookup, then for its
rows, and the kernel topped out near 2.9 TB/s on H100 and H200 alike. Index arithmetic in
the loop is unsigned, which spares numba's negative-index checks.

**The math, per token group (online softmax).** Scores are kept in base 2: ``q`` is pre-scaled
by ``scale * log2(e)``, so ``softmax`` needs ``exp2``, one fast hardware instruction. A group
keeps, per query head, a running maximum ``m``, a running sum ``l = sum 2^(s_t - m)`` and an
unnormalised output ``acc = sum 2^(s_t - m) v_t`` over the tokens it has seen. A chunk with new
scores ``s_c`` raises the maximum to ``m' = max(m, max_c s_c)``; old terms are rescaled by
``2^(m - m')`` (``l`` and ``acc`` both; skipped when ``m' = m``, which after the first few
tokens is nearly always), new ones added with weight ``2^(s_c - m')``. Each score
is a dot product spread over the group's lanes, summed by an xor-butterfly of warp shuffles, so
every lane ends with the full score.

**Merging states.** States ``(m_k, l_k, acc_k)`` over disjoint token sets combine into
``M = max_k m_k``, ``l = sum_k l_k 2^(m_k - M)``, ``acc = sum_k acc_k 2^(m_k - M)``: exactly
the state of their union. At the end the token groups of a warp merge pairwise by xor shuffles
(``_merge_warp_groups``), each warp writes its one state to shared memory, and the block's
threads, each owning output words of the G heads, merge the warps': ``out = acc / l``.

**Block width.** A block has 3, 6 or 12 warps (``WARP_CHOICES``), always twelve resident a
multiprocessor; ``plan_decode`` takes the widest whose one wave still holds a block per
``(request, kv_head)`` pair. A wide block eats 96 tokens an iteration (bf16, ``D = 128``), a
narrow one 24: few requests mean few pairs, and then a short context costs a few iterations of
one wide block instead of many of a narrow one. Measured on an H100 (Llama-3-8B heads): one
request of 256 tokens 11.7 us against 14.1 with blocks of three warps, 16 requests of 1,024
tokens 31.8 against 47.6 us.

**Split-KV ("flash-decoding").** A batch of few requests has too few ``(request, kv_head)``
pairs to occupy every multiprocessor, and one block walking a long context alone would leave
the GPU mostly idle and take as many loop iterations as the context has runs. The launch then
gives each pair ``P`` blocks (the grid's third dimension, ``plan_decode``) and each block
takes one partition of the request's *actual* context: ``ceil(len / P)`` tokens rounded up to
whole runs of ``CHUNK`` (so no run straddles a cache block), and at least ``min_part`` tokens
(``MIN_PARTITION_ITERATIONS`` loop iterations' worth unless told otherwise). The length comes from ``seq_lens`` inside
the kernel, so a CUDA graph captured for the longest context still splits a short one evenly;
blocks whose partition starts past the end exit at once, and a context that fits one partition
is written directly, as without a split.

A partition stores its normalised output ``o_p = acc_p / l_p`` and its log-sum-exp
``lse_p = m_p + log2(l_p)`` (fp32). Since ``2^lse_p o_p = sum_{t in p} 2^s_t v_t``,
``LSE = log2 sum_p 2^lse_p`` gives the exact full-context result
``out = sum_p 2^(lse_p - LSE) o_p``, computed with ``max_p lse_p`` subtracted for range. The
merge runs in the same launch, in whichever of the pair's blocks finishes last: each block
publishes its partition (a memory fence, then an atomic increment of the pair's arrival counter)
and the block that sees the count reach the number of partitions resets the counter and merges.
A second kernel for the merge would cost a launch (about 3 us inside a CUDA graph) per layer,
more than the merge itself at batch 1.

**Rotary and the K/V store inside (``DecodeRope``).** Between the QKV projection and
attention, the Llama family normalises q and k per head (Qwen3), rotates them and stores k and v
in the cache: for a decode step that is a launch of its own per layer (``rotary_write_kv``),
2.9 us at batch 1 for a few KB of work. Given ``rope``, this kernel does it instead, for steps
of decodes only. Each block rotates its own query heads as it loads them. A lane's words of a
head row are ``gl + LT j``, so the NeoX pairs (value ``d`` with ``d + D / 2``) are words ``j``
and ``j + wpl / 2`` of the same lane, and an RMSNorm is one more ``group_sum``. The block whose
partition ends the context (one per ``(request, KV head)``) also rotates the new key and stores
it and the value. Its token groups must not wait for that store to attend to the new token,
so they replace the new token's words in their run by the registers they were computed in (the
row they loaded is stale): the first run's loads are issued before any of this, and nothing
waits on a barrier. Measured on an H100 (Qwen3-0.6B, batch 1, ``scripts/profile_gpu_step.py``):
8.2 us a layer for the fused kernel, against 6.2 + 2.9 us for the two.

``yaie.bench.attention_kernels`` measures the kernel against the copy bandwidth and torch SDPA.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from yaie.kernels._numba import (
    F32,
    KINDS,
    NEG_SCORE,
    SIMULATOR,
    array_view,
    arrival_counters,
    cuda,
    integers,
    pack,
    rounded,
    runs_here,
    stream_for,
    unpack,
    words,
    words_fit,
)
from yaie.kernels.rotary_kv import QKNorm, rope_operands_fit

RESIDENT_WARPS = 12
"""Decode warps resident per multiprocessor. The bf16, GQA-4, head-dim-128 kernel takes 168
registers a thread (its K/V words for two runs of tokens are live at once, see the loop), so a
multiprocessor's 64K registers hold twelve of its warps. Every block width below is compiled
with the launch bound that keeps twelve resident (at most 170 registers a thread): without it,
4 requests x 32k tokens (512 blocks of three warps) took 222.7 us on an H100, with it 199.4 us,
since above 170 registers only three such blocks fit a multiprocessor and 512 need two waves."""

WARP_CHOICES = (12, 6, 3)
"""Warps per decode block, widest first: one, two or four blocks a multiprocessor. A batch
takes the widest whose single wave (``multiprocessors x RESIDENT_WARPS / warps`` blocks) still
holds one block per ``(request, KV head)`` pair. A 64-request Llama-3-8B batch (512 pairs)
needs blocks of three (528 resident on an H100). One request has only eight pairs: blocks of
twelve warps take 96 tokens an iteration instead of 24, so a short context is a few iterations
of one block instead of many of a small one, or split among partitions and merged."""

CHUNK = 4
"""Tokens a token group loads per iteration before using any of them."""

MAX_PARTITIONS = 16
"""Most partitions per ``(request, KV head)``: the merging block reads every partition's output
for each of its output values, so its time grows with the count."""

MIN_PARTITION_ITERATIONS = 4
"""Loop iterations' worth of tokens a partition gets at least (unless told otherwise): below
this, a short context is cut into so many slivers that their merge costs more than it saves.
Measured on an H100 at batch 1 (Llama-3-8B heads), blocks of three warps, before the merge
loaded several partitions at a time: 256 tokens as 11 one-iteration partitions took 17.5 us,
unsplit 13.4 us."""

MAX_GROUP = 32
"""Most query heads per KV head (the merge keeps a weight per head and partition in shared
memory)."""


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """How a decode launch is cut: ``warps`` per block, ``parts`` partitions per
    ``(request, KV head)`` (1: no split)."""

    warps: int
    parts: int


NO_ROPE, ROPE, QK_NORM_ROPE = 0, 1, 2
"""What the kernel does to the step's new token before attending (compile-time): nothing (its
query is rotated and its K/V are in the cache already), rotary, or Qwen3's q/k RMSNorm then
rotary (``DecodeRope``)."""


@dataclass(frozen=True, slots=True)
class DecodeRope:
    """The work of ``yaie.kernels.rotary_write_kv`` for a decode step, done by the decode kernel.

    ``q`` is then the projection's raw queries, and ``new_kv [T, 2 Hkv, D]`` its raw keys and
    values (the rest of the QKV output); ``positions`` and ``slot_mapping`` are per query row,
    ``cos_sin_cache [max_pos, 2, D]``, ``qk_norm`` Qwen3's ``(q weight, k weight, eps)``.
    """

    new_kv: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor
    qk_norm: QKNorm | None = None


@functools.cache
def _options(warps: int) -> dict:
    """Compile options of a block width: the launch bound that keeps ``RESIDENT_WARPS``."""
    return {} if SIMULATOR else {"launch_bounds": (warps * 32, RESIDENT_WARPS // warps)}


# --- exchanges between lanes of a warp ---------------------------------------------------

if SIMULATOR:
    # The simulator has no warp shuffles: these twins exchange through shared memory, with two
    # barriers for the whole array (every thread of the block must call them).

    @cuda.jit(device=True)
    def _staged(values):
        """Shared scratch holding every thread's local array ``values [a, b]`` as its row,
        after a barrier (the simulator runs Python: a device function may return it)."""
        scratch = cuda.shared.array((1024, 64), np.float32)
        cols = values.shape[1]
        for a in range(values.shape[0]):
            for b in range(cols):
                scratch[cuda.threadIdx.x, a * cols + b] = values[a, b]
        cuda.syncthreads()
        return scratch

    @cuda.jit(device=True)
    def group_sum(values, lanes):
        """Sum every entry of the local array ``values [a, b]`` over each aligned group of
        ``lanes`` lanes; all lanes get the sums."""
        scratch = _staged(values)
        tid = cuda.threadIdx.x
        cols = values.shape[1]
        first = tid - tid % lanes
        for a in range(values.shape[0]):
            for b in range(cols):
                total = np.float32(0.0)
                for other in range(first, first + lanes):
                    total += scratch[other, a * cols + b]
                values[a, b] = total
        cuda.syncthreads()

    @cuda.jit(device=True)
    def xor_exchange(values, width):
        """Replace the local array ``values [a, b]`` by lane ``lane ^ width``'s."""
        scratch = _staged(values)
        cols = values.shape[1]
        for a in range(values.shape[0]):
            for b in range(cols):
                values[a, b] = scratch[cuda.threadIdx.x ^ width, a * cols + b]
        cuda.syncthreads()

else:

    @cuda.jit(device=True)
    def xor_exchange(values, width):
        """Replace the local array ``values [a, b]`` by lane ``lane ^ width``'s (one shuffle
        an entry)."""
        for a in range(values.shape[0]):
            for b in range(values.shape[1]):
                values[a, b] = cuda.shfl_xor_sync(0xFFFFFFFF, values[a, b], width)

    @cuda.jit(device=True)
    def group_sum(values, lanes):
        """Sum every entry of the local array ``values [a, b]`` over each aligned group of
        ``lanes`` lanes by an xor butterfly of warp shuffles (log2(lanes) steps an entry);
        all lanes get the sums."""
        for a in range(values.shape[0]):
            for b in range(values.shape[1]):
                width = lanes // 2
                while width > 0:
                    values[a, b] += cuda.shfl_xor_sync(0xFFFFFFFF, values[a, b], width)
                    width //= 2


@cuda.jit(device=True)
def _merge_warp_groups(m, lsum, acc, theirs, lanes):
    """Merge the online-softmax states ``(m, lsum, acc)`` of a warp's token groups (aligned
    groups of ``lanes`` lanes) pairwise across groups, ``theirs [1, 2 + per-lane values]`` being
    scratch for the partner's state: afterwards each lane holds the warp's merged state for its
    words. Every thread of the block must call it (the simulator's exchange is a barrier)."""
    width = lanes
    while width < 32:
        for g in range(m.shape[0]):
            theirs[0, 0] = m[g]
            theirs[0, 1] = lsum[g]
            for e in range(acc.shape[1]):
                theirs[0, 2 + e] = acc[g, e]
            xor_exchange(theirs, width)
            top = max(m[g], theirs[0, 0])
            mine = math.exp2(m[g] - top)
            weight = math.exp2(theirs[0, 0] - top)
            lsum[g] = lsum[g] * mine + theirs[0, 1] * weight
            for e in range(acc.shape[1]):
                acc[g, e] = acc[g, e] * mine + theirs[0, 2 + e] * weight
            m[g] = top
        width *= 2


# --- geometry ---------------------------------------------------------------------------------


@functools.cache
def lane_layout(kind: int, head_dim: int) -> tuple[int, int] | None:
    """``(lanes per token, words per lane)`` for a head row, or None when unsupported.

    A row of ``head_dim`` values is ``head_dim * itemsize / 8`` words; a token group of
    ``LT`` lanes (a power of two dividing 32) covers it with ``row_words / LT`` words a lane.
    """
    vec = 2 if kind == F32 else 4
    if head_dim % vec:
        return None
    row_words = head_dim // vec
    lanes = min(32, row_words // 2)
    if lanes < 1 or 32 % lanes or row_words % lanes:
        return None
    return lanes, row_words // lanes


def decode_fits(group: int, head_dim: int, warps: int) -> bool:
    """Whether a block of ``warps`` warps fits its static shared memory (at most 48 KiB): each
    warp's merged state for ``group`` heads, and the split merge's weights."""
    merge_bytes = warps * group * (head_dim + 2) * 4 + MAX_GROUP * MAX_PARTITIONS * 4
    return merge_bytes <= 48 * 1024


def tokens_per_iteration(kind: int, head_dim: int, warps: int) -> int:
    """Context tokens one decode block of ``warps`` warps consumes per loop iteration."""
    lanes, _ = lane_layout(kind, head_dim)
    return CHUNK * warps * (32 // lanes)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the simulator: a small pretend GPU, so tests exercise every plan
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_decode(
    num_decodes: int, num_kv_heads: int, max_seq_len: int, kind: int, group: int,
    head_dim: int, device: torch.device,
) -> DecodePlan:
    """Block width and partitions per ``(request, KV head)`` for a decode batch.

    The widest blocks (``WARP_CHOICES``) whose one wave holds a block per pair and whose states
    fit shared memory; then enough partitions to fill that wave: a batch of 64 requests x 8 KV
    heads fills an H100 with blocks of three warps and is not split, one request gets blocks of
    twelve cut into up to ``MAX_PARTITIONS`` pieces. Never more partitions than ``max_seq_len``
    has partitions of ``MIN_PARTITION_ITERATIONS`` loop iterations.
    """
    pairs = max(1, num_decodes * num_kv_heads)
    sms = _num_sms(device)
    fitting = [w for w in WARP_CHOICES if decode_fits(group, head_dim, w)]
    warps = next((w for w in fitting if pairs <= sms * (RESIDENT_WARPS // w)), fitting[-1])
    fill = sms * (RESIDENT_WARPS // warps) // pairs
    iteration = tokens_per_iteration(kind, head_dim, warps)
    most = _ceil_div(max_seq_len, MIN_PARTITION_ITERATIONS * iteration)
    return DecodePlan(warps, max(1, min(fill, MAX_PARTITIONS, most)))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- kernels ----------------------------------------------------------------------------------


@cuda.jit(device=True)
def _norm_rotate(x, squares, weight, cos_sin, pos, eps, gl, lanes, rope, kind):
    """Rows ``x [n, per_lane]`` of this lane's values (word ``j`` of the lane is word
    ``gl + lanes * j`` of the head row) become what ``rotary_write_kv`` stores: RMS-normalised
    by ``weight`` when ``rope == QK_NORM_ROPE`` (``squares [n, 1]`` scratch), rounded, rotated
    (NeoX: value ``d`` pairs with ``d + D / 2``, which is this lane's word ``j + wpl / 2``), and
    rounded again, as the unfused ops store between steps. Every thread must call it."""
    vec = 2 if kind == F32 else 4
    wpl = x.shape[1] // vec
    half = wpl // 2
    if rope == QK_NORM_ROPE:
        for r in range(x.shape[0]):
            total = np.float32(0.0)
            for d in range(x.shape[1]):
                total += x[r, d] * x[r, d]
            squares[r, 0] = total
        group_sum(squares, lanes)
        head_dim = x.shape[1] * lanes
        for r in range(x.shape[0]):
            inv_rms = np.float32(1.0) / math.sqrt(squares[r, 0] / np.float32(head_dim) + eps)
            for j in range(wpl):
                w = np.uint64(weight[gl + lanes * j])
                for e in range(vec):
                    d = j * vec + e
                    x[r, d] = rounded(x[r, d] * inv_rms * unpack(w, e, kind), kind)
    for j in range(half):
        cos_word = np.uint64(cos_sin[pos, 0, gl + lanes * j])
        sin_word = np.uint64(cos_sin[pos, 1, gl + lanes * (j + half)])
        for e in range(vec):
            c = unpack(cos_word, e, kind)
            s = unpack(sin_word, e, kind)
            for r in range(x.shape[0]):
                a = x[r, j * vec + e]
                b = x[r, (j + half) * vec + e]
                x[r, j * vec + e] = rounded(a * c - b * s, kind)
                x[r, (j + half) * vec + e] = rounded(b * c + a * s, kind)


@cuda.jit(device=True)
def _load_run(kw, vw, k_cache, v_cache, run, stride, lanes):
    """Load a token group's run into registers: ``kw, vw [chunk, words per lane]`` get this
    lane's words of the run's K and V rows, the first at flat word ``run``, rows ``stride``
    words apart, a lane's words ``lanes`` apart."""
    for c in range(kw.shape[0]):
        for j in range(kw.shape[1]):
            at = run + np.uint64(c) * stride + np.uint64(lanes * j)
            kw[c, j] = np.uint64(k_cache[at])
            vw[c, j] = np.uint64(v_cache[at])


_UNROLL = 4
"""Partitions whose values a merging thread loads before using any (loads in flight)."""


@cuda.jit(device=True)
def _merge_if_last(out, part_out, part_lse, arrivals, row, i, kv_head, parts, group, row_words,
                   vec, kind):
    """Called by every block of a split pair after it wrote its partition: the last of the
    ``parts`` blocks to arrive combines them into ``out[row]`` for the pair's ``group`` heads.

    The fence makes this block's partition visible device-wide before its arrival is counted,
    so the block that counts last reads every partition complete. That block also puts the
    counter back to zero for the next launch (or graph replay). It then turns the partitions'
    ``lse_p`` into weights ``2^(lse_p - LSE)`` in shared memory (one load per thread, then one
    thread per head), and thread ``t`` owns output words ``t, t + blockDim, ...``, loading the
    ``o_p`` values of ``_UNROLL`` partitions at a time, so that many loads are in flight
    instead of one round trip to L2 per partition.
    """
    last = cuda.shared.array(1, np.int32)
    weights = cuda.shared.array((MAX_GROUP, MAX_PARTITIONS), np.float32)
    tid = cuda.threadIdx.x
    cuda.threadfence()
    cuda.syncthreads()
    if tid == 0:
        counter = i * cuda.gridDim.x + kv_head
        arrived = cuda.atomic.add(arrivals, counter, 1) + 1
        last[0] = 1 if arrived == parts else 0
        if arrived == parts:
            arrivals[counter] = 0
    cuda.syncthreads()
    if last[0] == 0:
        return
    cuda.threadfence()
    first_head = kv_head * group
    for t in range(tid, group * parts, cuda.blockDim.x):
        weights[t // parts, t % parts] = part_lse[i, first_head + t // parts, t % parts]
    cuda.syncthreads()
    for g in range(tid, group, cuda.blockDim.x):
        top = NEG_SCORE
        for p in range(parts):
            top = max(top, weights[g, p])
        total = np.float32(0.0)
        for p in range(parts):
            weights[g, p] = math.exp2(weights[g, p] - top)
            total += weights[g, p]
        for p in range(parts):
            weights[g, p] /= total
    cuda.syncthreads()
    vals = cuda.local.array((_UNROLL, 4), np.float32)
    for item in range(tid, group * row_words, cuda.blockDim.x):
        g = item // row_words
        w = item % row_words
        acc = cuda.local.array(4, np.float32)
        for e in range(vec):
            acc[e] = np.float32(0.0)
        for p0 in range(0, parts, _UNROLL):
            for u in range(_UNROLL):  # clamped, not guarded: the loads issue together
                p = min(p0 + u, parts - 1)
                for e in range(vec):
                    vals[u, e] = part_out[i, first_head + g, p, w * vec + e]
            for u in range(_UNROLL):
                if p0 + u < parts:
                    for e in range(vec):
                        acc[e] += weights[g, p0 + u] * vals[u, e]
        word = np.uint64(0)
        for e in range(vec):
            word |= pack(acc[e], e, kind)
        out[row, first_head + g, w] = word


@functools.cache
def decode_kernel(kind: int, group: int, head_dim: int, block_size: int, split: bool,
                  warps: int, rope: int = NO_ROPE):
    """The decode kernel for one storage kind, GQA group size, head dim, block size and block
    width (``warps``).

    These are compile-time constants (closure cells, folded by numba): they size the per-lane
    register arrays and unroll every inner loop. ``split`` compiles in the split-KV path:
    partitions sized from the context, and the merge by the pair's last block. ``rope``
    (``DecodeRope``) compiles in the new token's q/k norm, rotary and K/V store.
    ``fastmath`` makes ``exp2`` the bare
    ``ex2.approx.ftz`` instruction (2 ulp; denormal weights flush to 0, which softmax never
    misses) instead of a four-instruction range-checked sequence.
    """
    lanes, wpl = lane_layout(kind, head_dim)
    vec = 2 if kind == F32 else 4
    per_lane = wpl * vec
    groups_per_warp = 32 // lanes
    n_groups = warps * groups_per_warp
    chunk = CHUNK
    step = chunk * n_groups
    row_words = head_dim // vec
    threads = warps * 32
    state_size = 2 + per_lane  # a token group's (m, lsum, acc) for one head, as one lane has it

    @cuda.jit(cache=True, fastmath=True, **_options(warps))
    def paged_decode(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, seq_ids,
                     kv_stride, scale_log2, min_part, part_out, part_lse, arrivals,
                     new_kv, positions, cos_sin, q_weight, k_weight, slot_mapping, eps):
        """out/q: words ``[T, Hq, W]``; caches: flat words (row ``slot * Hkv + kv_head``,
        ``kv_stride = Hkv * W`` words a slot). Split only: ``min_part`` tokens at least a
        partition, part_out ``[n, Hq, P, D]`` and part_lse ``[n, Hq, P]`` fp32, ``arrivals``
        int32 counters, one per ``(request, kv_head)``, zero between launches. ``rope`` only:
        ``new_kv`` words ``[T, 2 Hkv, W]``, positions and slot_mapping ``[T]``, cos_sin words
        ``[max_pos, 2, W]``, the q/k norm weights words ``[W]``, and their ``eps``."""
        kv_head = cuda.blockIdx.x
        i = cuda.blockIdx.y
        part = cuda.blockIdx.z
        seq = seq_ids[i]
        seq_len = seq_lens[seq]
        per_part = seq_len
        parts = 1
        if split:  # from this request's length: whole runs, at least min_part tokens
            n_parts = cuda.gridDim.z
            share = (seq_len + n_parts - 1) // n_parts
            per_part = max(min_part, (share + chunk - 1) // chunk * chunk)
            parts = (seq_len + per_part - 1) // per_part
        begin = part * per_part
        if begin >= seq_len:
            return
        end = min(seq_len, begin + per_part)
        row = query_start_loc[seq]
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        token_group = warp * groups_per_warp + lane // lanes
        gl = lane % lanes

        kw = cuda.local.array((chunk, wpl), np.uint64)
        vw = cuda.local.array((chunk, wpl), np.uint64)
        kn = cuda.local.array((chunk, wpl), np.uint64)
        vn = cuda.local.array((chunk, wpl), np.uint64)
        s = cuda.local.array((chunk, group), np.float32)
        # Hot-loop index arithmetic is unsigned: numba then skips its negative-index
        # wraparound, and division by the (power-of-two) block size is a shift.
        table = block_tables[seq]
        stride = np.uint64(kv_stride)
        stop = np.uint64(end)
        last = stop - np.uint64(1)
        bs = np.uint64(block_size)
        jump = np.uint64(step)
        lane_word = np.uint64(kv_head * row_words + gl)

        # Software pipeline. Each iteration, this group's run of ``chunk`` consecutive tokens
        # lies in one cache block (``chunk`` divides the block size and partitions start at
        # multiples of it): one block-table lookup, then rows ``kv_stride`` words apart. While
        # a run is computed, the K and V words of the group's next run and the cache block of
        # the run after that are already in flight, so neither the table lookup nor the row
        # loads wait on the arithmetic. Rows are loaded unconditionally: a run reaching past
        # the context reads stale rows of a block the request owns (finite, see
        # ``yaie.kernels``) and those tokens are masked out below.
        t0 = np.uint64(begin + token_group * chunk)
        run = (np.uint64(table[min(t0, last) // bs]) * bs + t0 % bs) * stride + lane_word
        _load_run(kw, vw, k_cache, v_cache, run, stride, lanes)
        blk_next = np.uint64(table[min(t0 + jump, last) // bs])

        # This lane's slice of the G query rows, pre-scaled into base-2 logits.
        qf = cuda.local.array((group, per_lane), np.float32)
        for g in range(group):
            for j in range(wpl):
                word = np.uint64(q[row, kv_head * group + g, gl + lanes * j])
                for e in range(vec):
                    qf[g, j * vec + e] = unpack(word, e, kind)
        # With ``rope``, the new token's K/V words as the cache will hold them: the block
        # whose partition ends the context stores them, and its token groups use these
        # registers for the new token instead of its (not yet stored) cache row, so no load
        # waits for the store.
        k_new = cuda.local.array(wpl, np.uint64)
        v_new = cuda.local.array(wpl, np.uint64)
        newest = np.uint64(seq_len)  # past every partition: no token is replaced
        if rope != NO_ROPE:
            pos = positions[row]
            squares = cuda.local.array((group, 1), np.float32)
            _norm_rotate(qf, squares, q_weight, cos_sin, pos, eps, gl, lanes, rope, kind)
            if end == seq_len:
                newest = np.uint64(seq_len - 1)
                kf = cuda.local.array((1, per_lane), np.float32)
                value_head = kv_stride // row_words + kv_head  # after the Hkv key heads
                for j in range(wpl):
                    word = np.uint64(new_kv[row, kv_head, gl + lanes * j])
                    v_new[j] = np.uint64(new_kv[row, value_head, gl + lanes * j])
                    for e in range(vec):
                        kf[0, j * vec + e] = unpack(word, e, kind)
                k_squares = cuda.local.array((1, 1), np.float32)
                _norm_rotate(kf, k_squares, k_weight, cos_sin, pos, eps, gl, lanes, rope, kind)
                slot = slot_mapping[row]
                at = np.uint64(slot) * stride + lane_word
                for j in range(wpl):
                    word = np.uint64(0)
                    for e in range(vec):
                        word |= pack(kf[0, j * vec + e], e, kind)
                    k_new[j] = word
                    if token_group == 0 and slot >= 0:
                        k_cache[at + np.uint64(lanes * j)] = word
                        v_cache[at + np.uint64(lanes * j)] = v_new[j]
        for g in range(group):
            for d in range(per_lane):
                qf[g, d] *= scale_log2

        m = cuda.local.array(group, np.float32)
        lsum = cuda.local.array(group, np.float32)
        acc = cuda.local.array((group, per_lane), np.float32)
        for g in range(group):
            m[g] = NEG_SCORE
            lsum[g] = np.float32(0.0)
            for e in range(per_lane):
                acc[g, e] = np.float32(0.0)

        for base in range(begin, end, step):
            t_next = t0 + jump
            blk_after = blk_next
            if base + step < end:  # the same for the whole block: no divergence
                run = (blk_next * bs + t_next % bs) * stride + lane_word
                _load_run(kn, vn, k_cache, v_cache, run, stride, lanes)
                blk_after = np.uint64(table[min(t_next + jump, last) // bs])

            if rope != NO_ROPE:
                for c in range(chunk):
                    if t0 + np.uint64(c) == newest:
                        for j in range(wpl):
                            kw[c, j] = k_new[j]
                            vw[c, j] = v_new[j]
            for c in range(chunk):
                for g in range(group):
                    dot = np.float32(0.0)
                    for j in range(wpl):
                        for e in range(vec):
                            dot += qf[g, j * vec + e] * unpack(kw[c, j], e, kind)
                    s[c, g] = dot
            group_sum(s, lanes)
            for c in range(chunk):
                if t0 + np.uint64(c) >= stop:
                    for g in range(group):
                        s[c, g] = NEG_SCORE
            # Online softmax: rescale only when the running maximum rises (rarely, once the
            # first tokens are seen); an unchanged maximum would multiply by 2^0 = 1.
            for g in range(group):
                new_m = m[g]
                for c in range(chunk):
                    new_m = max(new_m, s[c, g])
                if new_m > m[g]:
                    corr = math.exp2(m[g] - new_m)
                    m[g] = new_m
                    lsum[g] *= corr
                    for e in range(per_lane):
                        acc[g, e] *= corr
            # Values, weighted by 2^(s - m); masked tokens weigh 0 and their (stale) rows
            # are replaced by zeros, so not even a non-finite stale value can leak in.
            for c in range(chunk):
                valid = t0 + np.uint64(c) < stop
                for g in range(group):
                    p = math.exp2(s[c, g] - m[g]) if valid else np.float32(0.0)
                    lsum[g] += p
                    for j in range(wpl):
                        word = vw[c, j] if valid else np.uint64(0)
                        for e in range(vec):
                            acc[g, j * vec + e] += p * unpack(word, e, kind)
            for c in range(chunk):
                for j in range(wpl):
                    kw[c, j] = kn[c, j]
                    vw[c, j] = vn[c, j]
            blk_next = blk_after
            t0 = t_next

        # Merge the token groups of each warp by shuffles, then the warps' states through
        # shared memory: warp k's state is row k, written by its first token group.
        theirs = cuda.local.array((1, state_size), np.float32)
        _merge_warp_groups(m, lsum, acc, theirs, lanes)
        sm_acc = cuda.shared.array((warps, group, head_dim), np.float32)
        sm_ml = cuda.shared.array((warps, group, 2), np.float32)
        if lane < lanes:
            for g in range(group):
                for j in range(wpl):
                    for e in range(vec):
                        sm_acc[warp, g, (gl + lanes * j) * vec + e] = acc[g, j * vec + e]
                if gl == 0:
                    sm_ml[warp, g, 0] = m[g]
                    sm_ml[warp, g, 1] = lsum[g]
        cuda.syncthreads()

        # Epilogue: thread owns output words (g, w) of the G heads.
        for item in range(tid, group * row_words, threads):
            g = item // row_words
            w = item % row_words
            head = kv_head * group + g
            top = NEG_SCORE
            for k in range(warps):
                top = max(top, sm_ml[k, g, 0])
            weight = cuda.local.array(warps, np.float32)
            total = np.float32(0.0)
            for k in range(warps):
                weight[k] = math.exp2(sm_ml[k, g, 0] - top)
                total += sm_ml[k, g, 1] * weight[k]
            word = np.uint64(0)
            for e in range(vec):
                d = w * vec + e
                o = np.float32(0.0)
                for k in range(warps):
                    o += sm_acc[k, g, d] * weight[k]
                o = o / total
                if parts > 1:
                    part_out[i, head, part, d] = o
                else:
                    word |= pack(o, e, kind)
            if parts > 1:
                if w == 0:
                    part_lse[i, head, part] = top + math.log2(total)
            else:
                out[row, head, w] = word
        if split and parts > 1:
            _merge_if_last(out, part_out, part_lse, arrivals, row, i, kv_head, parts, group,
                           row_words, vec, kind)

    return paged_decode


# --- launch -----------------------------------------------------------------------------------


def decode_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the numba decode kernel handles these operands where they live."""
    kind = KINDS.get(q.dtype)
    return (
        kind is not None
        and runs_here(q)
        and k_cache.dtype == q.dtype == v_cache.dtype
        and k_cache.shape == v_cache.shape
        and q.shape[1] % k_cache.shape[2] == 0
        and q.shape[1] // k_cache.shape[2] <= MAX_GROUP
        and lane_layout(kind, q.shape[2]) is not None
        and decode_fits(q.shape[1] // k_cache.shape[2], q.shape[2], min(WARP_CHOICES))
        and k_cache.shape[1] % CHUNK == 0
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and words_fit(q)
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_ids: torch.Tensor,
    max_seq_len: int,
    scale: float,
    plan: DecodePlan | None = None,
    min_part_tokens: int | None = None,
    rope: DecodeRope | None = None,
) -> None:
    """Write ``out[query_start_loc[s]]`` for every decode request ``s`` in ``seq_ids``.

    ``q, out [T, Hq, D]`` (``out`` contiguous), caches ``[num_blocks, block_size, Hkv, D]``,
    ``block_tables [num_seqs, max_blocks]``, ``seq_lens``, ``query_start_loc``, ``seq_ids``:
    int32 on ``q``'s device. ``max_seq_len`` bounds every decode's context. ``plan``: block
    width and split-KV partitions (``None``: ``plan_decode``; partitions are clamped to
    ``MAX_PARTITIONS``); the grid depends on it and the batch size alone, so a CUDA graph can
    capture the launch.
    ``min_part_tokens`` (default: ``MIN_PARTITION_ITERATIONS`` loop iterations' tokens; rounded
    up to a multiple of ``CHUNK``) is the shortest partition worth a block of its own.
    ``rope``: ``q`` is unrotated and the new tokens' K/V not yet stored; the kernel does both
    (``DecodeRope``, ``rope_supported``).
    """
    num_decodes = seq_ids.shape[0]
    if num_decodes == 0 or max_seq_len == 0:
        return
    kind = KINDS[q.dtype]
    num_kv_heads, block_size, head_dim = k_cache.shape[2], k_cache.shape[1], q.shape[2]
    group = q.shape[1] // num_kv_heads
    if plan is None:
        plan = plan_decode(num_decodes, num_kv_heads, max_seq_len, kind, group, head_dim,
                           q.device)
    warps, parts = plan.warps, min(plan.parts, MAX_PARTITIONS)
    iteration = tokens_per_iteration(kind, head_dim, warps)
    min_part = min_part_tokens or MIN_PARTITION_ITERATIONS * iteration
    min_part = _ceil_div(min_part, CHUNK) * CHUNK
    split = parts > 1
    stream = stream_for(q)
    scale_log2 = np.float32(scale * math.log2(math.e))
    rank4, rank3 = (num_decodes, q.shape[1], parts, head_dim), (num_decodes, q.shape[1], parts)
    if not split:  # unused by the unsplit kernel, which still needs arrays of the right rank
        rank4, rank3 = (1, 1, 1, 1), (1, 1, 1)
    part_out = torch.empty(rank4, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(rank3, dtype=torch.float32, device=q.device)
    arrivals = arrival_counters(q.device, num_decodes * num_kv_heads if split else 1)
    ints = [array_view(t) for t in (block_tables, seq_lens, query_start_loc, seq_ids)]
    mode = NO_ROPE if rope is None else ROPE if rope.qk_norm is None else QK_NORM_ROPE
    kernel = decode_kernel(kind, group, head_dim, block_size, split, warps, mode)
    kv_stride = k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size() // 8
    kernel[(num_kv_heads, num_decodes, parts), warps * 32, stream](
        words(out), words(q), words(k_cache.view(-1)), words(v_cache.view(-1)), *ints,
        np.int64(kv_stride), scale_log2, np.int32(min_part), array_view(part_out),
        array_view(part_lse), array_view(arrivals), *_rope_arguments(rope, q, seq_ids),
    )


def _rope_arguments(rope: DecodeRope | None, q: torch.Tensor, seq_ids: torch.Tensor) -> tuple:
    """The kernel's ``rope`` arguments; without ``rope``, stand-ins of the right types that
    the kernel never reads."""
    if rope is None:
        new_kv = cos_sin = q[:1]
        positions = slots = seq_ids
        q_weight, k_weight, eps = q[0, 0], q[0, 0], 0.0
    else:
        new_kv, positions, cos_sin = rope.new_kv, rope.positions, rope.cos_sin_cache
        slots = rope.slot_mapping
        q_weight, k_weight, eps = rope.qk_norm or (cos_sin[0, 0], cos_sin[0, 0], 0.0)
    return (words(new_kv), integers(positions), words(cos_sin), words(q_weight),
            words(k_weight), integers(slots), np.float32(eps))


def rope_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   rope: DecodeRope) -> bool:
    """Whether the decode kernel can do ``rope``'s work for these operands (beyond
    ``decode_supported``): NeoX pairs within a lane's words, tables of the cache's dtype."""
    kind = KINDS.get(q.dtype)
    layout = lane_layout(kind, q.shape[2]) if kind is not None else None
    num_kv_heads, head_dim = k_cache.shape[2], q.shape[2]
    return (
        layout is not None
        and layout[1] % 2 == 0
        and decode_supported(q, k_cache, v_cache)
        and rope.new_kv.shape == (q.shape[0], 2 * num_kv_heads, head_dim)
        and words_fit(rope.new_kv)
        and rope_operands_fit(rope.positions, rope.slot_mapping, rope.cos_sin_cache,
                              rope.qk_norm, q.dtype, q.shape[0], head_dim)
    )
