"""Model definitions and the registry that maps a Hugging Face architecture to our class."""

from __future__ import annotations

from yaie.model.causal_lm import CausalLM
from yaie.model.config import GPT2_ARCHITECTURES, LLAMA_ARCHITECTURES, ModelConfig
from yaie.model.gpt2 import GPT2LMHeadModel
from yaie.model.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[CausalLM]] = {
    **{name: LlamaForCausalLM for name in LLAMA_ARCHITECTURES},
    **{name: GPT2LMHeadModel for name in GPT2_ARCHITECTURES},
}


def get_model_class(architecture: str) -> type[CausalLM]:
    """Our model class for a Hugging Face ``architectures`` entry; ``ValueError`` if unknown."""
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; "
            f"YAIE supports {', '.join(_REGISTRY)}"
        ) from None


__all__ = ["CausalLM", "GPT2LMHeadModel", "LlamaForCausalLM", "ModelConfig", "get_model_class"]
