"""``yaie bench cpu-kernels``: the CPU path's own kernels beside torch's, at the default model's shapes.

Shapes are one decode step of SmolLM2-135M (30 layers, hidden 576, 9 query / 3 KV heads of 64,
MLP 1536, vocabulary 49,152), fp32, on as many threads as torch uses.

- Projections: the 121 weight matrices of a step (each layer's fused QKV, output, fused
  gate/up and down projections, then the LM head), every one a distinct tensor, so together
  they are 540 MB in fp32 and each step reads them from memory, as a real step does. Their
  values are those of the default model's GGUF (Q4_1 for the layers, Q8_0 for the LM head,
  through gguf-py's quantizer and reader), so every path computes with the same weights: the
  quantized kernel (``grid_linear``, numba, reading 111 MB),
  ``gemv`` (numba), oneDNN on packed weights, and plain ``F.linear`` (MKL), for 1 to 64 rows.
  The machine's read bandwidth, measured in the same run (``sum`` over the fp32 bytes), is the
  fp32 paths' ceiling: at one row a projection reads each weight once and does one
  multiply-add with it.
- Decode attention: one layer's decodes over paged K/V with shuffled block tables, the numba
  kernel (``paged_attention_kernels``) against the torch path (gather + SDPA). "Warm" calls
  one layer again and again, so its K/V stays in the caches; "cold" visits the caches of
  several layers (together over 128 MB, four times the L3) in turn, as a model step does,
  where the weights stream through the caches between two visits of a layer.
- Per-layer elementwise ops: RMSNorm, fused add + RMSNorm, rotary + K/V write (with and
  without Qwen3's q/k norm) and SiLU-and-mul, the numba CPU kernels
  (``yaie.kernels.elementwise_cpu``) against the torch references, per call.

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
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from yaie.kernels.activation import silu_and_mul_reference
from yaie.kernels.attention import paged_attention_kernels, paged_attention_reference
from yaie.kernels.elementwise_cpu import rms_norm_cpu, rotary_write_kv_cpu, silu_and_mul_cpu
from yaie.kernels.grid_linear import grid_linear
from yaie.kernels.linear import CpuWeight, gemv, pack_weight
from yaie.kernels.rms_norm import fused_add_rms_norm_reference, rms_norm_reference
from yaie.kernels.rotary import build_cos_sin_cache
from yaie.kernels.rotary_kv import rotary_write_kv_reference
from yaie.model.attention import AttentionMetadata

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 30, 576, 9, 3, 64, 1536, 49152
BLOCK_SIZE = 16
EPS = 1e-5
COLD_BYTES = 128 << 20
"""K/V bytes the cold decode-attention rows cycle through: four times this machine's L3."""


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
    layers = [_as_loaded(torch.randn(shape) * 0.02, GGMLQuantizationType.Q4_1)
              for _ in range(LAYERS) for shape in per_layer]
    return layers + [_as_loaded(torch.randn(VOCAB, HIDDEN) * 0.02, GGMLQuantizationType.Q8_0)]


