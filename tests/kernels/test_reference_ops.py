"""The torch reference ops against naive float64 restatements of their math."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from yaie.kernels import (
    apply_rotary,
    build_cos_sin_cache,
    fused_add_layer_norm,
    fused_add_rms_norm,
    gelu_tanh,
    layer_norm,
    linear,
    pack_weight,
    paged_attention,
    rms_norm,
    silu_and_mul,
    write_kv,
)
from yaie.kernels.attention import paged_attention_reference
from yaie.kernels.linear import (
    GEMV_MAX_ROWS,
    linear_partials,
    split_k_parts,
    split_k_products,
)
from yaie.model.attention import AttentionMetadata


def _close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """fp32 results against float64 truth: a few ulps of fp32 accumulation error allowed."""
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


def _naive_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (3, 5, 32)])
def test_rms_norm(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    _close(rms_norm(x, w, 1e-5), _naive_rms_norm(x, w, 1e-5))


def test_rms_norm_bf16_keeps_dtype_and_computes_in_fp32() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(4, 256).bfloat16() * 50, torch.randn(256).bfloat16()
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == torch.bfloat16
    _close(out, _naive_rms_norm(x, w, 1e-6), tol=2e-2)


def test_fused_add_rms_norm_updates_residual_in_place() -> None:
    torch.manual_seed(0)
    x, residual, w = torch.randn(5, 48), torch.randn(5, 48), torch.randn(48)
    expected_sum = x.double() + residual.double()
    out = fused_add_rms_norm(x, residual, w, 1e-6)
    _close(residual, expected_sum)
    _close(out, _naive_rms_norm(expected_sum, w, 1e-6))


def test_fused_add_rms_norm_sums_split_k_partials() -> None:
    """``x`` as ``[S, T, H]`` partial sums: all of them go into the residual."""
    torch.manual_seed(0)
    x, residual, w = torch.randn(3, 5, 48), torch.randn(5, 48), torch.randn(48)
    expected_sum = x.double().sum(0) + residual.double()
    out = fused_add_rms_norm(x, residual, w, 1e-6)
    _close(residual, expected_sum)
    _close(out, _naive_rms_norm(expected_sum, w, 1e-6))


def test_silu_and_mul() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 2 * 40)
    gate, up = x.double()[:, :40], x.double()[:, 40:]
    expected = gate / (1 + torch.exp(-gate)) * up
    out = silu_and_mul(x)
    assert out.shape == (6, 40) and out.is_contiguous()
    _close(out, expected)


def _naive_layer_norm(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float
) -> torch.Tensor:
    centered = x.double() - x.double().mean(-1, keepdim=True)
    std = torch.sqrt((centered**2).mean(-1, keepdim=True) + eps)
    return centered / std * w.double() + b.double()


@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (3, 5, 32)])
def test_layer_norm(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(shape) * 3 + 40, torch.randn(shape[-1]), torch.randn(shape[-1])
    _close(layer_norm(x, w, b, 1e-5), _naive_layer_norm(x, w, b, 1e-5))


def test_fused_add_layer_norm_updates_residual_in_place() -> None:
    torch.manual_seed(0)
    x, residual = torch.randn(5, 48), torch.randn(5, 48)
    w, b = torch.randn(48), torch.randn(48)
    expected_sum = x.double() + residual.double()
    out = fused_add_layer_norm(x, residual, w, b, 1e-5)
    _close(residual, expected_sum)
    _close(out, _naive_layer_norm(expected_sum, w, b, 1e-5))


def test_gelu_tanh() -> None:
    x = torch.linspace(-6, 6, 97).view(1, 97)
    v = x.double()
    expected = 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    out = gelu_tanh(x)
    assert out.shape == x.shape
    _close(out, expected)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 33])
def test_linear_packed_and_plain(bias: bool, rows: int) -> None:
    """Packed weights take the numba ``gemv`` up to ``GEMV_MAX_ROWS`` rows, oneDNN above."""
    torch.manual_seed(0)
    w, x = torch.randn(48, 40), torch.randn(rows, 40)
    b = torch.randn(48) if bias else None
    expected = x.double() @ w.double().T + (b.double() if bias else 0)
    _close(linear(x, w, b), expected)
    packed = pack_weight(w)
    assert packed is not None  # CPU fp32: the oneDNN path is the one the model uses
    _close(linear(x, w, b, packed), expected)


@pytest.mark.parametrize("parts", [2, 4])
def test_split_k_products_sum_to_the_product(parts: int) -> None:
    """The batched GEMM over strided slices of the weight: its partials add up to ``x W^T``."""
    torch.manual_seed(0)
    w, x = torch.randn(24, 64), torch.randn(3, 64)
    products = split_k_products(x, w, parts)
    assert products.shape == (parts, 3, 24)
    _close(products.sum(0), x.double() @ w.double().T)
    _close(products[-1], x[:, -64 // parts:].double() @ w[:, -64 // parts:].double().T)


def test_linear_partials_is_one_product_off_cuda() -> None:
    w, x = torch.randn(24, 64), torch.randn(3, 64)
    assert split_k_parts(x, w, None) == 1
    _close(linear_partials(x, w, None), x.double() @ w.double().T)


# --- rotary ------------------------------------------------------------------------------------


def _meta_llama3_scaling(freqs: list[float], s: dict) -> list[float]:
    """Meta's reference ``apply_scaling`` (llama-models), in Python floats."""
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            out.append((1 - smooth) * freq / s["factor"] + smooth * freq)
    return out


