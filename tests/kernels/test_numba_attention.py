"""The numba attention kernels (paged decode, paged prefill, FlashAttention fwd/bwd, block copy)
against the torch references.

Runs the way ``test_numba_elementwise.py`` does: under plain ``pytest``,
``test_attention_kernels_in_cuda_simulator`` re-runs this module in a subprocess with
``NUMBA_ENABLE_CUDASIM=1``, where the ``sim`` tests run the kernels in numba's CUDA simulator on
CPU tensors at tiny sizes; ``pytest -m gpu`` on a CUDA machine runs the ``gpu`` tests at
Llama-3-8B sizes (32 query / 8 KV heads of 128, bf16) and the engine's dispatch.

Every check draws fresh random inputs, fills the cache's unused blocks with random stale
values, poisons the output with NaN so an unwritten element fails, and compares with the torch
reference run in float64 by ‖out − ref‖ / ‖ref‖.
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch
from kernel_helpers import check, gpu, relative_error, run_in_simulator, sim

from yaie.kernels._numba import BF16, F32, arrival_counters
from yaie.model.attention import AttentionMetadata

attention_mod = importlib.import_module("yaie.kernels.attention")
decode_mod = importlib.import_module("yaie.kernels.decode_attention")
prefill_mod = importlib.import_module("yaie.kernels.prefill_attention")
flash_mod = importlib.import_module("yaie.kernels.flash_attention")
copy_mod = importlib.import_module("yaie.kernels.block_copy")
rotary_kv_mod = importlib.import_module("yaie.kernels.rotary_kv")
rotary_mod = importlib.import_module("yaie.kernels.rotary")

# --- a paged batch and its float64 reference ----------------------------------------------------


class Batch:
    """A ragged batch over a shuffled paged cache: ``requests`` are (cached prefix, new tokens).

    The K/V of every context position is in the cache (as after ``write_kv``); free blocks hold
    random stale values. ``meta`` is built on the kernels' device, ``ref`` is the torch
    reference's output computed in float64 on the CPU.
    """

    def __init__(
        self,
        requests: list[tuple[int, int]],
        heads: int,
        kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: str,
        seed: int = 0,
    ) -> None:
        rng = random.Random(seed)
        torch.manual_seed(seed)
        needed = [-(-(p + n) // block_size) for p, n in requests]
        num_blocks = sum(needed) + 3
        free = list(range(num_blocks))
        rng.shuffle(free)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = torch.randn(shape, device=device).to(dtype)
        self.v_cache = torch.randn(shape, device=device).to(dtype)
        query_start_loc, seq_lens, tables, slots = [0], [], [], []
        for (prefix, new), nb in zip(requests, needed):
            table = [free.pop() for _ in range(nb)]
            tables.append(table)
            seq_lens.append(prefix + new)
            query_start_loc.append(query_start_loc[-1] + new)
            slots += [table[p // block_size] * block_size + p % block_size
                      for p in range(prefix, prefix + new)]
        # The q heads as a strided slice of a fused QKV output, as the model has them.
        qkv = torch.randn(query_start_loc[-1], heads + 2 * kv_heads, head_dim, device=device)
        self.q = qkv.to(dtype)[:, :heads]
        args = (query_start_loc, seq_lens, tables, slots, block_size)
        self.meta = AttentionMetadata.build(*args, device)
        self.cpu_meta = AttentionMetadata.build(*args, "cpu")
        self.scale = head_dim**-0.5
        self.ref = self.reference()

    def reference(self) -> torch.Tensor:
        """The torch reference on the current q and caches, in float64 on the CPU."""
        return attention_mod.paged_attention_reference(
            self.q.double().cpu(), self.k_cache.double().cpu(), self.v_cache.double().cpu(),
            self.cpu_meta, self.scale,
        )

    def poisoned(self) -> torch.Tensor:
        return torch.full(self.q.shape, float("nan"), dtype=self.q.dtype, device=self.q.device)

    def decode(self, out: torch.Tensor, plan: decode_mod.DecodePlan | None,
               min_part: int | None = None) -> None:
        m = self.meta
        decode_mod.paged_decode_attention(
            self.q, self.k_cache, self.v_cache, out, m.block_tables, m.seq_lens,
            m.query_start_loc, m.decode_ids, m.max_seq_len, self.scale, plan, min_part,
        )

    def prefill(self, out: torch.Tensor) -> None:
        m = self.meta
        prefill_mod.paged_prefill_attention(
            self.q, self.k_cache, self.v_cache, out, m.block_tables, m.seq_lens,
            m.query_start_loc, m.prefill_ids, m.max_query_len, self.scale,
        )


def check_decode(batch: Batch, plan: tuple[int, int] | None,
                 min_part: int | None = None) -> None:
    """``plan``: ``(warps, partitions)``, or None for the planned launch."""
    out = batch.poisoned()
    batch.decode(out, plan and decode_mod.DecodePlan(*plan), min_part)
    check(out.cpu(), batch.ref, batch.q.dtype)


def check_rotary_decode(batch: Batch, qk_norm: bool, plan: tuple[int, int] | None,
                        dispatch: bool = False) -> None:
    """The decode kernel with ``DecodeRope`` (raw QKV in, new K/V stored by the kernel)
    against ``rotary_write_kv_reference`` then the attention reference, in float64: the
    output, the new tokens' cache rows, and every other cache row left as it was.
    ``dispatch`` goes through the model's entry point, ``rotary_paged_attention``."""
    dtype, device = batch.q.dtype, batch.q.device
    heads, kv_heads, head_dim = batch.q.shape[1], batch.k_cache.shape[2], batch.q.shape[2]
    qkv = torch.randn(batch.q.shape[0], heads + 2 * kv_heads, head_dim).to(dtype)
    table = rotary_mod.build_cos_sin_cache(head_dim, 8192, 500000.0, None, dtype)
    positions = batch.cpu_meta.seq_lens[batch.cpu_meta.decode_ids].long() - 1
    slots = batch.cpu_meta.slot_mapping
    norm = None
    if qk_norm:
        norm = (torch.randn(head_dim).to(dtype), torch.randn(head_dim).to(dtype), 1e-6)
    before = [c.cpu().flatten(0, 1) for c in (batch.k_cache, batch.v_cache)]

    ref_caches = [c.double() for c in before]
    ref_q = rotary_kv_mod.rotary_write_kv_reference(
        positions, qkv.double(), heads, kv_heads, table.double(),
        *(c.view(-1, batch.k_cache.shape[1], kv_heads, head_dim) for c in ref_caches), slots,
        None if norm is None else (norm[0].double(), norm[1].double(), norm[2]),
    )
    ref = attention_mod.paged_attention_reference(
        ref_q, *(c.view(-1, batch.k_cache.shape[1], kv_heads, head_dim) for c in ref_caches),
        batch.cpu_meta, batch.scale,
    )

    qkv_dev, m = qkv.to(device), batch.meta
    weights = None if norm is None else (norm[0].to(device), norm[1].to(device), norm[2])
    if dispatch:
        out = attention_mod.rotary_paged_attention(
            positions.to(device), qkv_dev, heads, kv_heads, table.to(device), batch.k_cache,
            batch.v_cache, m, batch.scale, weights,
        )
    else:
        out = batch.poisoned()
        rope = decode_mod.DecodeRope(qkv_dev[:, heads:], positions.to(device), table.to(device),
                                     m.slot_mapping, weights)
        decode_mod.paged_decode_attention(
            qkv_dev[:, :heads], batch.k_cache, batch.v_cache, out, m.block_tables, m.seq_lens,
            m.query_start_loc, m.decode_ids, m.max_seq_len, batch.scale,
            plan and decode_mod.DecodePlan(*plan), rope=rope,
        )
    check(out.cpu(), ref, dtype)
    for got, want, old in zip((batch.k_cache, batch.v_cache), ref_caches, before):
        got = got.cpu().flatten(0, 1)
        check(got[slots], want[slots], dtype)
        others = torch.ones(len(got), dtype=torch.bool)
        others[slots] = False
        assert torch.equal(got[others], old[others]), "a cache row outside the new slots changed"


