"""Dense projections ``y = x W^T + b``, and the CPU paths that make them fast.

On CUDA, GEMMs stay on torch (cuBLAS). On CPU a decode step is a stream of weights: at batch 1
every weight is read once to make one row of output, so the step takes as long as reading the
model from memory. Two CPU paths, chosen by the number of rows:

- **A few rows (decode of 1-4 requests): ``gemv``**, a numba kernel that splits the output
  features across the CPU's threads and computes each as a plain dot product over one
  contiguous weight row. Nothing but the weight stream touches memory, so it reads at close to
  the machine's read bandwidth. Measured on SmolLM2-135M shapes (2-core AMD EPYC, fp32, the 121
  projections of one decode step with cold weights, ``yaie bench cpu-kernels``): 1 row
  18.7 ms (32 GB/s, the read bandwidth of a plain ``sum`` over the same bytes was 27-32 GB/s)
  against 26.8 ms for oneDNN and 45 ms for MKL's sgemm (``F.linear``).
- **More rows: oneDNN** with the weight reordered once into its blocked layout
  (``pack_weight``). From about 8 rows a GEMM reuses each weight many times from registers,
  which oneDNN's kernels do and a dot-product loop does not (16 rows: 33 ms against 70 ms).
  Inductor uses the same two ops for frozen CPU linears; they are private but have been stable
  since torch 2.0.

``gemv`` sums in a different order than torch (``fastmath`` lets LLVM vectorize the dot
product), so results differ from ``F.linear`` by float32 rounding, as oneDNN's do.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F

from yaie.kernels.cpu import numba_parallel_launch

# oneDNN picks its blocking for this many rows; measured as good for 1-row decodes too.
_PACK_BATCH_HINT = 512

GEMV_MAX_ROWS = 4
"""Most rows ``linear`` sends to ``gemv``; above it oneDNN is faster (see the module docstring)."""


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _gemv_kernel(
    w: np.ndarray, x: np.ndarray, bias: np.ndarray, out: np.ndarray, num_chunks: int
) -> None:
    """``out[m, n] = x[m] . w[n] + bias[n]`` (``bias`` empty for none).

    Each of ``num_chunks`` threads owns a contiguous range of output features, so it streams
    its own slice of ``w`` from memory exactly once; the ``x`` rows it multiplies stay in L1.
    """
    num_out, num_in = w.shape
    has_bias = bias.shape[0] > 0
    for chunk in numba.prange(num_chunks):
        for n in range(chunk * num_out // num_chunks, (chunk + 1) * num_out // num_chunks):
            for m in range(x.shape[0]):
                acc = np.float32(0.0)
                for k in range(num_in):
                    acc += w[n, k] * x[m, k]
                out[m, n] = acc + bias[n] if has_bias else acc


_NO_BIAS = np.empty(0, dtype=np.float32)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., in] W^T + b`` for CPU float32 tensors with few rows, by ``_gemv_kernel``.

    Uses as many threads as torch does (``numba_parallel_launch``).
    """
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)
    with numba_parallel_launch():
        _gemv_kernel(
            weight.detach().numpy(),
            rows.numpy(),
            _NO_BIAS if bias is None else bias.detach().numpy(),
            out.numpy(),
            numba.get_num_threads(),
        )
    return out.view(*x.shape[:-1], weight.shape[0])


def _gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype == weight.dtype == torch.float32
        and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]
        and weight.is_contiguous()
        and not (x.requires_grad or weight.requires_grad)
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-layout copy of ``weight [out, in]``, or ``None`` where packing does not apply.

    Only CPU fp32/bf16 weights are packed; the copy is opaque (not a strided tensor), so the
    layer keeps its plain weight for loading, for ``gemv`` and for devices that ignore it.
    """
    if (
        weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.bfloat16)
        or not torch.backends.mkldnn.is_available()
    ):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Plain ``F.linear``: what every non-CPU device (and any unpacked weight) runs."""
    return F.linear(x, weight, bias)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's entry point. ``packed`` marks a CPU weight prepared by ``pack_weight``: it
    takes ``gemv`` for a few float32 rows, else the packed oneDNN GEMM; otherwise torch."""
    if packed is None:
        return linear_reference(x, weight, bias)
    if _gemv_applies(x, weight):
        return gemv(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")