_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                          {"type": "linear", "factor": 2.0}, _LLAMA3])
def test_cos_sin_cache_matches_float64_angles(rope_scaling: dict | None) -> None:
    head_dim, max_pos, base = 32, 200, 10000.0
    freqs = [base ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    if rope_scaling and rope_scaling.get("rope_type") == "llama3":
        freqs = _meta_llama3_scaling(freqs, rope_scaling)
        assert len({round(f, 12) for f in freqs}) == len(freqs)  # all three bands exercised
    elif rope_scaling:
        freqs = [f / rope_scaling["factor"] for f in freqs]
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * torch.tensor(freqs)[None]
    cache = build_cos_sin_cache(head_dim, max_pos, base, rope_scaling, torch.float32)
    assert cache.shape == (max_pos, 2, head_dim) and cache.dtype == torch.float32
    cos, sin = angles.cos(), angles.sin()
    expected = torch.stack((torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), dim=1)
    torch.testing.assert_close(cache.double(), expected, rtol=0, atol=2e-5)


def test_llama3_bands_are_exercised() -> None:
    freqs = [10000.0 ** (-2 * i / 32) for i in range(16)]
    wavelens = [2 * math.pi / f for f in freqs]
    low, high = 64 / 1.0, 64 / 4.0
    assert any(w < high for w in wavelens) and any(w > low for w in wavelens)
    assert any(high <= w <= low for w in wavelens)


def test_unknown_rope_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'.*llama3"):
        build_cos_sin_cache(32, 16, 10000.0, {"rope_type": "yarn", "factor": 4.0}, torch.float32)


def _complex_rotary(
    x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, neox: bool
) -> torch.Tensor:
    """Rotation as complex multiplication: pair ``(a, b)`` is ``a + ib``, times ``e^{i p f}``."""
    x = x.double()
    half = x.shape[-1] // 2
    a, b = (x[..., :half], x[..., half:]) if neox else (x[..., 0::2], x[..., 1::2])
    angles = pos.double()[:, None] * freqs.double()
    z = torch.complex(a, b) * torch.polar(torch.ones_like(angles), angles)[:, None]
    if neox:
        return torch.cat((z.real, z.imag), dim=-1)
    return torch.stack((z.real, z.imag), dim=-1).flatten(-2)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (6, 2), (5, 1)])
