"""The real default model on CPU, loaded once per session, plus transformers on the same file."""

from __future__ import annotations

import pytest
import torch

from yaie.hub import ResolvedModel
from yaie.llm import LLM


@pytest.fixture(scope="session")
def llm(smollm2: ResolvedModel) -> LLM:
    return LLM(str(smollm2.gguf_path), kv_cache_memory="256MiB", max_model_len=2048)


@pytest.fixture(scope="session")
def hf_model(smollm2: ResolvedModel):
    """transformers' own GGUF loading and modeling code: the reference we must match."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2.path, gguf_file=smollm2.gguf_file, torch_dtype=torch.float32
    ).eval()
