"""Tiny random checkpoints for the loading tests (the default model's fixtures are in
tests/conftest.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


TINY_LLAMA = {
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    """A random Llama small enough to save and reload in milliseconds (GQA: 4 q, 2 kv heads)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


@pytest.fixture
def save_tiny_llama(
    tiny_llama: LlamaForCausalLM, tmp_path: Path
) -> Callable[[torch.dtype], tuple[Path, dict[str, torch.Tensor]]]:
    """Save ``tiny_llama`` in a dtype, sharded, and return the folder and the saved tensors."""

    def save(dtype: torch.dtype) -> tuple[Path, dict[str, torch.Tensor]]:
        folder = tmp_path / f"tiny-{str(dtype).removeprefix('torch.')}"
        model = copy.deepcopy(tiny_llama).to(dtype)
        model.save_pretrained(folder, max_shard_size="50KB")
        return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}

    return save
