"""The numba elementwise kernels against the torch references.

Three ways this module runs:

- plain ``pytest``: numba reads ``NUMBA_ENABLE_CUDASIM`` once, at import, and other tests of the
  session import it for real; so ``test_kernels_in_cuda_simulator`` re-runs this module in a
  subprocess with ``NUMBA_ENABLE_CUDASIM=1``, where the ``sim`` tests run the kernels' logic in
  numba's CUDA simulator on CPU tensors, at tiny sizes (the simulator runs each thread as Python);
- ``NUMBA_ENABLE_CUDASIM=1 pytest tests/kernels/test_numba_elementwise.py``: the same, directly;
- ``pytest -m gpu`` on a CUDA machine: the kernels at Llama-3-8B step sizes, the dispatch
  functions, and a CUDA-graph capture of them.

Every check draws fresh random inputs, poisons outputs with NaN so an unwritten element fails,
and compares with the reference run in float64 by ‖out − ref‖ / ‖ref‖.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_helpers import check, gpu, run_in_simulator, sim

from yaie.kernels._numba import words_fit
from yaie.kernels.build import warmup

rms_norm_mod = importlib.import_module("yaie.kernels.rms_norm")
rotary_mod = importlib.import_module("yaie.kernels.rotary")
activation_mod = importlib.import_module("yaie.kernels.activation")
kv_cache_mod = importlib.import_module("yaie.kernels.kv_cache")
layer_norm_mod = importlib.import_module("yaie.kernels.layer_norm")
cpu_mod = importlib.import_module("yaie.kernels.elementwise_cpu")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _qkv(
    tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, ...]:
    """q, k, v as strided head slices of one fused QKV output, as the attention layer has them."""
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, dtype=dtype, device=device)
    return qkv.split((heads, kv_heads, kv_heads), dim=1)


# --- checks shared by the simulator and GPU tests ------------------------------------------------


def check_rms_norm(x: torch.Tensor) -> None:
    eps = 1e-6
    weight = torch.randn(x.shape[-1], dtype=x.dtype, device=x.device)
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    rms_norm_mod.rms_norm_numba(x, weight, eps, out=out)
    check(out, rms_norm_mod.rms_norm_reference(x.double(), weight.double(), eps), x.dtype)


def check_fused_add_rms_norm(
    shape: tuple[int, ...], dtype: torch.dtype, device: str, partials: int = 0
) -> None:
    """``partials``: ``x`` is that many split-K partial sums ``[S, *shape]`` (0: plain)."""
    eps = 1e-5
    x = torch.randn(((partials,) if partials else ()) + shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device) * 4
    weight = torch.randn(shape[-1], dtype=dtype, device=device)
    residual_ref = residual.double()
    ref = rms_norm_mod.fused_add_rms_norm_reference(x.double(), residual_ref, weight.double(), eps)
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    rms_norm_mod.fused_add_rms_norm_numba(x, residual, weight, eps, out=out)
    check(residual, residual_ref, dtype)
    check(out, ref, dtype)


def check_rotary(
    tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    is_neox: bool,
    dtype: torch.dtype,
    device: str,
    max_pos: int = 4096,
) -> None:
    q, k, v = _qkv(tokens, heads, kv_heads, head_dim, dtype, device)
    v_before = v.clone()
    cache = rotary_mod.build_cos_sin_cache(head_dim, max_pos, 500000.0, None, dtype).to(device)
    positions = torch.randint(1, max_pos, (tokens,), device=device)  # position 0 is the identity
    q_ref, k_ref = q.double(), k.double()
    rotary_mod.apply_rotary_reference(positions, q_ref, k_ref, cache.double(), is_neox)
    rotary_mod.apply_rotary_numba(positions, q, k, cache, is_neox)
    check(q, q_ref, dtype)
    check(k, k_ref, dtype)
    assert torch.equal(v, v_before), "rotary wrote outside q and k"


def check_silu_and_mul(tokens: int, size: int, dtype: torch.dtype, device: str) -> None:
    x = torch.randn(tokens, 2 * size, dtype=dtype, device=device) * 3
    out = torch.full((tokens, size), float("nan"), dtype=dtype, device=device)
    activation_mod.silu_and_mul_numba(x, out)
    check(out, activation_mod.silu_and_mul_reference(x.double()), dtype)


def check_layer_norm(x: torch.Tensor) -> None:
    """LayerNorm on rows whose mean is far from zero, as on GPT-2's residual stream."""
    x = x * 3 + 20
    weight, bias = torch.randn(2, x.shape[-1], dtype=x.dtype, device=x.device)
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    layer_norm_mod.layer_norm_numba(x, weight, bias, 1e-5, out=out)
    ref = layer_norm_mod.layer_norm_reference(x.double(), weight.double(), bias.double(), 1e-5)
    check(out, ref, x.dtype)


