"""Compile every numba kernel specialisation the engine launches, ahead of time.

``python -m yaie.kernels.build`` (also ``./build_kernels.sh``, ``make build-kernels`` and
``python setup_kernels.py build_ext --inplace``) compiles each kernel for the local GPU into
numba's on-disk cache (every kernel is ``cache=True``), so the engine's first request loads
machine code instead of waiting for NVVM, and prints what it compiled. Without a usable CUDA GPU
it says the engine will run the torch reference ops and exits 0: there is nothing to build.

numba specialises a kernel on its argument types: dtype, number of dims and layout (``C`` for
contiguous, ``A`` for strided) of every array. So each entry of ``WARMUPS`` makes one launch on
tiny operands shaped the way the engine shapes them (hidden states contiguous, q/k/v strided
slices of the fused QKV output, ...), through the same code path the engine takes; the compiled
specialisation is then exactly the one the engine's calls hit. ``warmup(dtype)`` runs them all
in-process, which is also what must happen before a CUDA graph is captured: compilation cannot
happen inside a capture. To add a kernel, append a ``Warmup``.

numba invalidates a cached kernel when its own source file changes, not when a device function
it calls from another file does (``kernels/_numba.py``'s conversions): after editing one, run
with ``--rebuild``, which deletes the cached kernels next to the sources first.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from yaie.kernels._numba import KINDS, gpu_available

_rms_norm = importlib.import_module("yaie.kernels.rms_norm")
_rotary = importlib.import_module("yaie.kernels.rotary")
_rotary_kv = importlib.import_module("yaie.kernels.rotary_kv")
_activation = importlib.import_module("yaie.kernels.activation")
_argmax = importlib.import_module("yaie.kernels.argmax")
_kv_cache = importlib.import_module("yaie.kernels.kv_cache")
_decode = importlib.import_module("yaie.kernels.decode_attention")
_prefill = importlib.import_module("yaie.kernels.prefill_attention")
_block_copy = importlib.import_module("yaie.kernels.block_copy")
_layer_norm = importlib.import_module("yaie.kernels.layer_norm")

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

# Tiny engine-shaped operands: sizes don't change the specialisation, layouts do.
_TOKENS, _HEADS, _KV_HEADS, _HEAD_DIM, _HIDDEN = 3, 4, 2, 64, 256

ATTENTION_SHAPES: list[tuple[int, int, int]] = [(9, 3, 64), (32, 8, 128)]
"""``(query heads, KV heads, head_dim)`` the attention kernels are built for, with the default
block size: the default model's (SmolLM2-135M) and Llama-3-8B's. The attention kernels are
compiled per GQA group, head dim and block size (they size registers and unroll loops), so a
model of another shape compiles its own on first use, or ahead with
``warmup(dtype, warmups=attention_warmups(shape))``."""
_BLOCK_SIZE = 16  # EngineArgs' default


def _qkv(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """q, k, v as the attention layer makes them: strided head slices of one QKV output."""
    qkv = torch.randn(_TOKENS, _HEADS + 2 * _KV_HEADS, _HEAD_DIM, dtype=dtype, device=device)
    return qkv.split((_HEADS, _KV_HEADS, _KV_HEADS), dim=1)


def _run_rms_norm(dtype: torch.dtype, device: torch.device) -> None:
    x = torch.randn(_TOKENS, _HIDDEN, dtype=dtype, device=device)
    _rms_norm.rms_norm_numba(x, torch.ones(_HIDDEN, dtype=dtype, device=device), 1e-6)


def _run_qk_norm(dtype: torch.dtype, device: torch.device) -> None:
    q, _, _ = _qkv(dtype, device)
    _rms_norm.rms_norm_numba(q, torch.ones(_HEAD_DIM, dtype=dtype, device=device), 1e-6)


def _run_fused_add_rms_norm(dtype: torch.dtype, device: torch.device) -> None:
    """``x`` plain, then as 2 and 4 split-K partial sums (a specialisation each)."""
    residual = torch.randn(_TOKENS, _HIDDEN, dtype=dtype, device=device)
    weight = torch.ones(_HIDDEN, dtype=dtype, device=device)
    for parts in (1, 2, 4):
        x = torch.randn(parts, _TOKENS, _HIDDEN, dtype=dtype, device=device)
        _rms_norm.fused_add_rms_norm_numba(x[0] if parts == 1 else x, residual, weight, 1e-6)


def _run_rotary(dtype: torch.dtype, device: torch.device) -> None:
    q, k, _ = _qkv(dtype, device)
    cache = _rotary.build_cos_sin_cache(_HEAD_DIM, 16, 10000.0, None, dtype).to(device)
    positions = torch.arange(_TOKENS, device=device)
    _rotary.apply_rotary_numba(positions, q, k, cache)


def _run_rotary_write_kv(qk_norm: bool) -> Callable[[torch.dtype, torch.device], None]:
    def run(dtype: torch.dtype, device: torch.device) -> None:
        qkv = torch.randn(_TOKENS, _HEADS + 2 * _KV_HEADS, _HEAD_DIM, dtype=dtype, device=device)
        k_cache, v_cache = torch.zeros(2, 4, 16, _KV_HEADS, _HEAD_DIM, dtype=dtype, device=device)
        table = _rotary.build_cos_sin_cache(_HEAD_DIM, 16, 10000.0, None, dtype).to(device)
        weight = torch.ones(_HEAD_DIM, dtype=dtype, device=device)
        _rotary_kv.rotary_write_kv_numba(
            torch.arange(_TOKENS, device=device), qkv, _HEADS, _KV_HEADS, table, k_cache,
            v_cache, torch.tensor([0, -1, 17], device=device),
            (weight, weight, 1e-6) if qk_norm else None,
        )

    return run


def _run_silu_and_mul(dtype: torch.dtype, device: torch.device) -> None:
    _activation.silu_and_mul_numba(torch.randn(_TOKENS, 2 * _HIDDEN, dtype=dtype, device=device))


def _run_layer_norm(dtype: torch.dtype, device: torch.device) -> None:
    x = torch.randn(_TOKENS, _HIDDEN, dtype=dtype, device=device)
    weight, bias = torch.ones(2, _HIDDEN, dtype=dtype, device=device)
    _layer_norm.layer_norm_numba(x, weight, bias, 1e-5)


def _run_fused_add_layer_norm(dtype: torch.dtype, device: torch.device) -> None:
    x, residual = torch.randn(2, _TOKENS, _HIDDEN, dtype=dtype, device=device)
    weight, bias = torch.ones(2, _HIDDEN, dtype=dtype, device=device)
    _layer_norm.fused_add_layer_norm_numba(x, residual, weight, bias, 1e-5)


def _run_gelu_tanh(dtype: torch.dtype, device: torch.device) -> None:
    _activation.gelu_tanh_numba(torch.randn(_TOKENS, 4 * _HIDDEN, dtype=dtype, device=device))


def _run_write_kv(dtype: torch.dtype, device: torch.device) -> None:
    _, k, v = _qkv(dtype, device)
    k_cache, v_cache = torch.zeros(2, 4, 16, _KV_HEADS, _HEAD_DIM, dtype=dtype, device=device)
    slots = torch.tensor([0, -1, 17], device=device)
    _kv_cache.write_kv_numba(k, v, k_cache, v_cache, slots)


class _PagedBatch:
    """Two decodes (contexts of 40 and 7 tokens) and a 5-token prefill over a 30-token prefix,
    on a small paged cache, with q a strided slice of a fused QKV output as the model has it."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device):
        heads, kv_heads, head_dim = shape
        self.qkv = torch.randn(7, heads + 2 * kv_heads, head_dim, dtype=dtype, device=device)
        self.q = self.qkv[:, :heads]
        self.out = torch.empty(self.q.shape, dtype=dtype, device=device)
        cache = (8, _BLOCK_SIZE, kv_heads, head_dim)
        self.k_cache = torch.randn(cache, dtype=dtype, device=device)
        self.v_cache = torch.randn(cache, dtype=dtype, device=device)
        ints = {"dtype": torch.int32, "device": device}
        self.block_tables = torch.tensor([[0, 1, 2], [3, 0, 0], [4, 5, 6]], **ints)
        self.seq_lens = torch.tensor([40, 7, 35], **ints)
        self.query_start_loc = torch.tensor([0, 1, 2, 7], **ints)
        self.scale = head_dim**-0.5

    def decode(self, plan: _decode.DecodePlan, rope: bool = False) -> None:
        """The two decodes; ``rope``: as a decode-only step of a Llama model runs them, with
        rotary and the K/V store in the kernel (``DecodeRope``)."""
        device = self.q.device
        ids = torch.tensor([0, 1], dtype=torch.int32, device=device)
        with_rope = None
        if rope:
            head_dim, heads = self.q.shape[2], self.q.shape[1]
            table = _rotary.build_cos_sin_cache(head_dim, 64, 10000.0, None, self.q.dtype)
            slots = torch.tensor([39, 55, -1, -1, -1, -1, -1], device=device)
            with_rope = _decode.DecodeRope(self.qkv[:, heads:], torch.arange(7, device=device),
                                           table.to(device), slots)
        _decode.paged_decode_attention(
            self.q, self.k_cache, self.v_cache, self.out, self.block_tables, self.seq_lens,
            self.query_start_loc, ids, 40, self.scale, plan, min_part_tokens=16, rope=with_rope,
        )

    def prefill(self) -> None:
        ids = torch.tensor([2], dtype=torch.int32, device=self.q.device)
        _prefill.paged_prefill_attention(
            self.q, self.k_cache, self.v_cache, self.out, self.block_tables, self.seq_lens,
            self.query_start_loc, ids, 5, self.scale,
        )