def check_mixed(batch: Batch) -> None:
    """Decode and prefill kernels together cover every row of a mixed batch."""
    out = batch.poisoned()
    batch.decode(out, None)
    batch.prefill(out)
    check(out.cpu(), batch.ref, batch.q.dtype)


def check_flash(batch: int, heads: int, length: int, head_dim: int, causal: bool,
                device: str) -> None:
    """Forward output and all three gradients against autograd of the float64 reference."""
    torch.manual_seed(length)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device) for _ in range(3))
    grad = torch.randn(batch, heads, length, head_dim, device=device)
    ref_inputs = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    ref = flash_mod.attention_reference(*ref_inputs, causal, head_dim**-0.5)
    ref.backward(grad.double().cpu())
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_mod.flash_attention(*inputs, causal=causal)
    out.backward(grad)
    check(out.detach().cpu(), ref.detach(), torch.float32)
    for got, want in zip(inputs, ref_inputs):
        check(got.grad.cpu(), want.grad, torch.float32)


def check_copy_blocks(shape: tuple[int, ...], pairs: int, dtype: torch.dtype, device: str) -> None:
    cache = torch.randn(shape, device=device).to(dtype)
    perm = torch.randperm(shape[0], device=device)
    src, dst = perm[:pairs], perm[pairs : 2 * pairs]
    expected = cache.clone()
    copy_mod.copy_blocks_reference(expected, src, dst)
    copy_mod.copy_blocks_numba(cache, src, dst)
    assert torch.equal(cache, expected)


