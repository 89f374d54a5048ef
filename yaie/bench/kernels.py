"""``yaie bench kernels``: each numba elementwise kernel at a Llama-3-8B step, on the GPU.

Sizes are one prefill step of Llama-3-8B (4,096 tokens, hidden 4096, 32 query / 8 KV heads of
128, MLP 14336, bf16). Each op is bandwidth-bound, so its figure is bytes moved (each input read
once, each output written once: the least any implementation must move) over time, beside the
device-to-device copy bandwidth measured in the same run, the practical ceiling; the torch eager
equivalent (the op's torch reference) is timed the same way.

Timing: per iteration, L2 is flushed (a 256 MB read, so the op reads device memory and no dirty
lines are written back on its clock), then the GPU sleeps ~1 ms on the stream while the host
enqueues the op between two CUDA events, so the events bracket GPU time only, not the host's
launch overhead (~60 µs for a numba launch, more for torch's multi-kernel references). Figures
are medians over ``iters`` iterations after warm-up.
"""

from __future__ import annotations

import importlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from yaie.kernels.build import warmup

_rms_norm = importlib.import_module("yaie.kernels.rms_norm")
_rotary = importlib.import_module("yaie.kernels.rotary")
_activation = importlib.import_module("yaie.kernels.activation")
_kv_cache = importlib.import_module("yaie.kernels.kv_cache")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336
_FLUSH_BYTES = 256 << 20
_SLEEP_CYCLES = 2_000_000  # ~1 ms at H100 clocks: far more than any op's host-side launch time


@dataclass(slots=True)
class KernelRow:
    op: str
    shape: str
    bytes: int
    yaie_us: float
    torch_us: float
    copy_us: float = 0.0  # a torch copy moving the same bytes: same launch and ramp costs

    def gbps(self, us: float) -> float:
        return self.bytes / us / 1e3


