"""The numba CPU kernels against their torch references, and the dispatch that picks them.

``yaie.kernels.elementwise_cpu`` (RMSNorm, fused add + RMSNorm, rotary, rotary + K/V write,
SiLU-and-mul) and ``yaie.kernels.decode_attention_cpu`` (paged decode attention). Each check
draws fresh random inputs, fills every output the kernel writes with NaN first (so an element
it leaves unwritten fails) and compares with the torch reference run in float64 by
‖out − ref‖ / ‖ref‖ (``kernel_helpers.check``). Writes the kernel must not make (K/V rows of
padding tokens, rows of a batch that are not decodes) must leave the NaN in place.
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch
from kernel_helpers import check, check_cache_rows

from yaie.kernels.decode_attention_cpu import paged_decode_attention_cpu
from yaie.model.attention import AttentionMetadata

# Modules, not the package's re-exported functions of the same names.
activation_mod = importlib.import_module("yaie.kernels.activation")
attention_mod = importlib.import_module("yaie.kernels.attention")
cpu = importlib.import_module("yaie.kernels.elementwise_cpu")
rms_norm_mod = importlib.import_module("yaie.kernels.rms_norm")
rotary_mod = importlib.import_module("yaie.kernels.rotary")
rotary_kv_mod = importlib.import_module("yaie.kernels.rotary_kv")

F32 = torch.float32


def _nan(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"))


@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (7, 96), (3, 5, 32), (513, 64)])
def test_rms_norm(shape: tuple[int, ...]) -> None:
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    out = cpu.rms_norm_cpu(x, w, 1e-5, out=_nan(*shape))
    check(out, rms_norm_mod.rms_norm_reference(x.double(), w.double(), 1e-5), F32)


@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (3, 5, 32), (513, 64)])
def test_fused_add_rms_norm(shape: tuple[int, ...]) -> None:
    x, residual, w = torch.randn(shape), torch.randn(shape) * 4, torch.randn(shape[-1])
    expected_residual = residual.double()
    expected = rms_norm_mod.fused_add_rms_norm_reference(
        x.double(), expected_residual, w.double(), 1e-6
    )
    out = cpu.rms_norm_cpu(x, w, 1e-6, residual, out=_nan(*shape))
    check(residual, expected_residual, F32)
    check(out, expected, F32)


@pytest.mark.parametrize("shape", [(1, 2 * 1536), (16, 2 * 1536), (3, 5, 80), (513, 128)])
def test_silu_and_mul(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape) * 4
    x.view(-1)[:4] = torch.tensor([-100.0, -88.5, 88.5, 100.0])  # exp's clamped ends
    out = cpu.silu_and_mul_cpu(x, out=_nan(*shape[:-1], shape[-1] // 2))
    check(out, activation_mod.silu_and_mul_reference(x.double()), F32)


QKV_SHAPES = [(9, 3, 64), (4, 4, 128), (8, 1, 64), (6, 2, 128)]


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), QKV_SHAPES)
def test_apply_rotary_on_fused_qkv_views(
    heads: int, kv_heads: int, head_dim: int, is_neox: bool
) -> None:
    tokens = 5
    table = rotary_mod.build_cos_sin_cache(head_dim, 4096, 10000.0, None, F32)
    positions = torch.randint(0, 4096, (tokens,))
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim)
    expected = qkv.double()
    rotary_mod.apply_rotary_reference(
        positions,
        expected[:, :heads],
        expected[:, heads : heads + kv_heads],
        table.double(),
        is_neox,
    )
    cpu.apply_rotary_cpu(
        positions, qkv[:, :heads], qkv[:, heads : heads + kv_heads], table, is_neox
    )
    check(qkv, expected, F32)


@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), QKV_SHAPES)
def test_rotary_write_kv(
    heads: int, kv_heads: int, head_dim: int, qk_norm: bool, tokens: int
) -> None:
    block_size, num_blocks = 16, 4
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    if tokens > 1:
        slots[tokens // 2] = -1  # padding: q is computed, K/V are not stored
    positions = torch.randint(0, 4096, (tokens,))
    table = rotary_mod.build_cos_sin_cache(head_dim, 4096, 500000.0, None, F32)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim)
    norm = (torch.randn(head_dim), torch.randn(head_dim), 1e-6) if qk_norm else None

    def run(fn, qkv, table, norm, dtype):
        caches = [torch.full(cache_shape, float("nan"), dtype=dtype) for _ in range(2)]
        q = fn(positions, qkv.clone(), heads, kv_heads, table, *caches, slots, norm)
        return q, [c.flatten(0, 1) for c in caches]

    q, caches = run(cpu.rotary_write_kv_cpu, qkv, table, norm, F32)
    double_norm = None if norm is None else (norm[0].double(), norm[1].double(), norm[2])
    ref_q, ref_caches = run(
        rotary_kv_mod.rotary_write_kv_reference,
        qkv.double(),
        table.double(),
        double_norm,
        torch.float64,
    )
    check(q, ref_q, F32)
    check_cache_rows(caches, ref_caches, slots, F32)


def _decode_step(
    contexts: list[int], prefill: int, heads: int, kv_heads: int, head_dim: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A step of one ``prefill``-token prompt chunk (if any) and one decode per context length,
    in shuffled blocks of a cache whose K/V came from earlier steps; q of every row."""
    rng = random.Random(len(contexts) * 1000 + heads)
    lens = ([prefill] if prefill else []) + contexts
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 1  # block 0 unused, as the engine pads tables with it
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in needed]
    query_lens = ([prefill] if prefill else []) + [1] * len(contexts)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    slots = [
        t[p // block_size] * block_size + p % block_size
        for t, n, q in zip(tables, lens, query_lens)
        for p in range(n - q, n)
    ]
    meta = AttentionMetadata.build(starts, lens, tables, slots, block_size, "cpu")
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(starts[-1], heads, head_dim), k_cache, torch.randn_like(k_cache), meta


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(9, 3, 64, 16), (4, 4, 128, 16), (8, 1, 64, 32), (16, 4, 128, 16)],
)
@pytest.mark.parametrize(
    ("contexts", "prefill"),
    [([1, 2, 3, 4, 5], 0), ([130] * 3 + [97, 161], 0), ([7, 40, 1000], 12)],
    ids=["tiny", "batch16-like", "mixed"],
)
def test_decode_attention(
    contexts: list[int],
    prefill: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
) -> None:
    """Contexts shorter than the kernel's four lanes, of every remainder mod 4 and across
    partly filled blocks; in a mixed step only the decode rows are the kernel's to write."""
    q, k_cache, v_cache, meta = _decode_step(
        contexts, prefill, heads, kv_heads, head_dim, block_size
    )
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    paged_decode_attention_cpu(
        q,
        k_cache,
        v_cache,
        out,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.decode_ids,
        scale,
    )
    expected = attention_mod.paged_attention_reference(
        q.double(), k_cache.double(), v_cache.double(), meta, scale
    )
    decode_rows = meta.query_start_loc[meta.decode_ids.long()].long()
    check(out[decode_rows], expected[decode_rows], F32)
    assert out[:prefill].isnan().all(), "the kernel wrote a row that is not a decode"


