"""The GPT-2 family (``GPT2LMHeadModel``): GPT-2 and DialoGPT.

Beside a Llama, GPT-2 differs in five places, all local to a layer: positions are a learned
embedding added to the token embedding (no rotary); norms are LayerNorm with a bias; the MLP is
``c_proj(gelu_tanh(c_fc(x)))`` with no gate; every projection has a bias; and attention is full
multi-head (as many KV heads as query heads). Everything else is shared: the same ragged step,
``Attention`` over the same paged KV cache, the same tensor-parallel linear layers, the same
fused residual add before each norm, and ``CausalLM``'s loading and logits.

Checkpoints store projections as ``Conv1D`` weights, ``[in, out]``: the transpose of
``nn.Linear``'s ``[out, in]``. ``checkpoint_params`` transposes them on the way in, and cuts the
fused ``c_attn`` into its q, k and v parts so ``QKVParallelLinear`` shards it by head.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from yaie.kernels import fused_add_layer_norm, gelu_tanh, layer_norm
from yaie.model.attention import Attention, AttentionMetadata
from yaie.model.causal_lm import CausalLM, ParamSlice
from yaie.model.config import ModelConfig
from yaie.model.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

# Conv1D weights, stored [in, out]; their biases are stored as nn.Linear's.
_CONV1D_WEIGHT = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
# Old checkpoints (DialoGPT's among them) saved the causal mask as a buffer: not a weight.
_MASK_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")


class LayerNorm(nn.Module):
    """LayerNorm with bias; given ``residual``, adds ``x`` into it in place, normalizes the sum."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return layer_norm(x, self.weight, self.bias, self.eps)
        return fused_add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.c_attn = QKVParallelLinear(hidden, head_dim, config.num_heads, config.num_heads,
                                        bias=True)
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        self.num_heads, self.head_dim = self.c_attn.num_heads, head_dim
        self.attn = Attention(self.num_heads, self.num_heads, head_dim, scale=head_dim**-0.5)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.c_attn(hidden).view(num_tokens, -1, self.head_dim)
        q, k, v = qkv.split(self.num_heads, dim=1)
        return self.c_proj(self.attn(q, k, v, meta).reshape(num_tokens, -1))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.c_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_tanh(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, config.norm_eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = LayerNorm(config.hidden_size, config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mlp output, residual stream)``, as a Llama layer does: the next norm adds
        the former into the latter."""
        if residual is None:
            residual = hidden
            hidden = self.ln_1(hidden)
        else:
            hidden = self.ln_1(hidden, residual)
        hidden = self.attn(hidden, meta)
        hidden = self.ln_2(hidden, residual)
        return self.mlp(hidden), residual


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # Position table: whole on every rank (tp_size 1), as every rank sees every position.
        self.wpe = VocabParallelEmbedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.num_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)
        residual = None
        for block in self.h:
            hidden, residual = block(hidden, residual, meta)
        return self.ln_f(hidden, residual)


class GPT2LMHeadModel(CausalLM):
    """Our GPT-2; parameter names follow the checkpoint's (``transformer.h.0.attn.c_attn``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.tie(self.transformer.wte)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """``input_ids, positions [T]`` (int64) -> final hidden states ``[T, hidden]``.

        Positions must be below ``n_positions``: the engine's ``max_model_len`` never exceeds it.
        """
        return self.transformer(input_ids, positions, meta)

    def attention_layers(self) -> list[Attention]:
        return [block.attn.attn for block in self.transformer.h]

    def input_embedding(self) -> VocabParallelEmbedding:
        return self.transformer.wte

    def checkpoint_params(self, name: str, tensor: torch.Tensor) -> list[ParamSlice]:
        """Conv1D weights transposed to ``[out, in]``; ``c_attn`` cut into q, k, v shards.

        Names are taken with or without the ``transformer.`` prefix (OpenAI's original GPT-2
        checkpoints have none), and saved attention-mask buffers are skipped.
        """
        if _MASK_BUFFER.search(name):
            return []
        if not name.startswith(("transformer.", "lm_head.")):
            name = f"transformer.{name}"
        if _CONV1D_WEIGHT.search(name):
            tensor = tensor.t()
        if ".c_attn." in name:
            q, k, v = tensor.chunk(3, dim=0)
            return [(name, "q", q), (name, "k", k), (name, "v", v)]
        return [(name, None, tensor)]
