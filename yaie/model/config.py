"""The model shape YAIE needs, read once from a Hugging Face config.

Hugging Face configs differ per family and per transformers release (rope settings moved from
``rope_theta`` / ``rope_scaling`` to ``rope_parameters`` in transformers 5; Qwen2 has q/k/v bias
without saying so; ``head_dim`` is sometimes implicit; GPT-2 names everything its own way:
``n_embd``, ``n_head``, ``n_positions``, ``layer_norm_epsilon``, ``activation_function``).
``ModelConfig.from_hf`` resolves all of that in one place so the model code reads plain fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from yaie.kernels.rotary import SUPPORTED_ROPE_TYPES

# Architecture name -> Hugging Face ``model_type``, for configs built without ``architectures``.
LLAMA_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
GPT2_ARCHITECTURES: dict[str, str] = {"GPT2LMHeadModel": "gpt2"}
SUPPORTED_ARCHITECTURES: dict[str, str] = {**LLAMA_ARCHITECTURES, **GPT2_ARCHITECTURES}

# GPT-2's ``activation_function`` values that all mean GELU's tanh approximation.
_GELU_TANH = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


@dataclass(slots=True)
class ModelConfig:
    """Shape and numerics of a decoder (Llama or GPT-2 family); independent of the weights' dtype.

    The architecture picks the family's layers (Llama: RMSNorm, rotary, SiLU-gated MLP; GPT-2:
    LayerNorm, learned positions, tanh-GELU MLP). ``norm_eps`` is the epsilon of either norm.
    ``rope_theta`` is ``None`` where positions are learned embeddings (GPT-2). ``rope_scaling``
    is ``None`` for plain RoPE, else a dict with a ``rope_type`` key (``linear`` or ``llama3``)
    and that type's parameters. ``attention_bias`` is the q/k/v projections' bias,
    ``attention_out_bias`` the output projection's (Llama's ``attention_bias`` sets both, Qwen2
    only the first); ``qk_norm`` is Qwen3's per-head RMSNorm on q and k before rotary.
    ``max_position_embeddings`` is the context limit (GPT-2's ``n_positions``).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float | None
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    attention_out_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Read a transformers ``PretrainedConfig``; ``ValueError`` if YAIE can't run it."""
        architecture = _architecture(hf_config)
        if architecture in GPT2_ARCHITECTURES:
            return cls._from_gpt2(hf_config, architecture)
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{architecture} with hidden_act={act!r} is not supported (only silu)")
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of "
                             f"num_key_value_heads={num_kv_heads}")
        rope_theta, rope_scaling = _rope(hf_config)
        llama_bias = bool(getattr(hf_config, "attention_bias", False))
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        return cls(
            architecture=architecture,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
            norm_eps=hf_config.rms_norm_eps,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=is_qwen2 or llama_bias,
            attention_out_bias=not is_qwen2 and llama_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
        )

    @classmethod
    def _from_gpt2(cls, hf_config: Any, architecture: str) -> ModelConfig:
        """GPT-2: full multi-head attention, biases everywhere, learned positions, tied head."""
        act = hf_config.activation_function
        if act not in _GELU_TANH:
            raise ValueError(f"{architecture} with activation_function={act!r} is not supported "
                             f"(only the tanh GELU: {', '.join(sorted(_GELU_TANH))})")
        if not hf_config.scale_attn_weights or hf_config.scale_attn_by_inverse_layer_idx:
            raise ValueError(f"{architecture} with scale_attn_weights=False or "
                             "scale_attn_by_inverse_layer_idx=True is not supported")
        hidden, num_heads = hf_config.n_embd, hf_config.n_head
        if hidden % num_heads:
            raise ValueError(f"n_embd={hidden} is not a multiple of n_head={num_heads}")
        return cls(
            architecture=architecture,
            vocab_size=hf_config.vocab_size,
            hidden_size=hidden,
            intermediate_size=hf_config.n_inner or 4 * hidden,
            num_layers=hf_config.n_layer,
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=hidden // num_heads,
            norm_eps=hf_config.layer_norm_epsilon,
            rope_theta=None,
            rope_scaling=None,
            max_position_embeddings=hf_config.n_positions,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            attention_bias=True,
            attention_out_bias=True,
            mlp_bias=True,
            qk_norm=False,
        )


def _architecture(hf_config: Any) -> str:
    architectures = getattr(hf_config, "architectures", None) or []
    model_type = getattr(hf_config, "model_type", None)
    by_type = {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    if not architectures and model_type in by_type:
        return by_type[model_type]
    found = ", ".join(architectures) or f"model_type {model_type!r}"
    raise ValueError(
        f"unsupported model architecture: {found}; "
        f"YAIE supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """``(theta, scaling)`` from transformers 5 ``rope_parameters`` or the older two fields."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
    scaling = params or dict(getattr(hf_config, "rope_scaling", None) or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; "
                         f"YAIE supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    return float(theta), {"rope_type": rope_type, **scaling}
