"""Linear, embedding and norm layers, shaped for tensor parallelism over ``torch.distributed``.

Each layer holds only its rank's shard (Megatron style) and knows how to cut that shard out of
a full Hugging Face tensor in ``weight_loader(param, loaded, shard_id)``:

- column-parallel layers split the output features (dim 0), so each rank computes whole heads or
  whole MLP channels and no communication is needed;
- row-parallel layers split the input features (dim 1) and all-reduce their partial sums;
- the vocabulary is split by rows; embedding lookups are masked to the rank's range and
  all-reduced, logits are all-gathered.

With ``tp_size == 1`` (the default) every shard is the whole tensor and no collective runs, so
going multi-GPU is a matter of passing ``tp_size``/``tp_rank``, not rewriting the model.

Projections call ``yaie.kernels.linear``; ``pack()`` (run once after loading) gives CPU layers a
oneDNN-layout copy of their weight, which roughly doubles CPU GEMM speed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from yaie.kernels import (
    bf16_screen,
    fused_add_rms_norm,
    greedy_argmax,
    linear,
    linear_partials,
    pack_weight,
    rms_norm,
)
from yaie.kernels.greedy_head import Bf16Screen
from yaie.kernels.linear import CpuWeight


def _divide(n: int, tp_size: int, what: str) -> int:
    if n % tp_size:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {tp_size}")
    return n // tp_size


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _copy_rows(param: torch.Tensor, start: int, loaded: torch.Tensor, loaded_start: int,
               size: int, dim: int = 0) -> None:
    """``param[start:start+size] = loaded[loaded_start:loaded_start+size]`` along ``dim``."""
    dst = param.data.narrow(dim, start, size)
    same_other_dims = loaded.dim() == dst.dim() and all(
        loaded.shape[d] == dst.shape[d] for d in range(dst.dim()) if d != dim
    )
    if not same_other_dims or loaded.shape[dim] < loaded_start + size:
        raise ValueError(f"weight shape mismatch: cannot take {tuple(dst.shape)} at offset "
                         f"{loaded_start} of dim {dim} from {tuple(loaded.shape)}")
    dst.copy_(loaded.narrow(dim, loaded_start, size))


class PackedWeight:
    """Mixin for layers whose ``weight [out, in]`` feeds ``yaie.kernels.linear``."""

    weight: nn.Parameter
    packed: CpuWeight | None = None

    def pack(self) -> None:
        """Refresh the CPU fast-path copy of ``weight``; call after (re)loading weights."""
        self.packed = pack_weight(self.weight)


class LinearBase(PackedWeight, nn.Module):
    """``y = x W^T + b`` with ``W [out_per_rank, in_per_rank]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        super().__init__()
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.weight = _param(out_features, in_features)
        self.bias = _param(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank's output stays local (no gather)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        out = _divide(out_features, tp_size, "out_features")
        super().__init__(in_features, out, bias, tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        size = param.shape[0]
        _copy_rows(param, 0, loaded, self.tp_rank * size, size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input run as one GEMM (MLP gate and up).

    ``shard_id`` is the index into ``output_sizes`` of the checkpoint tensor being loaded;
    each rank holds its slice of every part, concatenated in order.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        self.output_sizes = [_divide(n, tp_size, "output size") for n in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias, tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        _copy_rows(param, offset, loaded, self.tp_rank * size, size)


class QKVParallelLinear(ColumnParallelLinear):
    """The q, k and v projections as one GEMM, output ``[q | k | v]`` of this rank's heads.

    With more ranks than KV heads, each KV head is replicated on ``tp_size // num_kv_heads``
    consecutive ranks. ``shard_id`` is ``"q"``, ``"k"`` or ``"v"``.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_size: int = 1, tp_rank: int = 0) -> None:
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "num_heads")
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_rank = tp_rank // max(1, tp_size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias, tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size, rank = {
            "q": (0, q_size, self.tp_rank),
            "k": (q_size, kv_size, self.kv_rank),
            "v": (q_size + kv_size, kv_size, self.kv_rank),
        }[shard_id]
        _copy_rows(param, offset, loaded, rank * size, size)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce.

    The bias is added on rank 0 only, so the reduced sum includes it once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        in_per_rank = _divide(in_features, tp_size, "in_features")
        super().__init__(in_per_rank, out_features, bias, tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        if param.dim() == 1:  # bias: whole on every rank
            _copy_rows(param, 0, loaded, 0, param.shape[0])
            return
        size = param.shape[1]
        _copy_rows(param, 0, loaded, self.tp_rank * size, size, dim=1)

    def forward(self, x: torch.Tensor, partials: bool = False) -> torch.Tensor:
        """``x W^T + b``. With ``partials`` the caller sums the result into something (the
        residual add), so on CUDA a few rows may come back as ``[S, T, out]`` split-K partial
        sums (``yaie.kernels.linear_partials``). Not across ranks: there the all-reduce is
        the reduction already, and ``S`` partials would multiply its traffic by ``S``."""
        bias = self.bias if self.tp_rank == 0 else None
        split = partials and self.tp_size == 1
        out = (linear_partials if split else linear)(x, self.weight, bias, self.packed)
        if self.tp_size > 1:
            dist.all_reduce(out)
        return out


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split by rows across ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        super().__init__()
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.rows_per_rank = _divide(num_embeddings, tp_size, "vocab_size")
        self.vocab_start = tp_rank * self.rows_per_rank
        self.weight = _param(self.rows_per_rank, embedding_dim)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | str | None = None) -> None:
        _copy_rows(param, 0, loaded, self.vocab_start, self.rows_per_rank)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(out)
        return out


SCREEN_MIN_ROWS = 4
"""Fewest rows for which the bf16 screen beats the exact logits of a head on a grid (the
default model's Q8_0 head; engine tok/s, screen against exact logits: 1 row 90 against 108,
2 rows 157 against 171, 4 rows 252 against 249, 16 rows 410 against 397)."""


class ParallelLMHead(PackedWeight, VocabParallelEmbedding):
    """Output projection to the (rank's share of the) vocabulary; may share the embedding weight.

    ``forward`` returns full-vocabulary logits on every rank (all-gathered when split).
    """

    screen: Bf16Screen | None = None

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        """Use ``embedding``'s weight as ours (tied input and output embeddings)."""
        self.weight = embedding.weight

    def pack(self) -> None:
        """The projection's CPU copies, and the bf16 screen of greedy decoding where the CPU
        multiplies bf16 natively (``yaie.kernels.greedy_head``)."""
        super().pack()
        self.screen = bf16_screen(self.weight) if self.tp_size == 1 else None

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``argmax(logits)`` per row without computing every logit in fp32, or ``None``
        where the screen does not apply (then compute the logits). A head on a quantization
        grid (``yaie.kernels.grid_linear``) computes few rows' exact logits faster than the
        screen: up to ``SCREEN_MIN_ROWS - 1`` rows it leaves them to the logits."""
        if self.screen is None or hidden.dtype != torch.float32 or not hidden.is_cpu:
            return None
        on_grid = self.packed is not None and self.packed.grid is not None
        if on_grid and hidden.shape[0] < SCREEN_MIN_ROWS:
            return None
        return greedy_argmax(hidden, self.screen)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, None, self.packed)
        if self.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits)
        return torch.cat(parts, dim=-1)


class RMSNorm(nn.Module):
    """RMSNorm; given ``residual``, adds ``x`` into it in place first and normalizes the sum
    (``x`` may then be a row-parallel projection's partial sums, ``RowParallelLinear``)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)
