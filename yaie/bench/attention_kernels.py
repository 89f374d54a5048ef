"""Benchmarks of the numba attention kernels at Llama-3-8B shapes (32 query / 8 KV heads of 128,
bf16, blocks of 16 tokens), each beside its torch equivalent in the same run.

- Paged decode is bandwidth-bound: its figure is the KV bytes it must read over its time, and
  that as a share of the device-to-device copy bandwidth (read + write) measured in the same
  run. Its torch equivalent is SDPA over the same K/V already gathered into contiguous
  ``[B, Hkv, L, D]`` tensors (the gather itself not timed). Rows for other partition sizes show
  what the split-KV plan (``auto``) chose against. The cache's blocks are shuffled over the
  pool, as after long use; one row repeats 64 x 4,096 with each request's blocks consecutive,
  as a fresh engine lays out a prompt: the order costs the kernel 2-3% (guide, chapter 16).
- Prefill is compute-bound: TFLOP/s (the two matrix products, causal half only) beside torch
  SDPA's flash backend on contiguous tensors, and the engine's torch path on the paged cache.
- FlashAttention (fp32, educational) forward and backward beside SDPA, whose fp32 path is the
  memory-efficient kernel; backward counted as 2.5x the forward FLOPs, the usual convention.
- Block copy: bytes read + written over time.

Timing: per iteration the GPU first sleeps ~5 ms on the stream while the host enqueues the
work between two CUDA events, so the events bracket GPU time, not host launch time. When a
split decode was two numba launches (its merge is now inside the kernel), a 1 ms sleep let one
of two runs on an H100 read every 4 x 32k split decode ~200 us slower while all single-launch
rows agreed, the mark of host time leaking in, hence the longer sleep. Medians over ``iters``
iterations after warm-up. Working sets are far beyond L2 (the decode caches are
1 GB and 0.5 GB). ``python -m yaie.bench.attention_kernels`` prints the table standalone;
``bench_rows`` gives the rows to ``yaie bench kernels``.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from yaie.bench.kernels import GpuTimer
from yaie.kernels._numba import BF16
from yaie.model.attention import AttentionMetadata

_attention = importlib.import_module("yaie.kernels.attention")
_decode = importlib.import_module("yaie.kernels.decode_attention")
_prefill = importlib.import_module("yaie.kernels.prefill_attention")
_flash = importlib.import_module("yaie.kernels.flash_attention")
_copy = importlib.import_module("yaie.kernels.block_copy")

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
_SLEEP_CYCLES = 10_000_000  # ~5 ms at H100 clocks: more than any case's host launch time


@dataclass(slots=True)
class AttentionRow:
    """One benchmark line: our kernel's time and rate, and the torch equivalent's time."""

    name: str
    shape: str
    us: float
    rate: float
    unit: str  # "GB/s" (bandwidth-bound) or "TFLOP/s"
    pct_copy: float | None  # rate as % of the copy bandwidth, bandwidth-bound rows only
    torch_name: str
    torch_us: float


def _median_us(fn: Callable[[], object], iters: int) -> float:
    return GpuTimer(iters, flush=False, sleep_cycles=_SLEEP_CYCLES)(fn)


def copy_bandwidth(iters: int = 20) -> float:
    """GB/s of a 1 GiB device-to-device torch copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 1 << 30, ((1 << 30) // 8,), device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 8 / _median_us(lambda: dst.copy_(src), iters) / 1e3


class _PagedBatch:
    """Requests ``(cached prefix, new tokens)`` over the blocks of a random bf16 cache: blocks
    shuffled over the pool (the default: a pool after long use), or ``in_order`` as a fresh
    ``BlockPool`` hands a prompt its blocks (consecutive, descending)."""

    def __init__(self, requests: list[tuple[int, int]], seed: int = 0,
                 in_order: bool = False) -> None:
        rng = random.Random(seed)
        needed = [-(-(p + n) // BLOCK_SIZE) for p, n in requests]
        blocks = list(range(sum(needed)))
        if not in_order:
            rng.shuffle(blocks)
        shape = (len(blocks), BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        self.k_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        self.v_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        qsl, lens, tables, slots = [0], [], [], []
        for (prefix, new), nb in zip(requests, needed):
            tables.append([blocks.pop() for _ in range(nb)])
            lens.append(prefix + new)
            qsl.append(qsl[-1] + new)
            slots += [tables[-1][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                      for p in range(prefix, prefix + new)]
        self.meta = AttentionMetadata.build(qsl, lens, tables, slots, BLOCK_SIZE, "cuda")
        self.q = torch.randn(qsl[-1], HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        self.out = torch.empty_like(self.q)
        self.scale = HEAD_DIM**-0.5

    def gathered(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Request ``i``'s K and V as contiguous ``[Hkv, L, D]``."""
        seg_len = int(self.meta.seq_lens[i])
        table = self.meta.block_tables[i, : -(-seg_len // BLOCK_SIZE)].long()
        k = self.k_cache[table].flatten(0, 1)[:seg_len].transpose(0, 1).contiguous()
        v = self.v_cache[table].flatten(0, 1)[:seg_len].transpose(0, 1).contiguous()
        return k, v

    def decode(self, plan: _decode.DecodePlan) -> None:
        m = self.meta
        _decode.paged_decode_attention(
            self.q, self.k_cache, self.v_cache, self.out, m.block_tables, m.seq_lens,
            m.query_start_loc, m.decode_ids, m.max_seq_len, self.scale, plan,
        )

    def prefill(self) -> None:
        m = self.meta
        _prefill.paged_prefill_attention(
            self.q, self.k_cache, self.v_cache, self.out, m.block_tables, m.seq_lens,
            m.query_start_loc, m.prefill_ids, m.max_query_len, self.scale,
        )


def _decode_rows(batch: int, context: int, copy_gbps: float, iters: int,
                 fixed: list[tuple[int, int]], in_order: bool = False) -> list[AttentionRow]:
    """The plan's decode launch and the ``(warps, partitions)`` plans in ``fixed``, over
    shuffled blocks or blocks ``in_order`` (``_PagedBatch``)."""
    paged = _PagedBatch([(context - 1, 1)] * batch, in_order=in_order)
    kv_bytes = 2 * paged.k_cache.numel() * paged.k_cache.element_size()
    pairs = [paged.gathered(i) for i in range(batch)]
    k = torch.stack([p[0] for p in pairs])
    v = torch.stack([p[1] for p in pairs])
    del pairs
    q4 = paged.q.unsqueeze(2)
    torch_us = _median_us(
        lambda: F.scaled_dot_product_attention(q4, k, v, scale=paged.scale, enable_gqa=True),
        iters,
    )
    auto = _decode.plan_decode(batch, KV_HEADS, context, BF16, HEADS // KV_HEADS, HEAD_DIM,
                               torch.device("cuda"))
    rows = []
    plans = [_decode.DecodePlan(*p) for p in fixed]
    for plan in [auto] + [p for p in plans if p != auto]:
        us = _median_us(lambda plan=plan: paged.decode(plan), iters)
        split = (f"{plan.parts} parts of {-(-context // plan.parts)}" if plan.parts > 1
                 else "no split")
        label = (f"{'auto, ' if plan == auto else ''}{plan.warps} warps, {split}"
                 f"{', in order' if in_order else ''}")
        gbps = kv_bytes / us / 1e3
        rows.append(AttentionRow(
            f"paged decode ({label})",
            f"B {batch} x ctx {context}, {HEADS}/{KV_HEADS} heads x {HEAD_DIM}",
            us, gbps, "GB/s", 100 * gbps / copy_gbps, "SDPA, KV gathered contiguous", torch_us,
        ))
    return rows


def _prefill_rows(prefix: int, new: int, iters: int) -> list[AttentionRow]:
    paged = _PagedBatch([(prefix, new)])
    visible = new * prefix + new * (new + 1) // 2  # (query, key) pairs under the causal mask
    flops = 4 * HEADS * HEAD_DIM * visible
    us = _median_us(paged.prefill, iters)
    k, v = paged.gathered(0)
    q = paged.q.transpose(0, 1).unsqueeze(0)
    k, v = k.unsqueeze(0), v.unsqueeze(0)
    shape = f"{new} new over {prefix} cached, {HEADS}/{KV_HEADS} heads x {HEAD_DIM}"
    if prefix == 0:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash_us = _median_us(
                lambda: F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=paged.scale, enable_gqa=True
                ),
                iters,
            )
        rows = [AttentionRow("paged prefill (numba)", shape, us, flops / us / 1e6, "TFLOP/s",
                             None, "SDPA flash backend, contiguous", flash_us)]
    else:
        rows = [AttentionRow("paged extend (numba)", shape, us, flops / us / 1e6, "TFLOP/s",
                             None, "", 0.0)]
    path_us = _median_us(
        lambda: _attention.paged_attention_reference(
            paged.q, paged.k_cache, paged.v_cache, paged.meta, paged.scale
        ),
        iters,
    )
    rows.append(AttentionRow("  engine torch path (gather + SDPA)", shape, path_us,
                             flops / path_us / 1e6, "TFLOP/s", None, "", 0.0))
    return rows


def _flash_rows(length: int, iters: int) -> list[AttentionRow]:
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    fwd_flops = 4 * HEADS * HEAD_DIM * length * (length + 1) // 2
    shape = f"fp32 [1, {HEADS}, {length}, {HEAD_DIM}], causal"

    def ours_fwd() -> torch.Tensor:
        return _flash.flash_attention(q, k, v, causal=True)

    def torch_fwd() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    out, ref = ours_fwd(), torch_fwd()
    fwd_us = _median_us(ours_fwd, iters)
    torch_fwd_us = _median_us(torch_fwd, iters)
    bwd_us = _median_us(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True),
                        iters)
    torch_bwd_us = _median_us(
        lambda: torch.autograd.grad(ref, (q, k, v), grad, retain_graph=True), iters
    )
    return [
        AttentionRow("flash attention forward", shape, fwd_us, fwd_flops / fwd_us / 1e6,
                     "TFLOP/s", None, "SDPA (fp32)", torch_fwd_us),
        AttentionRow("flash attention backward", shape, bwd_us, 2.5 * fwd_flops / bwd_us / 1e6,
                     "TFLOP/s", None, "SDPA (fp32) backward", torch_bwd_us),
    ]


def _copy_rows(copy_gbps: float, iters: int) -> list[AttentionRow]:
    cache = torch.randn(8192, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda").bfloat16()
    perm = torch.randperm(8192, device="cuda")
    src, dst = perm[:1024], perm[1024:2048]
    moved = 2 * 1024 * cache[0].numel() * cache.element_size()
    us = _median_us(lambda: _copy.copy_blocks_numba(cache, src, dst), iters)
    torch_us = _median_us(lambda: _copy.copy_blocks_reference(cache, src, dst), iters)
    gbps = moved / us / 1e3
    return [AttentionRow("copy_blocks", f"1024 of 8192 blocks x {cache[0].numel() * 2 >> 10} KB",
                         us, gbps, "GB/s", 100 * gbps / copy_gbps, "index_select + index_copy_",
                         torch_us)]


def bench_rows(copy_gbps: float, iters: int = 30) -> list[AttentionRow]:
    """Every attention benchmark row; ``copy_gbps`` is the copy bandwidth measured in this run."""
    rows = _decode_rows(64, 4096, copy_gbps, iters, fixed=[(3, 2), (6, 1)])
    torch.cuda.empty_cache()
    rows += _decode_rows(64, 4096, copy_gbps, iters, fixed=[], in_order=True)
    torch.cuda.empty_cache()
    rows += _decode_rows(4, 32768, copy_gbps, iters, fixed=[(3, 16), (6, 8), (12, 1)])
    torch.cuda.empty_cache()
    for context in (256, 1024, 4096):  # batch 1: latency, where the split matters most
        rows += _decode_rows(1, context, copy_gbps, iters, fixed=[(3, 16), (12, 1)])
    rows += _prefill_rows(0, 4096, max(5, iters // 3))
    rows += _prefill_rows(3584, 512, iters)
    rows += _flash_rows(2048, max(5, iters // 3))
    rows += _copy_rows(copy_gbps, iters)
    return rows


def format_rows(rows: list[AttentionRow]) -> str:
    header = (f"{'kernel':<50} {'shape':<44} {'us':>9} {'rate':>8} {'unit':<7} {'% copy':>6}  "
              f"{'torch us':>9} {'speedup':>7}  torch equivalent")
    lines = [header, "-" * len(header)]
    for r in rows:
        pct = f"{r.pct_copy:>5.0f}%" if r.pct_copy is not None else " " * 6
        torch_us = f"{r.torch_us:>9.1f} {r.torch_us / r.us:>6.2f}x" if r.torch_us else " " * 17
        lines.append(f"{r.name:<50} {r.shape:<44} {r.us:>9.1f} {r.rate:>8.1f} {r.unit:<7} "
                     f"{pct}  {torch_us}  {r.torch_name}")
    return "\n".join(lines)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("yaie attention benchmarks need a CUDA GPU (torch sees none here)")
    copy = copy_bandwidth()
    print(f"yaie attention kernels on {torch.cuda.get_device_name()}: copy ceiling "
          f"{copy:.0f} GB/s (1 GiB device-to-device torch copy, read + write)")
    print(format_rows(bench_rows(copy)))


if __name__ == "__main__":
    main()