# --- CUDA simulator (CI): tiny sizes -------------------------------------------------------------


def test_attention_kernels_in_cuda_simulator() -> None:
    """Run this module's ``sim`` tests in a fresh interpreter with the simulator switched on."""
    run_in_simulator(__file__)


@sim
@pytest.mark.parametrize(
    ("dtype", "heads", "kv_heads", "block_size", "plan", "min_part"),
    [
        (torch.float32, 2, 2, 16, None, None),  # GQA 1, the plan
        (torch.bfloat16, 4, 1, 32, (3, 1), None),  # GQA 4, no split
        (torch.bfloat16, 4, 1, 32, (3, 9), 4),  # 9 partitions: 71 tokens as 9, 38 as 5, 6 as 2
        (torch.float16, 4, 1, 16, (6, 2), None),  # fp16, two partitions spanning blocks
        (torch.bfloat16, 4, 2, 16, (12, 3), 8),  # the widest blocks, split
    ],
)
def test_sim_decode(
    dtype: torch.dtype, heads: int, kv_heads: int, block_size: int,
    plan: tuple[int, int] | None, min_part: int | None,
) -> None:
    # Contexts of 38, 6 and 71 tokens: none a multiple of the block size. Split, a short
    # context fills fewer partitions than the launch has (the rest exit, the merge counts only
    # the filled ones) or one (written directly).
    batch = Batch([(37, 1), (5, 1), (70, 1)], heads, kv_heads, 64, block_size, dtype, "cpu")
    check_decode(batch, plan, min_part)


@sim
@pytest.mark.parametrize(
    ("dtype", "qk_norm", "plan"),
    [
        (torch.bfloat16, True, (3, 1)),  # Qwen3's q/k norms, whole contexts
        (torch.float32, False, (6, 3)),  # rotary only, split: only the last partition stores
    ],
)
def test_sim_decode_with_rotary_and_kv_store(
    dtype: torch.dtype, qk_norm: bool, plan: tuple[int, int]
) -> None:
    batch = Batch([(37, 1), (5, 1), (70, 1)], 4, 2, 64, 16, dtype, "cpu")
    check_rotary_decode(batch, qk_norm, plan)


