"""The model shape YAIE needs, read once from a Hugging Face config.

Hugging Face configs differ per family and per transformers release (rope settings moved from
``rope_theta`` / ``rope_scaling`` to ``rope_parameters`` in transformers 5; Qwen2 has q/k/v bias
without saying so; ``head_dim`` is sometimes implicit). ``ModelConfig.from_hf`` resolves all of
that in one place so the model code reads plain fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from yaie.kernels.rotary import SUPPORTED_ROPE_TYPES

# Architecture name -> Hugging Face ``model_type``, for configs built without ``architectures``.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(slots=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder; independent of the weights' dtype.

    ``rope_scaling`` is ``None`` for plain RoPE, else a dict with a ``rope_type`` key (``linear``
    or ``llama3``) and that type's parameters. ``attention_bias`` is the q/k/v projections' bias,
    ``attention_out_bias`` the output projection's (Llama's ``attention_bias`` sets both, Qwen2
    only the first); ``qk_norm`` is Qwen3's per-head RMSNorm on q and k before rotary.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
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
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=is_qwen2 or llama_bias,
            attention_out_bias=not is_qwen2 and llama_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
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