class GpuTimer:
    """Median GPU time of a callable, in microseconds (see the module docstring).

    ``flush``: read a 256 MB buffer before each iteration, so an op whose operands would fit in
    L2 reads device memory. ``sleep_cycles``: how long the GPU sleeps ahead of each iteration
    while the host enqueues it; it must exceed the callable's host-side launch time.
    """

    def __init__(self, iters: int, flush: bool = True, sleep_cycles: int = _SLEEP_CYCLES) -> None:
        self.iters = iters
        self.sleep_cycles = sleep_cycles
        self.flush = (
            torch.zeros(_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda") if flush else None
        )

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(3):
            fn()
        pairs = []
        for _ in range(self.iters):
            if self.flush is not None:
                self.flush.sum()
            torch.cuda._sleep(self.sleep_cycles)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e3


def copy_us(timer: GpuTimer, moved: int) -> float:
    """Time of a device-to-device torch copy moving ``moved`` bytes (half read, half written)."""
    src = torch.randint(0, 1 << 30, (moved // 16,), device="cuda")
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))


def measure(tokens: int, timer: GpuTimer, dtype: torch.dtype = torch.bfloat16) -> list[KernelRow]:
    """Time every op at ``tokens`` tokens; numba and torch eager on the same operands."""
    size = torch.empty((), dtype=dtype).element_size()
    cuda = {"device": "cuda", "dtype": dtype}
    rows = []

    x = torch.randn(tokens, HIDDEN, **cuda)
    residual = torch.randn(tokens, HIDDEN, **cuda)
    weight = torch.randn(HIDDEN, **cuda)
    hidden_bytes = tokens * HIDDEN * size
    rows.append(
        KernelRow(
            "rms_norm",
            f"[{tokens}, {HIDDEN}]",
            2 * hidden_bytes + HIDDEN * size,
            timer(lambda: _rms_norm.rms_norm_numba(x, weight, 1e-5)),
            timer(lambda: _rms_norm.rms_norm_reference(x, weight, 1e-5)),
        )
    )
    rows.append(
        KernelRow(
            "fused_add_rms_norm",
            f"[{tokens}, {HIDDEN}]",
            4 * hidden_bytes + HIDDEN * size,
            timer(lambda: _rms_norm.fused_add_rms_norm_numba(x, residual, weight, 1e-5)),
            timer(lambda: _rms_norm.fused_add_rms_norm_reference(x, residual, weight, 1e-5)),
        )
    )

    qkv = torch.randn(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM, **cuda)
    q, k, v = qkv.split((HEADS, KV_HEADS, KV_HEADS), dim=1)
    table = _rotary.build_cos_sin_cache(HEAD_DIM, 8192, 500000.0, None, dtype).cuda()
    positions = torch.arange(tokens, device="cuda") % 8192
    qk_bytes = tokens * (HEADS + KV_HEADS) * HEAD_DIM * size
    rows.append(
        KernelRow(
            "apply_rotary (neox)",
            f"q [{tokens}, {HEADS}, {HEAD_DIM}], k {KV_HEADS} heads",
            2 * qk_bytes + tokens * (HEAD_DIM * size + 8),
            timer(lambda: _rotary.apply_rotary_numba(positions, q, k, table)),
            timer(lambda: _rotary.apply_rotary_reference(positions, q, k, table)),
        )
    )

    block_size = 16
    num_blocks = 2 * tokens // block_size
    k_cache = torch.zeros(num_blocks, block_size, KV_HEADS, HEAD_DIM, **cuda)
    v_cache = torch.zeros_like(k_cache)
    blocks = torch.randperm(num_blocks, device="cuda")[: -(-tokens // block_size)]
    slots = (blocks[:, None] * block_size + torch.arange(block_size, device="cuda")).flatten()
    slots = slots[:tokens].contiguous()
    kv_bytes = tokens * KV_HEADS * HEAD_DIM * size

    def torch_write_kv() -> None:  # the reference's copy, without its padding check's host sync
        k_cache.flatten(0, 1).index_copy_(0, slots, k)
        v_cache.flatten(0, 1).index_copy_(0, slots, v)

    rows.append(
        KernelRow(
            "write_kv",
            f"k, v [{tokens}, {KV_HEADS}, {HEAD_DIM}], blocks of {block_size}",
            4 * kv_bytes + tokens * 8,
            timer(lambda: _kv_cache.write_kv_numba(k, v, k_cache, v_cache, slots)),
            timer(torch_write_kv),
        )
    )

    gate_up = torch.randn(tokens, 2 * INTERMEDIATE, **cuda)
    rows.append(
        KernelRow(
            "silu_and_mul",
            f"[{tokens}, {2 * INTERMEDIATE}]",
            3 * tokens * INTERMEDIATE * size,
            timer(lambda: _activation.silu_and_mul_numba(gate_up)),
            timer(lambda: _activation.silu_and_mul_reference(gate_up)),
        )
    )
    for row in rows:
        row.copy_us = copy_us(timer, row.bytes)
    return rows


def run(tokens: int = 4096, iters: int = 100) -> None:
    """Print the table: each op's time, GB/s, % of copy bandwidth, and torch eager beside it."""
    if not torch.cuda.is_available():
        raise ValueError("yaie bench kernels needs a CUDA GPU (torch sees none here)")
    warmup(torch.bfloat16)
    timer = GpuTimer(iters)
    gib = 1 << 30
    copy = 2 * gib / copy_us(timer, 2 * gib) / 1e3
    rows = measure(tokens, timer)
    print(
        f"yaie bench kernels: {torch.cuda.get_device_name()}, bf16, Llama-3-8B step of {tokens} "
        f"tokens; median of {iters}, L2 flushed. Copy ceiling: a 1 GiB device-to-device torch "
        f"copy moved {copy:.0f} GB/s (read + write) in this run; 'copy us' is a torch copy "
        "moving the op's bytes."
    )
    header = (
        f"{'op':<20} {'shape':<36} {'MB':>6} {'yaie us':>8} {'GB/s':>6} {'% copy':>7} "
        f"{'copy us':>8} {'torch us':>9} {'GB/s':>6} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.op:<20} {r.shape:<36} {r.bytes / 1e6:>6.1f} {r.yaie_us:>8.1f} "
            f"{r.gbps(r.yaie_us):>6.0f} {100 * r.gbps(r.yaie_us) / copy:>6.0f}% "
            f"{r.copy_us:>8.1f} "
            f"{r.torch_us:>9.1f} {r.gbps(r.torch_us):>6.0f} {r.torch_us / r.yaie_us:>7.1f}x"
        )
    from yaie.bench.attention_kernels import bench_rows, format_rows

    print()
    print(format_rows(bench_rows(copy)))