@sim
def test_sim_split_decode_twice_reuses_the_arrival_counters() -> None:
    """The merging block resets its counter: a second launch (a graph replay) merges again."""
    batch = Batch([(37, 1), (70, 1)], 4, 2, 64, 16, torch.bfloat16, "cpu")
    check_decode(batch, (3, 5), 4)
    check_decode(batch, (3, 5), 4)
    assert int(arrival_counters(torch.device("cpu"), 1).abs().sum()) == 0


@sim
@pytest.mark.parametrize(
    ("dtype", "heads", "kv_heads", "block_size"),
    [(torch.float32, 2, 2, 16), (torch.bfloat16, 4, 1, 32)],
)
def test_sim_mixed_prefill_and_decode(
    dtype: torch.dtype, heads: int, kv_heads: int, block_size: int
) -> None:
    # A fresh prompt, a decode, and a chunk over a cached prefix spanning blocks.
    batch = Batch([(0, 9), (20, 1), (21, 12)], heads, kv_heads, 64, block_size, dtype, "cpu")
    check_mixed(batch)


@sim
def test_sim_flash_attention_forward_and_backward() -> None:
    check_flash(1, 1, 37, 32, causal=True, device="cpu")


@sim
def test_sim_copy_blocks() -> None:
    check_copy_blocks((6, 16, 2, 8), 2, torch.bfloat16, "cpu")


def test_decode_plan_widens_blocks_and_splits_only_small_batches() -> None:
    cpu = torch.device("cpu")  # the simulator's pretend GPU of 8 multiprocessors
    plan = decode_mod.plan_decode
    # 64 x 8 pairs fill the GPU many times over: the narrowest blocks, no split.
    assert plan(64, 8, 4096, BF16, 4, 128, cpu) == decode_mod.DecodePlan(3, 1)
    # One request, one KV head: the widest blocks, one partition a multiprocessor.
    assert plan(1, 1, 4096, BF16, 4, 128, cpu) == decode_mod.DecodePlan(12, 8)
    # 12 pairs: blocks of six warps (16 resident); one partition each, two would overflow.
    assert plan(3, 4, 4096, BF16, 4, 128, cpu) == decode_mod.DecodePlan(6, 1)
    # 24 pairs: blocks of three (32 resident).
    assert plan(6, 4, 4096, BF16, 4, 128, cpu) == decode_mod.DecodePlan(3, 1)
    # Never partitions shorter than MIN_PARTITION_ITERATIONS loop iterations.
    shortest = decode_mod.MIN_PARTITION_ITERATIONS * decode_mod.tokens_per_iteration(F32, 64, 12)
    assert plan(1, 1, 2 * shortest, F32, 1, 64, cpu) == decode_mod.DecodePlan(12, 2)
    # Twelve warps' states for 8 heads of 128 overflow shared memory: six instead.
    assert plan(1, 1, 4096, BF16, 8, 128, cpu).warps == 6


def test_cpu_tensors_take_the_reference_path() -> None:
    batch = Batch([(5, 1), (0, 4)], 4, 2, 16, 16, torch.float32, "cpu")
    out = attention_mod.paged_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale
    )
    assert relative_error(out, batch.ref) < 1e-5


# --- GPU: Llama-3-8B sizes -----------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _long_decodes(n: int, longest: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, longest), 1) for _ in range(n)]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("plan", [None, (3, 3), (12, 99), (6, 1)],
                         ids=["auto", "split", "most", "whole"])
def test_gpu_decode(dtype: torch.dtype, plan: tuple[int, int] | None) -> None:
    batch = Batch(_long_decodes(12, 4100, 1), HEADS, KV_HEADS, HEAD_DIM, 16, dtype, "cuda")
    check_decode(batch, plan)