def attention_warmups(shape: tuple[int, int, int]) -> list[Warmup]:
    """Decode at every block width (whole context, and split-KV with its in-kernel merge) and
    prefill for one shape."""
    heads, kv_heads, head_dim = shape
    group, label = heads // kv_heads, f"{heads}/{kv_heads}x{head_dim}"

    def decode(plan: _decode.DecodePlan, rope: bool) -> Warmup:
        split = plan.parts > 1
        mode = _decode.ROPE if rope else _decode.NO_ROPE
        what = f"{'split-KV' if split else 'whole'}{', rotary' if rope else ''}"
        return Warmup(
            f"paged decode {label}, {plan.warps} warps, {what}",
            lambda dtype: _decode.decode_kernel(
                KINDS[dtype], group, head_dim, _BLOCK_SIZE, split, plan.warps, mode
            ),
            lambda dtype, device: _PagedBatch(shape, dtype, device).decode(plan, rope),
        )

    return [
        *(decode(_decode.DecodePlan(warps, parts), rope)
          for warps in _decode.WARP_CHOICES for rope in (False, True) for parts in (1, 3)
          if _decode.decode_fits(group, head_dim, warps)),
        Warmup(f"paged prefill {label}",
               lambda dtype: _prefill.prefill_kernel(KINDS[dtype], group, head_dim, _BLOCK_SIZE),
               lambda dtype, device: _PagedBatch(shape, dtype, device).prefill()),
    ]


