"""Model definitions and the registry that maps a Hugging Face architecture to our class."""

from __future__ import annotations

from torch import nn

from yaie.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from yaie.model.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[nn.Module]] = {name: LlamaForCausalLM for name in SUPPORTED_ARCHITECTURES}


def get_model_class(architecture: str) -> type[nn.Module]:
    """Our model class for a Hugging Face ``architectures`` entry; ``ValueError`` if unknown."""
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; "
            f"YAIE supports {', '.join(_REGISTRY)}"
        ) from None


__all__ = ["LlamaForCausalLM", "ModelConfig", "get_model_class"]