def _as_loaded(weight: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """``weight``'s values once written to a GGUF as ``qtype`` and loaded back."""
    values = dequantize(quantize(weight.numpy(), qtype), qtype)
    return torch.from_numpy(values.reshape(weight.shape))


def _onednn(x: torch.Tensor, packed: CpuWeight, bias: None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed.onednn, None, "none", [None], "")


def _project(linear: Callable, inputs: list[torch.Tensor], weights: list) -> None:
    for x, w in zip(inputs, weights):
        linear(x, w, None)


def projections(rounds: int) -> list[tuple[str, ...]]:
    """Rows of (rows, grid ms, gemv ms, oneDNN ms, F.linear ms, grid and gemv GB/s)."""
    weights = _step_weights()
    packed = [pack_weight(w) for w in weights]
    total_bytes = sum(w.numel() * w.element_size() for w in weights)
    grid_bytes = sum(p.grid.nbytes for p in packed)
    flat = torch.cat([w.flatten() for w in weights])
    read_ms = _median_ms({"sum": flat.sum}, rounds)["sum"]
    read_gbps = total_bytes / read_ms / 1e6
    del flat
    table = [("read bandwidth (sum)", "", "", "", "", f"{read_gbps:.1f} GB/s"),
             ("bytes read", f"{grid_bytes / 1e6:.0f} MB", f"{total_bytes / 1e6:.0f} MB", "", "",
              "")]
    for rows in (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(rows, HIDDEN)
        h = torch.randn(rows, MLP)
        inputs = [h if w.shape[1] == MLP else x for w in weights]
        runs = {
            "grid": partial(_project, grid_linear, inputs, [p.grid for p in packed]),
            "gemv": partial(_project, gemv, inputs, [p.rows for p in packed]),
            "onednn": partial(_project, _onednn, inputs, packed),
            "torch": partial(_project, F.linear, inputs, weights),
        }
        ms = _median_ms(runs, rounds)
        table.append(
            (
                f"{rows} row(s)",
                f"{ms['grid']:.1f}",
                f"{ms['gemv']:.1f}",
                f"{ms['onednn']:.1f}",
                f"{ms['torch']:.1f}",
                f"{grid_bytes / ms['grid'] / 1e6:.1f} / {total_bytes / ms['gemv'] / 1e6:.1f} GB/s",
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


def _calls(fn: Callable, args_per_call: list[tuple], repeat: int = 1) -> None:
    """``fn(*args)`` for each argument tuple, ``repeat`` times over, so the figure is above the
    timer's noise; reported per call."""
    for _ in range(repeat):
        for args in args_per_call:
            fn(*args)


def decode_attention(rounds: int) -> list[tuple[str, ...]]:
    """Rows of (batch x context, numba warm / cold us per layer, torch warm / cold, speed-up
    cold)."""
    table = []
    for num_seqs, context in ((1, 100), (16, 100), (1, 1000), (16, 1000)):
        first = _decode_batch(num_seqs, context)
        layer_bytes = 2 * first[1].numel() * first[1].element_size()
        cold = [first] + [
            _decode_batch(num_seqs, context, seed)
            for seed in range(1, max(2, -(-COLD_BYTES // layer_bytes)))
        ]
        calls = len(cold)
        warm = [first] * calls
        runs = {
            f"{name} {kind}": partial(
                _calls, attend, [(*batch, HEAD_DIM**-0.5) for batch in batches]
            )
            for name, attend in (
                ("numba", paged_attention_kernels),
                ("torch", paged_attention_reference),
            )
            for kind, batches in (("warm", warm), ("cold", cold))
        }
        us = {name: ms * 1e3 / calls for name, ms in _median_ms(runs, rounds).items()}
        table.append(
            (
                f"{num_seqs} x ~{context}",
                f"{us['numba warm']:.0f} / {us['numba cold']:.0f}",
                f"{us['torch warm']:.0f} / {us['torch cold']:.0f}",
                f"{us['torch cold'] / us['numba cold']:.1f}x",
            )
        )
    return table


def elementwise_ops(rounds: int) -> list[tuple[str, ...]]:
    """Rows of (op x rows, numba us per call, torch us per call, speed-up)."""
    torch.manual_seed(0)
    weight = torch.randn(HIDDEN)
    norms = (torch.randn(HEAD_DIM), torch.randn(HEAD_DIM), EPS)
    cos_sin = build_cos_sin_cache(HEAD_DIM, 4096, 10000.0, None, torch.float32)
    k_cache = torch.zeros(256, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    table = []
    for rows in (1, 16):
        x, residual = torch.randn(rows, HIDDEN), torch.randn(rows, HIDDEN)
        gate_up = torch.randn(rows, 2 * MLP)
        qkv = torch.randn(rows, HEADS + 2 * KV_HEADS, HEAD_DIM)
        kv_args = (
            torch.randint(0, 4096, (rows,)),
            qkv,
            HEADS,
            KV_HEADS,
            cos_sin,
            k_cache,
            v_cache,
            torch.randperm(k_cache.shape[0] * BLOCK_SIZE)[:rows],
        )
        ops = {
            "rms_norm": (
                (rms_norm_cpu, (x, weight, EPS)),
                (rms_norm_reference, (x, weight, EPS)),
            ),
            "add + rms_norm": (
                (rms_norm_cpu, (x, weight, EPS, residual)),
                (fused_add_rms_norm_reference, (x, residual, weight, EPS)),
            ),
            "rotary_write_kv": (
                (rotary_write_kv_cpu, kv_args),
                (rotary_write_kv_reference, kv_args),
            ),
            "  with q/k norm": (
                (rotary_write_kv_cpu, (*kv_args, norms)),
                (rotary_write_kv_reference, (*kv_args, norms)),
            ),
            "silu_and_mul": ((silu_and_mul_cpu, (gate_up,)), (silu_and_mul_reference, (gate_up,))),
        }
        for name, ((kernel, kernel_args), (reference, reference_args)) in ops.items():
            runs = {
                "numba": partial(_calls, kernel, [kernel_args], 100),
                "torch": partial(_calls, reference, [reference_args], 100),
            }
            us = {variant: ms * 10 for variant, ms in _median_ms(runs, rounds).items()}
            table.append(
                (
                    f"{name} x{rows}",
                    f"{us['numba']:.1f}",
                    f"{us['torch']:.1f}",
                    f"{us['torch'] / us['numba']:.1f}x",
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
        "projections of one decode step (120 on a Q4_1 grid, the LM head on Q8_0), ms",
        ("rows", "grid (numba)", "gemv (numba)", "oneDNN packed", "F.linear (MKL)",
         "read rate grid / gemv"),
        projections(rounds),
    )
    _print(
        "decode attention, one layer, us, warm / cold K/V",
        ("decodes x context", "numba kernel", "torch (gather+SDPA)", "speed-up cold"),
        decode_attention(rounds),
    )
    _print(
        "per-layer elementwise ops, us per call (hidden 576, MLP 1536, 9 q / 3 KV heads of 64)",
        ("op x rows", "numba kernel", "torch reference", "speed-up"),
        elementwise_ops(rounds),
    )