def _run_argmax(dtype: torch.dtype, device: torch.device) -> None:
    """The sampler's argmax: logits are fp32 whatever the model's dtype (``compute_logits``)."""
    _argmax.argmax_numba(torch.randn(2, 2 * _argmax.CHUNK + 1, device=device))


def _run_copy_blocks(dtype: torch.dtype, device: torch.device) -> None:
    cache = torch.randn(4, _BLOCK_SIZE, _KV_HEADS, _HEAD_DIM, dtype=dtype, device=device)
    src, dst = torch.tensor([[0], [2]], device=device)
    _block_copy.copy_blocks_numba(cache, src, dst)


@dataclass(frozen=True, slots=True)
class Warmup:
    """One specialisation the engine launches.

    ``kernel(dtype)`` is the numba dispatcher the launch goes to; ``run(dtype, device)`` makes
    the launch, on operands with the engine's dtypes, dims and layouts.
    """

    name: str
    kernel: Callable[[torch.dtype], object]
    run: Callable[[torch.dtype, torch.device], None]


WARMUPS: list[Warmup] = [
    Warmup("rms_norm", _rms_norm.RMS_NORM_KERNELS.__getitem__, _run_rms_norm),
    Warmup("rms_norm (q/k heads)", _rms_norm.RMS_NORM_KERNELS.__getitem__, _run_qk_norm),
    Warmup(
        "fused_add_rms_norm",
        _rms_norm.FUSED_ADD_RMS_NORM_KERNELS.__getitem__,
        _run_fused_add_rms_norm,
    ),
    Warmup("apply_rotary", _rotary.ROTARY_KERNELS.__getitem__, _run_rotary),
    Warmup("rotary_write_kv", lambda dtype: _rotary_kv.ROTARY_KV_KERNELS[dtype, False],
           _run_rotary_write_kv(False)),
    Warmup("  with q/k norm", lambda dtype: _rotary_kv.ROTARY_KV_KERNELS[dtype, True],
           _run_rotary_write_kv(True)),
    Warmup("silu_and_mul", _activation.SILU_AND_MUL_KERNELS.__getitem__, _run_silu_and_mul),
    Warmup("write_kv", lambda dtype: _kv_cache.write_kv_kernel, _run_write_kv),
    Warmup("layer_norm", _layer_norm.LAYER_NORM_KERNELS.__getitem__, _run_layer_norm),
    Warmup(
        "fused_add_layer_norm",
        _layer_norm.FUSED_ADD_LAYER_NORM_KERNELS.__getitem__,
        _run_fused_add_layer_norm,
    ),
    Warmup("gelu_tanh", _activation.GELU_TANH_KERNELS.__getitem__, _run_gelu_tanh),
    Warmup("copy_blocks", lambda dtype: _block_copy.copy_blocks_kernel, _run_copy_blocks),
    Warmup("argmax (fp32 logits)", lambda dtype: _argmax.argmax_f32, _run_argmax),
    *(w for shape in ATTENTION_SHAPES for w in attention_warmups(shape)),
]