def check_fused_add_layer_norm(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> None:
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device) * 4 + 10
    weight, bias = torch.randn(2, shape[-1], dtype=dtype, device=device)
    residual_ref = residual.double()
    ref = layer_norm_mod.fused_add_layer_norm_reference(
        x.double(), residual_ref, weight.double(), bias.double(), 1e-5
    )
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    layer_norm_mod.fused_add_layer_norm_numba(x, residual, weight, bias, 1e-5, out=out)
    check(residual, residual_ref, dtype)
    check(out, ref, dtype)


def check_gelu_tanh(tokens: int, size: int, dtype: torch.dtype, device: str) -> None:
    x = torch.randn(tokens, size, dtype=dtype, device=device) * 3
    out = torch.full((tokens, size), float("nan"), dtype=dtype, device=device)
    activation_mod.gelu_tanh_numba(x, out)
    check(out, activation_mod.gelu_tanh_reference(x.double()), dtype)


def check_write_kv(
    tokens: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    num_blocks: int,
    dtype: torch.dtype,
    device: str,
) -> None:
    _, k, v = _qkv(tokens, 1, kv_heads, head_dim, dtype, device)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    slots[torch.rand(tokens, device=device) < 0.25] = -1  # padding tokens: never written
    slots[0] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_cache_mod.write_kv_reference(k, v, k_ref, v_ref, slots)
    kv_cache_mod.write_kv_numba(k, v, k_cache, v_cache, slots)
    # Exact: a copy. NaN where nothing was written, which a stray write would overwrite.
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


# --- CUDA simulator (CI): tiny sizes --------------------------------------------------------------


def test_kernels_in_cuda_simulator() -> None:
    """Run this module's ``sim`` tests in a fresh interpreter with the simulator switched on."""
    run_in_simulator(__file__)


@sim
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (2, 36), (1, 200)])
def test_sim_rms_norm(shape: tuple[int, int], dtype: torch.dtype) -> None:
    check_rms_norm(torch.randn(shape, dtype=dtype) * 3)


@sim
@pytest.mark.parametrize("dtype", DTYPES)
def test_sim_rms_norm_on_strided_heads(dtype: torch.dtype) -> None:
    """q/k-norm: normalizing each head of a strided q slice (3 of 5 heads, head_dim 128)."""
    q, _, _ = _qkv(2, 3, 1, 128, dtype, "cpu")
    check_rms_norm(q)


@sim
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (2, 100)])
def test_sim_fused_add_rms_norm(shape: tuple[int, int], dtype: torch.dtype) -> None:
    check_fused_add_rms_norm(shape, dtype, "cpu")


@sim
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("partials", [2, 4])
def test_sim_fused_add_rms_norm_sums_split_k_partials(partials: int, dtype: torch.dtype) -> None:
    check_fused_add_rms_norm((3, 64), dtype, "cpu", partials)


@sim
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(3, 1, 64), (1, 1, 128)])
def test_sim_rotary(
    heads: int, kv_heads: int, head_dim: int, is_neox: bool, dtype: torch.dtype
) -> None:
    check_rotary(3, heads, kv_heads, head_dim, is_neox, dtype, "cpu")


@sim
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [40, 100])
def test_sim_silu_and_mul(size: int, dtype: torch.dtype) -> None:
    check_silu_and_mul(3, size, dtype, "cpu")


@sim
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (1, 200)])
def test_sim_layer_norm(shape: tuple[int, int], dtype: torch.dtype) -> None:
    check_layer_norm(torch.randn(shape, dtype=dtype))