def test_apply_rotary_in_place_on_fused_qkv_views(
    is_neox: bool, num_heads: int, num_kv_heads: int
) -> None:
    torch.manual_seed(0)
    tokens, head_dim, base = 9, 16, 10000.0
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    q = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim]
    k = k.view(tokens, num_kv_heads, head_dim)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    positions = torch.tensor([0, 1, 2, 3, 17, 5, 99, 100, 63])
    freqs = torch.tensor([base ** (-2 * i / head_dim) for i in range(head_dim // 2)])
    expected_q = _complex_rotary(q, positions, freqs, is_neox)
    expected_k = _complex_rotary(k, positions, freqs, is_neox)
    cache = build_cos_sin_cache(head_dim, 128, base, None, torch.float32)
    apply_rotary(positions, q, k, cache, is_neox=is_neox)
    _close(q, expected_q)
    _close(k, expected_k)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)


# --- KV cache write ----------------------------------------------------------------------------


def test_write_kv_scatters_by_slot_and_skips_padding() -> None:
    torch.manual_seed(0)
    num_blocks, block_size, heads, dim = 6, 4, 3, 8
    k_cache = torch.zeros(num_blocks, block_size, heads, dim)
    v_cache = torch.zeros(num_blocks, block_size, heads, dim)
    slots = torch.tensor([9, -1, 0, 23, -1, 14])
    k, v = torch.randn(6, heads, dim), torch.randn(6, heads, dim)
    write_kv(k, v, k_cache, v_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(k_cache[slot // block_size, slot % block_size], k[t])
            assert torch.equal(v_cache[slot // block_size, slot % block_size], v[t])
    written = {9, 0, 23, 14}
    untouched = [s for s in range(num_blocks * block_size) if s not in written]
    assert not k_cache.flatten(0, 1)[untouched].any() and not v_cache.flatten(0, 1)[untouched].any()


# --- paged attention ---------------------------------------------------------------------------


def _run_paged_attention(
    requests: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    seed: int,
    head_dim: int = 16,
    in_order: bool = False,
) -> AttentionMetadata:
    """``requests`` are ``(cached prefix length, new tokens)``; checks every query row.

    Blocks are handed out shuffled, or ``in_order`` (each context then is one run of blocks).
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    blocks_needed = [-(-(p + n) // block_size) for p, n in requests]
    num_blocks = sum(blocks_needed) + 3
    free = list(range(num_blocks))
    if in_order:
        free.reverse()  # pop() yields 0, 1, 2, ...
    else:
        rng.shuffle(free)
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    # Stale garbage in the free blocks: masked-out reads must not matter.
    k_cache.normal_()
    v_cache.normal_()

    query_start_loc, seq_lens, block_tables, slot_mapping = [0], [], [], []
    qs, contexts = [], []
    for (prefix, new), nb in zip(requests, blocks_needed):
        table = [free.pop() for _ in range(nb)]
        seq_len = prefix + new
        slots = [table[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        k = torch.randn(seq_len, num_kv_heads, head_dim)
        v = torch.randn(seq_len, num_kv_heads, head_dim)
        # The cached prefix was written by earlier steps.
        prefix_slots = torch.tensor(slots[:prefix], dtype=torch.int64)
        write_kv(k[:prefix], v[:prefix], k_cache, v_cache, prefix_slots)
        contexts.append((k, v, prefix))
        qs.append(torch.randn(new, num_heads, head_dim))
        query_start_loc.append(query_start_loc[-1] + new)
        seq_lens.append(seq_len)
        block_tables.append(table)
        slot_mapping += slots[prefix:]

    meta = AttentionMetadata.build(
        query_start_loc, seq_lens, block_tables, slot_mapping, block_size, "cpu"
    )
    new_k = torch.cat([k[p:] for k, _, p in contexts])
    new_v = torch.cat([v[p:] for _, v, p in contexts])
    write_kv(new_k, new_v, k_cache, v_cache, meta.slot_mapping)
    scale = head_dim**-0.5
    # The model's dispatch (the numba CPU kernel for decodes), and the torch reference.
    for attend in (paged_attention, paged_attention_reference):
        out = attend(torch.cat(qs), k_cache, v_cache, meta, scale)
        assert out.shape == (query_start_loc[-1], num_heads, head_dim)
        group = num_heads // num_kv_heads
        for i, (q, (k, v, prefix)) in enumerate(zip(qs, contexts)):
            k64 = k.double().repeat_interleave(group, dim=1)  # [S, Hq, D]
            v64 = v.double().repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,shd->hqs", q.double(), k64) * scale
            query_pos = torch.arange(prefix, prefix + q.shape[0])
            visible = torch.arange(k.shape[0])[None, :] <= query_pos[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
            expected = torch.einsum("hqs,shd->qhd", scores.softmax(-1), v64)
            got = out[query_start_loc[i] : query_start_loc[i + 1]]
            _close(got, expected)
    return meta


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(3, 3), (4, 1), (6, 2), (8, 2), (8, 1)])
def test_paged_attention_mixed_batch(block_size: int, num_heads: int, num_kv_heads: int) -> None:
    requests = [
        (0, 7),  # fresh prefill
        (37, 1),  # decode, context not a multiple of the block size
        (21, 12),  # prefill chunk over a cached prefix
        (5, 1),  # decode with a shorter context: padded and masked
        (0, 1),  # one-token prompt
        (64, 1),  # decode at an exact block boundary
        (40, 33),  # long chunk spanning blocks
    ]
    _run_paged_attention(requests, num_heads, num_kv_heads, block_size, seed=block_size)


@pytest.mark.parametrize(
    "requests",
    [
        [(0, 19)],  # prefill only: single-segment fast path
        [(3, 1), (50, 1), (17, 1)],  # decodes only, contiguous rows
        [(33, 1)],  # one decode: no mask
        [(16, 1), (16, 1)],  # equal lengths: no mask
        [(8, 5)],  # one chunk over a prefix
    ],
)
def test_paged_attention_single_kind_batches(requests: list[tuple[int, int]]) -> None:
    _run_paged_attention(requests, num_heads=4, num_kv_heads=2, block_size=16, seed=1)


def test_paged_attention_groups_decodes_of_very_different_lengths() -> None:
    requests = [(600, 1), (3, 1), (20, 1), (590, 1), (0, 9), (300, 1)]
    meta = _run_paged_attention(requests, num_heads=6, num_kv_heads=2, block_size=16, seed=3)
    # 601 and 591 together; 301 alone; 21 and 4 together (padding 4 -> 21 is cheap).
    assert sorted(g.max_len for g in meta.decodes) == [21, 301, 601]
    assert sorted(g.num_seqs for g in meta.decodes) == [1, 2, 2]


def test_paged_attention_reads_consecutive_contexts_as_views() -> None:
    requests = [(0, 20), (37, 1), (21, 12)]
    meta = _run_paged_attention(requests, num_heads=4, num_kv_heads=2, block_size=16, seed=4,
                                in_order=True)
    assert all(isinstance(seg.slots, slice) for seg in meta.prefills)
    assert len(meta.decodes) == 1 and isinstance(meta.decodes[0].slots, slice)
    single = _run_paged_attention([(0, 9)], num_heads=4, num_kv_heads=2, block_size=16, seed=5,
                                  in_order=True)
    assert isinstance(single.prefills[0].slots, slice)


@settings(max_examples=30, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.integers(0, 70), st.integers(1, 20)), min_size=1, max_size=6
    ),
    heads=st.sampled_from([(2, 2), (4, 1), (6, 3), (8, 4)]),
    block_size=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_random_batches(
    requests: list[tuple[int, int]], heads: tuple[int, int], block_size: int, seed: int
) -> None:
    _run_paged_attention(requests, heads[0], heads[1], block_size, seed)
