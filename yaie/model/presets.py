"""Built-in model shapes with random weights: benchmark a real architecture with nothing to download.

A speed figure depends on a model's shapes, not on what its weights say, so the GPU benchmark runs
Qwen3-0.6B and Llama-3.1-8B as their published configs with weights drawn at random, directly on
the device (an 8B model takes a fraction of a second there, where a download takes minutes). The
same generator feeds YAIE's loader and transformers' ``load_state_dict``, so both engines run
identical weights. The ``tiny-*`` presets keep the two families' switches (Qwen3's q/k norm and
tied embeddings, Llama 3.1's rope scaling) at a size the tests can afford.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

_QWEN3 = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": True,
}
_LLAMA31 = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        **_QWEN3,
        "vocab_size": 151_936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40_960,
    },
    "llama-3.1-8b": {
        **_LLAMA31,
        "vocab_size": 128_256,
        "hidden_size": 4096,
        "intermediate_size": 14_336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131_072,
    },
    "tiny-qwen3": {
        **_QWEN3,
        "vocab_size": 1024,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 16_384,
    },
    "tiny-llama": {
        **_LLAMA31,
        "vocab_size": 1024,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "max_position_embeddings": 16_384,
    },
}

INIT_STD = 0.02
"""Standard deviation of the random projections and embeddings (transformers' default
``initializer_range``); norm weights are ones, as a freshly initialised model has them."""


def preset_config(name: str) -> PretrainedConfig:
    """The transformers config of preset ``name``; ``ValueError`` names the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[name])
    # No end-of-sequence token: a benchmark's requests run to their max_tokens in every engine.
    return AutoConfig.for_model(
        kwargs.pop("model_type"), eos_token_id=None, bos_token_id=None, pad_token_id=None, **kwargs
    )


def random_weights(
    config: PretrainedConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face-named tensors of ``config``'s model, drawn on ``device`` from ``seed``.

    Names and shapes come from transformers' own model built on the meta device, so they are
    exactly what its ``load_state_dict`` and YAIE's loader expect. Tensors are drawn in fp32 in
    that fixed order from one generator, then cast: the same ``(config, device, seed)`` gives the
    same values in any dtype. A tied ``lm_head`` is left out (it is the embedding).
    """
    with torch.device("meta"):
        names = AutoModelForCausalLM.from_config(config).state_dict()
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, meta in names.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            values = torch.ones(meta.shape, device=device)
        else:
            values = torch.randn(meta.shape, generator=generator, device=device).mul_(INIT_STD)
        yield name, values.to(dtype)