@sim
@pytest.mark.parametrize("dtype", DTYPES)
def test_sim_fused_add_layer_norm(dtype: torch.dtype) -> None:
    check_fused_add_layer_norm((2, 100), dtype, "cpu")


@sim
@pytest.mark.parametrize("dtype", DTYPES)
def test_sim_gelu_tanh(dtype: torch.dtype) -> None:
    check_gelu_tanh(3, 100, dtype, "cpu")


@sim
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,head_dim,block_size", [(3, 64, 16), (1, 128, 32)])
def test_sim_write_kv(kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> None:
    check_write_kv(6, kv_heads, head_dim, block_size, 3, dtype, "cpu")


@sim
def test_sim_cpu_tensors_keep_the_cpu_paths() -> None:
    """The dispatch functions never send CPU tensors to the numba.cuda kernels, simulator or
    not: bf16 runs the torch reference, fp32 the CPU kernel (``yaie.kernels.elementwise_cpu``)."""
    x, w = torch.randn(2, 64), torch.randn(64)
    assert torch.equal(rms_norm_mod.rms_norm(x, w, 1e-6), cpu_mod.rms_norm_cpu(x, w, 1e-6))
    x, w = x.bfloat16(), w.bfloat16()
    expected = rms_norm_mod.rms_norm_reference(x, w, 1e-6)
    assert torch.equal(rms_norm_mod.rms_norm(x, w, 1e-6), expected)


def test_word_views_need_whole_aligned_words() -> None:
    """Kernels see rows as 8-byte words; operands that aren't whole words go to the reference."""
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert words_fit(x) and words_fit(x[1:]) and words_fit(x[:, 8:])
    assert not words_fit(x[:, :6])  # 12-byte rows
    assert not words_fit(x[:, 2:])  # rows start 4 bytes into a word
    assert not words_fit(x.t())  # last dim not contiguous
    assert not words_fit(x.to(torch.int16))  # not an activation dtype


@sim
def test_sim_unaligned_operands_are_left_to_the_reference() -> None:
    q, k, _ = _qkv(2, 2, 1, 6, torch.bfloat16, "cpu")
    cache = rotary_mod.build_cos_sin_cache(6, 8, 10000.0, None, torch.bfloat16)
    assert not rms_norm_mod.numba_supports(q, torch.ones(6, dtype=torch.bfloat16))
    assert not rotary_mod.numba_supports(torch.arange(2), q, k, cache)
    assert not activation_mod.numba_supports(torch.randn(2, 12, dtype=torch.bfloat16))
    assert rms_norm_mod.numba_supports(torch.randn(2, 8), torch.ones(8))
    assert not layer_norm_mod.numba_supports(q, torch.ones(6, dtype=torch.bfloat16), q[0, 0])
    assert not activation_mod.gelu_numba_supports(torch.randn(2, 3, dtype=torch.bfloat16))
    assert not activation_mod.gelu_numba_supports(torch.randn(4, 8)[:, :4])  # not contiguous


# --- GPU: Llama-3-8B step sizes (4,096 tokens, hidden 4096, 32/8 heads of 128, MLP 14336) --------

TOKENS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 4096, 32, 8, 128, 14336


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_rms_norm(dtype: torch.dtype) -> None:
    check_rms_norm(torch.randn(TOKENS, HIDDEN, dtype=dtype, device="cuda") * 3)
    q, _, _ = _qkv(TOKENS, HEADS, KV_HEADS, HEAD_DIM, dtype, "cuda")
    check_rms_norm(q)
    check_rms_norm(torch.randn(7, 5120, dtype=dtype, device="cuda"))  # decode-sized, odd rows


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_fused_add_rms_norm(dtype: torch.dtype) -> None:
    check_fused_add_rms_norm((TOKENS, HIDDEN), dtype, "cuda")
    check_fused_add_rms_norm((3, 2056), dtype, "cuda")
    for partials in (2, 4):  # a decode step's split-K projections
        check_fused_add_rms_norm((64, HIDDEN), dtype, "cuda", partials)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_gpu_rotary(is_neox: bool, dtype: torch.dtype) -> None:
    check_rotary(TOKENS, HEADS, KV_HEADS, HEAD_DIM, is_neox, dtype, "cuda", max_pos=131072)
    check_rotary(5, 7, 1, 64, is_neox, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_silu_and_mul(dtype: torch.dtype) -> None:
    check_silu_and_mul(TOKENS, INTERMEDIATE, dtype, "cuda")
    check_silu_and_mul(3, 1540, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_layer_norm_and_gelu_tanh(dtype: torch.dtype) -> None:
    """GPT-2-large sizes (hidden 1280, MLP 5120), and rows of odd word counts."""
    check_layer_norm(torch.randn(TOKENS, 1280, dtype=dtype, device="cuda"))
    check_layer_norm(torch.randn(7, 5128, dtype=dtype, device="cuda"))
    check_fused_add_layer_norm((TOKENS, 1280), dtype, "cuda")
    check_gelu_tanh(TOKENS, 5120, dtype, "cuda")
    check_gelu_tanh(3, 1540, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_write_kv(dtype: torch.dtype) -> None:
    check_write_kv(TOKENS, KV_HEADS, HEAD_DIM, 16, 512, dtype, "cuda")
    check_write_kv(37, 3, 64, 32, 4, dtype, "cuda")


@gpu
def test_gpu_dispatch_runs_the_kernels() -> None:
    """On CUDA tensors the model's entry points give exactly the numba kernels' results."""
    x = torch.randn(64, HIDDEN, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(HIDDEN, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(rms_norm_mod.rms_norm(x, w, 1e-6), rms_norm_mod.rms_norm_numba(x, w, 1e-6))
    gate_up = torch.randn(64, 2 * INTERMEDIATE, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(
        activation_mod.silu_and_mul(gate_up), activation_mod.silu_and_mul_numba(gate_up)
    )


@gpu
def test_gpu_kernels_replay_in_a_cuda_graph() -> None:
    """After ``warmup``, a decode step's elementwise kernels capture into a graph and replay right.

    The graph is captured on one set of inputs and replayed on fresh values copied into the same
    buffers: a replay that re-ran stale work, or a launch that escaped the capture, would fail.
    """
    dtype, tokens = torch.bfloat16, 8
    warmup(dtype)
    hidden = torch.empty(tokens, HIDDEN, dtype=dtype, device="cuda")
    residual = torch.empty_like(hidden)
    weight = torch.randn(HIDDEN, dtype=dtype, device="cuda")
    qkv = torch.empty(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
    q, k, v = qkv.split((HEADS, KV_HEADS, KV_HEADS), dim=1)
    cache = rotary_mod.build_cos_sin_cache(HEAD_DIM, 4096, 500000.0, None, dtype).cuda()
    positions = torch.empty(tokens, dtype=torch.int64, device="cuda")
    slots = torch.empty(tokens, dtype=torch.int64, device="cuda")
    k_cache = torch.zeros(16, 16, KV_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    gate_up = torch.empty(tokens, 2 * INTERMEDIATE, dtype=dtype, device="cuda")

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        normed = rms_norm_mod.fused_add_rms_norm(hidden, residual, weight, 1e-5)
        rotary_mod.apply_rotary(positions, q, k, cache)
        kv_cache_mod.write_kv(k, v, k_cache, v_cache, slots)
        return normed, activation_mod.silu_and_mul(gate_up)

    def fill() -> None:
        for t in (hidden, residual, qkv, gate_up):
            t.copy_(torch.randn_like(t))
        positions.copy_(torch.randint(1, 4096, (tokens,)))
        slots.copy_(torch.randperm(256)[:tokens])

    fill()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed, act = step()
    fill()
    expected_residual = residual.double() + hidden.double()
    expected_normed = rms_norm_mod.rms_norm_reference(expected_residual, weight.double(), 1e-5)
    q_ref, k_ref = q.double(), k.double()
    rotary_mod.apply_rotary_reference(positions, q_ref, k_ref, cache.double())
    expected_act = activation_mod.silu_and_mul_reference(gate_up.double())
    k_rows = k.clone()
    graph.replay()
    torch.cuda.synchronize()
    check(residual, expected_residual, dtype)
    check(normed, expected_normed, dtype)
    check(q, q_ref, dtype)
    check(act, expected_act, dtype)
    written = k_cache.flatten(0, 1)[slots]
    check(written, k_ref, dtype)
    assert not torch.equal(written, k_rows), "write_kv ran before the rotation"
