"""``yaie bench cpu-kernels``: the CPU path's own kernels beside torch's, at the default model's shapes.

Shapes are one decode step of SmolLM2-135M (30 layers, hidden 576, 9 query / 3 KV heads of 64,
MLP 1536, vocabulary 49,152), fp32, on as many threads as torch uses.

- Projections: the 121 weight matrices of a step (each layer's fused QKV, output, fused
  gate/up and down projections, then the LM head), every one a distinct tensor, so together
  they are 540 MB and each step reads them from memory, as a real step does. Run through
  ``gemv`` (numba), oneDNN on packed weights, and plain ``F.linear`` (MKL), for 1 to 16 rows.
  The machine's read bandwidth, measured in the same run (``sum`` over as many bytes), is the
  ceiling: at one row a projection reads each weight once and does one multiply-add with it.
- Decode attention: one layer's decodes over paged K/V with shuffled block tables, the numba
  kernel (``paged_attention_kernels``) against the torch path (gather + SDPA).

Figures are medians of interleaved rounds (every variant once per round), so load that comes
and goes on a shared machine weighs on all of them alike; compare ratios within one run.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from yaie.kernels.attention import paged_attention_kernels, paged_attention_reference
from yaie.kernels.linear import CpuWeight, gemv, pack_weight
from yaie.model.attention import AttentionMetadata

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 30, 576, 9, 3, 64, 1536, 49152
BLOCK_SIZE = 16


def _median_ms(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each callable over ``rounds`` interleaved rounds (after one
    warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _step_weights() -> list[torch.Tensor]:
    per_layer = [
        (HIDDEN + 2 * KV_HEADS * HEAD_DIM, HIDDEN),
        (HIDDEN, HIDDEN),
        (2 * MLP, HIDDEN),
        (HIDDEN, MLP),
    ]
    return [torch.randn(shape) * 0.02 for _ in range(LAYERS) for shape in per_layer] + [
        torch.randn(VOCAB, HIDDEN) * 0.02
    ]


def _onednn(x: torch.Tensor, packed: CpuWeight, bias: None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed.onednn, None, "none", [None], "")


def _project(linear: Callable, inputs: list[torch.Tensor], weights: list) -> None:
    for x, w in zip(inputs, weights):
        linear(x, w, None)


def projections(rounds: int) -> list[tuple[str, ...]]:
    """Rows of (rows, gemv ms, oneDNN ms, F.linear ms, gemv GB/s)."""
    weights = _step_weights()
    packed = [pack_weight(w) for w in weights]
    total_bytes = sum(w.numel() * w.element_size() for w in weights)
    flat = torch.cat([w.flatten() for w in weights])
    read_ms = _median_ms({"sum": flat.sum}, rounds)["sum"]
    read_gbps = total_bytes / read_ms / 1e6
    del flat
    table = [("read bandwidth (sum)", f"{read_gbps:.1f} GB/s", "", "", "")]
    for rows in (1, 2, 4, 8, 16):
        x = torch.randn(rows, HIDDEN)
        h = torch.randn(rows, MLP)
        inputs = [h if w.shape[1] == MLP else x for w in weights]
        runs = {
            "gemv": partial(_project, gemv, inputs, [p.rows for p in packed]),
            "onednn": partial(_project, _onednn, inputs, packed),
            "torch": partial(_project, F.linear, inputs, weights),
        }
        ms = _median_ms(runs, rounds)
        table.append(
            (
                f"{rows} row(s)",
                f"{ms['gemv']:.1f}",
                f"{ms['onednn']:.1f}",
                f"{ms['torch']:.1f}",
                f"{total_bytes / ms['gemv'] / 1e6:.1f} GB/s",
            )
        )
    return table


def _decode_batch(num_seqs: int, context: int, seed: int = 0):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    """``num_seqs`` decodes of about ``context`` tokens in shuffled blocks: q, caches, metadata."""
    lens = [rng.randint(context * 9 // 10, context * 11 // 10) for _ in range(num_seqs)]
    needed = [-(-n // BLOCK_SIZE) for n in lens]
    free = list(range(1, sum(needed) + 1))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in needed]
    slots = [
        t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE for t, n in zip(tables, lens)
    ]
    meta = AttentionMetadata.build(
        list(range(num_seqs + 1)), lens, tables, slots, BLOCK_SIZE, "cpu"
    )
    k_cache = torch.randn(sum(needed) + 1, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return torch.randn(num_seqs, HEADS, HEAD_DIM), k_cache, torch.randn_like(k_cache), meta


def _layers(attend: Callable, args: tuple) -> None:
    """Ten calls, so the figure is above the timer's noise; reported per call."""
    for _ in range(10):
        attend(*args)


def decode_attention(rounds: int) -> list[tuple[str, ...]]:
    """Rows of (batch x context, numba us/layer, torch us/layer, speed-up)."""
    table = []
    for num_seqs, context in ((1, 100), (16, 100), (1, 1000), (16, 1000)):
        q, k_cache, v_cache, meta = _decode_batch(num_seqs, context)
        args = (q, k_cache, v_cache, meta, HEAD_DIM**-0.5)
        runs = {
            "numba": partial(_layers, paged_attention_kernels, args),
            "torch": partial(_layers, paged_attention_reference, args),
        }
        ms = _median_ms(runs, rounds)
        table.append(
            (
                f"{num_seqs} x ~{context}",
                f"{ms['numba'] * 100:.0f}",
                f"{ms['torch'] * 100:.0f}",
                f"{ms['torch'] / ms['numba']:.1f}x",
            )
        )
    return table


def _print(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    print(f"\n{title}")
    print("".join(f"{h:>22}" for h in header))
    for row in rows:
        print("".join(f"{cell:>22}" for cell in row))


def run(rounds: int = 7) -> None:
    print(
        f"yaie bench cpu-kernels: SmolLM2-135M decode shapes, fp32, {torch.get_num_threads()} "
        f"threads, median of {rounds} interleaved rounds"
    )
    _print(
        "projections of one decode step (121 matrices, 540 MB), ms",
        ("rows", "gemv (numba)", "oneDNN packed", "F.linear (MKL)", "gemv read rate"),
        projections(rounds),
    )
    _print(
        "decode attention, one layer, us",
        ("decodes x context", "numba kernel", "torch (gather+SDPA)", "speed-up"),
        decode_attention(rounds),
    )