# --- dispatch -------------------------------------------------------------------------------------


def _spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Count the calls ``module`` makes to its ``name`` (still running it)."""
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_takes_the_cpu_kernels_for_float32_only(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """The model's entry points run the CPU kernels on float32 CPU tensors; on bfloat16 (numba
    has no bfloat16) they give exactly the torch references' results."""
    kernel = dtype == torch.float32
    norm_calls = _spy(monkeypatch, rms_norm_mod, "rms_norm_cpu")
    rotary_calls = _spy(monkeypatch, rotary_mod, "apply_rotary_cpu")
    kv_calls = _spy(monkeypatch, rotary_kv_mod, "rotary_write_kv_cpu")
    silu_calls = _spy(monkeypatch, activation_mod, "silu_and_mul_cpu")

    x, w = torch.randn(4, 64, dtype=dtype), torch.randn(64, dtype=dtype)
    out = rms_norm_mod.rms_norm(x, w, 1e-6)
    residual = torch.randn_like(x)
    expected_residual = residual.clone()
    expected = rms_norm_mod.fused_add_rms_norm_reference(x, expected_residual, w, 1e-6)
    fused = rms_norm_mod.fused_add_rms_norm(x, residual, w, 1e-6)
    gate_up = torch.randn(4, 2 * 48, dtype=dtype)
    act = activation_mod.silu_and_mul(gate_up)
    if not kernel:
        assert torch.equal(out, rms_norm_mod.rms_norm_reference(x, w, 1e-6))
        assert torch.equal(fused, expected) and torch.equal(residual, expected_residual)
        assert torch.equal(act, activation_mod.silu_and_mul_reference(gate_up))

    table = rotary_mod.build_cos_sin_cache(64, 64, 10000.0, None, dtype)
    positions, slots = torch.arange(4), torch.tensor([3, 9, -1, 17])
    qkv = torch.randn(4, 9 + 2 * 3, 64, dtype=dtype)
    caches = [torch.zeros(2, 16, 3, 64, dtype=dtype) for _ in range(4)]
    q = rotary_kv_mod.rotary_write_kv(positions, qkv.clone(), 9, 3, table, *caches[:2], slots)
    rotated = qkv.clone()
    rotary_mod.apply_rotary(positions, rotated[:, :9], rotated[:, 9:12], table)
    if not kernel:
        ref_q = rotary_kv_mod.rotary_write_kv_reference(
            positions, qkv.clone(), 9, 3, table, *caches[2:], slots
        )
        assert torch.equal(q, ref_q) and torch.equal(caches[0], caches[2])
        assert torch.equal(rotated[:, :9], ref_q)

    expected_calls = 1 if kernel else 0
    assert len(norm_calls) == 2 * expected_calls  # rms_norm and fused_add_rms_norm
    assert len(rotary_calls) == len(kv_calls) == len(silu_calls) == expected_calls


def test_dispatch_keeps_autograd_on_the_reference() -> None:
    """Tensors that require grad stay on torch (numba cannot record a backward)."""
    x = torch.randn(3, 32, requires_grad=True)
    w = torch.randn(32)
    assert not cpu.rms_norm_cpu_supported(x, w)
    rms_norm_mod.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None
