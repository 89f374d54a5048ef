"""Dense projections ``y = x W^T + b`` and the CPU weight packing that makes them fast.

GEMMs stay on torch. On CPU, though, ``F.linear`` goes through MKL's sgemm, which on this
project's CPU boxes (AMD EPYC, AVX-512) streams a decode step's weights at ~12 GB/s; oneDNN
with its weights reordered once into its blocked layout reaches 20-30 GB/s at batch 1 and
~3x at batch 16 (measured on SmolLM2-135M shapes). Inductor uses the same two ops for frozen CPU
linears; they are private but have been stable since torch 2.0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# oneDNN picks its blocking for this many rows; measured as good for 1-row decodes too.
_PACK_BATCH_HINT = 512


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-layout copy of ``weight [out, in]``, or ``None`` where packing does not apply.

    Only CPU fp32/bf16 weights are packed; the copy is opaque (not a strided tensor), so the
    layer keeps its plain weight for loading and for devices that ignore the packed one.
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
    """The model's entry point: the packed oneDNN GEMM when ``packed`` is given, else torch."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")
    return linear_reference(x, weight, bias)
