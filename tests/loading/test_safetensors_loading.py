"""Safetensors checkpoints: sharded round trips through ``iter_weights`` and ``load_config``."""

from __future__ import annotations

import json

import pytest
import torch

from yaie.hub import resolve_model
from yaie.model.loader import iter_weights, load_config, load_generation_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sharded_round_trip_is_exact(save_tiny_llama, dtype: torch.dtype) -> None:
    folder, saved = save_tiny_llama(dtype)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the checkpoint should be sharded"

    loaded = dict(iter_weights(resolve_model(folder), dtype, progress=False))

    assert sorted(loaded) == sorted(saved)
    for name, tensor in loaded.items():
        assert tensor.dtype == dtype
        assert torch.equal(tensor, saved[name]), name


def test_weights_are_cast_to_the_requested_dtype(save_tiny_llama) -> None:
    folder, saved = save_tiny_llama(torch.float32)
    for name, tensor in iter_weights(resolve_model(folder), torch.bfloat16, progress=False):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, saved[name].to(torch.bfloat16)), name


def test_unsharded_checkpoint(tiny_llama, tmp_path) -> None:
    tiny_llama.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    loaded = dict(iter_weights(resolve_model(tmp_path), torch.float32, progress=False))
    assert sorted(loaded) == sorted(tiny_llama.state_dict())


def test_config_and_generation_config(save_tiny_llama) -> None:
    folder, _ = save_tiny_llama(torch.float32)
    resolved = resolve_model(folder)
    config = load_config(resolved)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.num_key_value_heads) == (256, 2)
    generation = load_generation_config(resolved)
    assert generation is not None and generation.eos_token_id == config.eos_token_id
