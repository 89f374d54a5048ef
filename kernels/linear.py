"""Dense projections ``y = x W^T + b``, and the CPU paths that make them fast.

On CUDA, GEMMs stay on torch (cuBLAS). On CPU a decode step is a stream of weights: at batch 1
every weight is read once to make one row of output, so the step takes as long as reading the
model from memory. A weight whose values lie on a quantization grid (a model loaded from a Q4_1
or Q8_0 GGUF, the default one among them) takes the kernel of ``yaie.kernels.grid_linear`` up
to ``GRID_MAX_ROWS`` rows: it reads 0.75 or 1.125 bytes a weight instead of 4 and computes with
the same values. Other fp32 weights take one of two paths, chosen by the number of rows:

- **A few rows (decode of 1-2 requests): ``gemv``**, a numba kernel that splits the output
  features across the CPU's threads and computes each as a plain dot product over one
  contiguous weight row. Nothing but the weight stream touches memory, so it reads at close to
  the machine's read bandwidth. Measured on SmolLM2-135M shapes (2-core AMD EPYC, fp32, the 121
  projections of one decode step with cold weights, ``yaie bench cpu-kernels``, 2026-11-25):
  1 row 18.0 ms (30 GB/s) against 24.8 ms for oneDNN and 44.5 ms for MKL's sgemm
  (``F.linear``); 2 rows 16.6 against 27.8 ms; 4 rows 21.2 against 22.0 ms (a tie, within the
  run-to-run noise). Inside the model (one decode, context ~40) the projections took 18.5 ms
  of a 26.3 ms step with ``gemv`` against 26.5 of 35.5 ms with oneDNN.
- **More rows: oneDNN** with the weight reordered once into its blocked layout
  (``pack_weight``). From about 8 rows a GEMM reuses each weight many times from registers,
  which oneDNN's kernels do and a dot-product loop does not (16 rows: 33.5 ms against 62.4 ms).
  Inductor uses the same two ops for frozen CPU linears; they are private but have been stable
  since torch 2.0.

``gemv`` sums in a different order than torch (``fastmath`` lets LLVM vectorize the dot
product), so results differ from ``F.linear`` by float32 rounding, as oneDNN's do.

**Split-K on CUDA (``linear_partials``).** A decode step's GEMM has a handful of rows, so cuBLAS
can only spread the weight over the GPU by cutting the input features into slices and summing
the slices' products: for the projections that end a sub-layer (attention output, MLP down) it
picks a split-K kernel followed by a reduction kernel of its own, 1.7 us a launch. The sum
need not be a launch: those projections feed the residual add, whose kernel
(``fused_add_rms_norm``) reads them anyway. So ``linear_partials`` runs the product as one
batched GEMM over ``S`` slices of a strided view of the weight (no copy) and returns the ``S``
unsummed ``[S, T, out]`` partial products; the norm adds them into the residual stream with the
rest. It is tensor parallelism's row split inside one GPU, with the all-reduce folded into the
next op. Measured on an H100 (bf16, one GEMM per weight, 32 weights in a CUDA graph, 1 and 16
rows; 2026-11-25): Llama-3-8B ``o_proj`` 15.5 us as ``F.linear``, 14.0 us in 2 slices;
``down_proj`` 44.3 against 41.8 us; Qwen3-0.6B ``o_proj`` 5.8 against 4.4 us and ``down_proj``
7.6 against 5.0 us in 4 slices. From 64 rows the gain fades (8B ``o_proj`` 15.0 either way),
and by prefill sizes one plain GEMM fills the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F

from yaie.kernels.cpu import run_parallel
from yaie.kernels.grid_linear import GRID_MAX_ROWS, GridWeight, find_grid, grid_linear

# oneDNN picks its blocking for this many rows; measured as good for 1-row decodes too.
PACK_BATCH_HINT = 512

GEMV_MAX_ROWS = 2
"""Most rows ``linear`` sends to ``gemv``; above it oneDNN is faster (see the module docstring)."""

SPLIT_K_MAX_ROWS = 64
"""Most rows ``linear_partials`` splits; the measured gain ends about there (module docstring)."""

SPLIT_K_SMALL_WEIGHT = 16 << 20
"""Weights under this many bytes split 4 ways, larger ones 2 ways: a small weight's slices are
each too small to keep the GPU busy alone (4 slices were faster than 2 for Qwen3-0.6B's 4-6 MB
projections and slower for Llama-3-8B's 32-117 MB ones)."""


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _gemv_kernel(w: np.ndarray, x: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """``out[m, n] = x[m] . w[n] + bias[n]`` (``bias`` empty for none).

    ``prange`` hands each thread one contiguous range of output features, so each thread
    streams its own slice of ``w`` from memory exactly once; the ``x`` rows stay in L1.
    """
    num_out, num_in = w.shape
    has_bias = bias.shape[0] > 0
    for n in numba.prange(num_out):
        for m in range(x.shape[0]):
            acc = np.float32(0.0)
            for k in range(num_in):
                acc += w[n, k] * x[m, k]
            out[m, n] = acc + bias[n] if has_bias else acc


_NO_BIAS = np.empty(0, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class CpuWeight:
    """A CPU weight prepared once, at load, for the fast paths (``pack_weight``).

    ``onednn`` is oneDNN's blocked copy (opaque, not a strided tensor); ``rows`` is a numpy
    view of the fp32 weight for ``gemv`` (``None`` for bf16), made once because converting a
    tensor at every call would cost a tenth of a small projection; ``grid`` is the weight's
    quantized form where it has one (``yaie.kernels.grid_linear``: weights from a Q4_1 or Q8_0
    GGUF).
    """

    onednn: torch.Tensor
    rows: np.ndarray | None
    grid: GridWeight | None = None


def gemv(x: torch.Tensor, rows: np.ndarray, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [T, in] W^T + b`` for a few float32 rows, ``rows`` being ``W [out, in]`` as numpy."""
    x = x if x.is_contiguous() else x.contiguous()
    out = torch.empty(x.shape[0], rows.shape[0], dtype=torch.float32)
    run_parallel(
        _gemv_kernel,
        rows,
        x.numpy(),
        _NO_BIAS if bias is None else bias.detach().numpy(),
        out.numpy(),
    )
    return out


def pack_weight(weight: torch.Tensor) -> CpuWeight | None:
    """``weight [out, in]`` prepared for the CPU fast paths, or ``None`` where they do not apply.

    Only CPU fp32/bf16 weights are packed; the layer keeps its plain weight for loading and for
    devices that ignore the packed one.
    """
    if (
        weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.bfloat16)
        or not torch.backends.mkldnn.is_available()
    ):
        return None
    plain = weight.detach()
    return CpuWeight(
        onednn=torch.ops.mkldnn._reorder_linear_weight(plain, PACK_BATCH_HINT),
        rows=plain.contiguous().numpy() if plain.dtype == torch.float32 else None,
        grid=find_grid(plain),
    )


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Plain ``F.linear``: what every non-CPU device (and any unpacked weight) runs."""
    return F.linear(x, weight, bias)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: CpuWeight | None = None,
) -> torch.Tensor:
    """The model's entry point. ``packed`` marks a CPU weight prepared by ``pack_weight``: 2-D
    float32 inputs of up to ``GRID_MAX_ROWS`` rows take the quantized kernel where the weight has
    a quantized form, of up to ``GEMV_MAX_ROWS`` rows ``gemv``; others the packed oneDNN GEMM;
    without ``packed``, torch."""
    if packed is None:
        return linear_reference(x, weight, bias)
    rows = x.shape[0] if x.dim() == 2 and x.dtype == torch.float32 and not x.requires_grad else None
    if rows is not None and packed.grid is not None and rows <= GRID_MAX_ROWS:
        return grid_linear(x, packed.grid, bias)
    if rows is not None and packed.rows is not None and rows <= GEMV_MAX_ROWS:
        return gemv(x, packed.rows, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed.onednn, bias, "none", [None], "")


def split_k_parts(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Into how many slices of its input features ``linear_partials`` cuts this product (1: a
    plain GEMM): CUDA only, 2-D inputs of up to ``SPLIT_K_MAX_ROWS`` rows, no bias (it would
    have to go into one slice), and slices whose start stays 16-byte aligned."""
    if not x.is_cuda or x.dim() != 2 or x.shape[0] > SPLIT_K_MAX_ROWS or bias is not None:
        return 1
    parts = 4 if weight.numel() * weight.element_size() < SPLIT_K_SMALL_WEIGHT else 2
    slice_bytes = weight.shape[1] // parts * weight.element_size()
    return parts if weight.shape[1] % parts == 0 and slice_bytes % 16 == 0 else 1


def linear_partials(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: CpuWeight | None = None,
) -> torch.Tensor:
    """``linear``, for a product whose consumer sums (the residual add, ``fused_add_rms_norm``).

    Returns ``x W^T + b`` as ``[T, out]``, or, where ``split_k_parts`` says so, as
    ``[S, T, out]`` partial products over ``S`` equal slices of the input features, whose sum
    is the product (module docstring).
    """
    parts = split_k_parts(x, weight, bias)
    if parts == 1:
        return linear(x, weight, bias, packed)
    return split_k_products(x, weight, parts)


def split_k_products(x: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    """``[parts, T, out]``: ``x [T, in]`` times ``W^T`` over ``parts`` equal slices of the input
    features, one batched GEMM on strided views (neither operand is copied)."""
    out_features, in_features = weight.shape
    width = in_features // parts
    slices = weight.view(out_features, parts, width).permute(1, 2, 0)  # [S, width, out]
    rows = x.contiguous().view(x.shape[0], parts, width).transpose(0, 1)  # [S, T, width]
    return torch.bmm(rows, slices)