@gpu
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"),
                         [(9, 3, 64, 32), (8, 8, 128, 16), (32, 4, 128, 16)])
def test_gpu_decode_other_shapes(heads: int, kv_heads: int, head_dim: int,
                                 block_size: int) -> None:
    """SmolLM2's 9/3 heads of 64, plain multi-head, and GQA 8."""
    batch = Batch(_long_decodes(5, 3000, 2), heads, kv_heads, head_dim, block_size,
                  torch.bfloat16, "cuda")
    check_decode(batch, None)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "plain"])
@pytest.mark.parametrize("plan", [None, (3, 5)], ids=["auto", "split"])
def test_gpu_decode_with_rotary_and_kv_store(
    dtype: torch.dtype, qk_norm: bool, plan: tuple[int, int] | None
) -> None:
    batch = Batch(_long_decodes(12, 3000, 4), HEADS, KV_HEADS, HEAD_DIM, 16, dtype, "cuda")
    check_rotary_decode(batch, qk_norm, plan)
    qwen3 = Batch(_long_decodes(3, 500, 5), 16, 8, 128, 16, dtype, "cuda")
    check_rotary_decode(qwen3, qk_norm, None, dispatch=True)


@gpu
def test_gpu_decode_long_context_split() -> None:
    batch = Batch([(32767, 1), (20000, 1)], HEADS, KV_HEADS, HEAD_DIM, 16, torch.bfloat16, "cuda")
    check_decode(batch, None)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_mixed_prefill_and_decode(dtype: torch.dtype) -> None:
    requests = [(0, 700), (1000, 77), (45, 1), (3000, 1), (17, 300), (0, 1)]
    check_mixed(Batch(requests, HEADS, KV_HEADS, HEAD_DIM, 16, dtype, "cuda"))
    check_mixed(Batch(requests, 9, 3, 64, 32, dtype, "cuda"))


@gpu
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_gpu_paged_attention_dispatch(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's entry point on CUDA: numba decodes, either prefill backend, one output."""
    monkeypatch.setattr(attention_mod, "PREFILL_BACKEND", backend)
    batch = Batch([(0, 33), (100, 1), (64, 20), (5, 1)], HEADS, KV_HEADS, HEAD_DIM, 16,
                  torch.bfloat16, "cuda")
    out = attention_mod.paged_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale
    )
    check(out.cpu(), batch.ref, torch.bfloat16)


@gpu
def test_gpu_decode_replays_in_a_cuda_graph() -> None:
    """With a fixed plan, a decode step captures into a graph and replays right on
    new queries and cache contents copied into the captured buffers (the split merge's
    arrival counters included)."""
    batch = Batch(_long_decodes(8, 2000, 3), HEADS, KV_HEADS, HEAD_DIM, 16, torch.bfloat16,
                  "cuda")
    out = batch.poisoned()
    plan = decode_mod.DecodePlan(6, 8)
    batch.decode(out, plan)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        batch.decode(out, plan)
    batch.q.copy_(torch.randn_like(batch.q))
    batch.k_cache.copy_(torch.randn_like(batch.k_cache))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(out.cpu(), batch.reference(), torch.bfloat16)


@gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_flash_attention_forward_and_backward(causal: bool) -> None:
    check_flash(2, 4, 300, HEAD_DIM, causal, "cuda")


@gpu
def test_gpu_copy_blocks() -> None:
    check_copy_blocks((512, 16, KV_HEADS, HEAD_DIM), 100, torch.bfloat16, "cuda")
    cache = torch.randn(64, 16, 2, 64, device="cuda")
    k_before = cache.clone()
    copy_mod.copy_blocks([cache], torch.tensor([3], device="cuda"),
                         torch.tensor([9], device="cuda"))
    assert torch.equal(cache[9], k_before[3]) and torch.equal(cache[:9], k_before[:9])