@dataclass(slots=True)
class Built:
    """One row of the build table."""

    name: str
    kernel: str
    dtype: torch.dtype
    types: str
    seconds: float


def _describe(types: tuple) -> str:
    """A numba argument-type tuple, short: ``int64[3d A]`` for a strided 3-D array."""
    parts = []
    for t in types:
        ndim, layout = getattr(t, "ndim", None), getattr(t, "layout", None)
        parts.append(f"{t.dtype}[{ndim}d {layout}]" if ndim else str(t))
    return ", ".join(parts)


def warmup(
    dtype: torch.dtype, device: torch.device | str = "cuda", warmups: list[Warmup] | None = None
) -> list[Built]:
    """Compile (or load from numba's cache) and launch every kernel for ``dtype``.

    Call it before capturing CUDA graphs of a model in ``dtype``; returns what each launch
    compiled and how long it took (a cache hit takes milliseconds).
    """
    device = torch.device(device)
    built = []
    for entry in WARMUPS if warmups is None else warmups:
        kernel = entry.kernel(dtype)
        before = set(kernel.overloads)
        start = time.perf_counter()
        entry.run(dtype, device)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        new = [sig for sig in kernel.overloads if sig not in before]
        types = "; ".join(_describe(sig) for sig in new) or "(already loaded)"
        built.append(Built(entry.name, kernel.py_func.__name__, dtype, types, seconds))
    return built


def clear_cache() -> int:
    """Delete numba's cached kernels (index ``.nbi`` and code ``.nbc``) beside the sources."""
    removed = 0
    for path in (Path(__file__).parent / "__pycache__").glob("*.nb[ic]"):
        path.unlink()
        removed += 1
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m yaie.kernels.build",
        description="compile YAIE's numba kernels for the local GPU into numba's on-disk cache",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        action="append",
        help="activation dtype to build for (repeatable; default: all)",
    )
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="delete the cached kernels first (after editing kernels/_numba.py)",
    )
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and gpu_available()):
        print(
            "yaie kernels: no CUDA GPU usable by torch and numba-cuda here; the engine runs the "
            "torch reference ops (CPU fallback). Nothing to build."
        )
        return 0
    name = torch.cuda.get_device_name()
    cc = ".".join(map(str, torch.cuda.get_device_capability()))
    print(f"yaie kernels: building for {name} (compute capability {cc})")
    if args.rebuild:
        print(f"removed {clear_cache()} cached kernel files")
    rows = []
    start = time.perf_counter()
    for key in args.dtype or list(DTYPES):
        rows += warmup(DTYPES[key])
    widths = (max(len(row.name) for row in rows), 26, 6, 9)
    header = ("op", "kernel", "dtype", "seconds")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  types")
    for row in rows:
        dtype = str(row.dtype).removeprefix("torch.")
        cells = (row.name, row.kernel, dtype, f"{row.seconds:.2f}")
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + row.types)
    print(f"{len(rows)} specialisations in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
