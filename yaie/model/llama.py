"""The Llama-family decoder: Llama 2/3/3.1/3.2, SmolLM2, Mistral, Qwen2/2.5, Qwen3.

These models differ only in switches ``ModelConfig`` carries: RoPE scaling (Llama 3.1), q/k/v
bias (Qwen2), per-head q/k RMSNorm before RoPE (Qwen3), tied embeddings, GQA ratio. The whole
step is one ragged batch: ``forward`` takes the flat tokens of every scheduled request (prefill
chunks and decodes mixed) and their positions, and the attention layers read and write the paged
KV cache as ``AttentionMetadata`` describes.

Projections are fused where the checkpoint has them separate (q/k/v into one GEMM, gate/up into
another): fewer, larger GEMMs read the activations once and cost one op each. The two that end
a sub-layer (``o_proj``, ``down_proj``) may hand back split-K partial sums on CUDA, which the
next norm's residual add sums (``RowParallelLinear``).
"""

from __future__ import annotations

import torch
from torch import nn

from yaie.kernels import build_cos_sin_cache, silu_and_mul
from yaie.model.attention import Attention, AttentionMetadata
from yaie.model.causal_lm import CausalLM, ParamSlice
from yaie.model.config import ModelConfig
from yaie.model.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)

# Checkpoint names fused into one of our parameters: (ours, theirs, shard id).
_FUSED = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_heads, config.num_kv_heads,
            bias=config.attention_bias,
        )
        self.o_proj = RowParallelLinear(
            config.num_heads * head_dim, config.hidden_size, bias=config.attention_out_bias
        )
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.norm_eps)
            self.k_norm = RMSNorm(head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        # This rank's heads (all of them until tensor parallelism shards the projections).
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, scale=head_dim**-0.5)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden).view(num_tokens, -1, self.head_dim)
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else None
        out = self.attn.rotary_attend(positions, qkv, cos_sin_cache, meta, norms)
        return self.o_proj(out.reshape(num_tokens, -1), partials=True)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], bias=config.mlp_bias
        )
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)), partials=True)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mlp output, residual stream)``; the next norm adds the former into the
        latter, so each sub-layer's residual add costs no extra op (nor does summing a
        sub-layer's split-K partial products, which the norm takes as they are)."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta, cos_sin_cache)
        hidden = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        # Built by LlamaForCausalLM.prepare_for_inference, after the model has its real device.
        self.register_buffer("cos_sin_cache", None, persistent=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta, self.cos_sin_cache)
        return self.norm(hidden, residual)


class LlamaForCausalLM(CausalLM):
    """Our Llama-family model; the life cycle it shares with every family is ``CausalLM``'s."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model = LlamaModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """``input_ids, positions [T]`` (int64) -> final hidden states ``[T, hidden]``."""
        return self.model(input_ids, positions, meta)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def input_embedding(self) -> VocabParallelEmbedding:
        return self.model.embed_tokens

    def checkpoint_params(self, name: str, tensor: torch.Tensor) -> list[ParamSlice]:
        """q/k/v and gate/up go to their fused parameters as shards; rotary ``inv_freq``
        buffers are skipped (we build our own table)."""
        if "rotary_emb.inv_freq" in name:
            return []
        target, shard_id = _our_name(name)
        return [(target, shard_id, tensor)]

    def prepare_for_inference(self) -> None:
        """The rotary table in the weights' dtype and device, then ``CausalLM``'s packing."""
        cfg, weight = self.config, self.model.norm.weight
        self.model.cos_sin_cache = build_cos_sin_cache(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
            weight.dtype,
        ).to(weight.device)
        super().prepare_for_inference()


def _our_name(name: str) -> tuple[str, int | str | None]:
    """Map a checkpoint name to our parameter name and, for fused ones, its shard id."""
    for ours, theirs, shard_id in _FUSED:
        if f".{theirs}." in name:
            return name.replace(f".{theirs}.", f".{ours}."), shard_id
    return name, None
