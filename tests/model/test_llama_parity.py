"""Our Llama-family model against transformers' on tiny random models, over a paged KV cache.

The mixed prefill + decode step and its helpers are in ``parity_helpers``.
"""

from __future__ import annotations

import pytest
import torch
from parity_helpers import (
    BLOCK_SIZE,
    NUM_BLOCKS,
    Seq,
    check_mixed_batch,
    hf_model,
    our_model,
    run_step,
)
from transformers import (
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from yaie.model import LlamaForCausalLM, ModelConfig, get_model_class

_TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _configs() -> dict[str, PretrainedConfig]:
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return {
        # Llama 3.1-style scaling whose three frequency bands all fall inside the test's range.
        "llama3": LlamaConfig(**_TINY, rope_theta=10000.0, rope_scaling=llama3),
        "llama-tied": LlamaConfig(**_TINY, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**_TINY, tie_word_embeddings=True),
        # head_dim 32 != hidden / heads: must be read from the config.
        "qwen3": Qwen3Config(**_TINY, head_dim=32, tie_word_embeddings=True),
        "mistral": MistralConfig(**_TINY, sliding_window=None),
    }


@pytest.mark.parametrize("order", ["interleaved", "decodes-first"])
@pytest.mark.parametrize("name", list(_configs()))
def test_mixed_batch_matches_transformers(name: str, order: str) -> None:
    _check_mixed_batch(name, order, shuffled_blocks=True)


def test_blocks_in_allocation_order_match_transformers() -> None:
    """Consecutive blocks take the kernels' no-gather path; same logits."""
    _check_mixed_batch("llama3", "interleaved", shuffled_blocks=False)


def _check_mixed_batch(name: str, order: str, shuffled_blocks: bool) -> None:
    hf_config = _configs()[name]
    reference = hf_model(hf_config)
    model = our_model(hf_config, reference.state_dict().items())
    check_mixed_batch(reference, model, name, order, shuffled_blocks)


def test_unsupported_architecture_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unsupported model architecture.*LlamaForCausalLM"):
        ModelConfig.from_hf(GPTNeoXConfig())
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_hf(LlamaConfig(architectures=["GPTNeoXForCausalLM"]))
    with pytest.raises(ValueError, match="unsupported model architecture 'FooForCausalLM'"):
        get_model_class("FooForCausalLM")


def test_config_reads_rope_and_family_switches() -> None:
    configs = _configs()
    llama3 = ModelConfig.from_hf(configs["llama3"])
    assert llama3.rope_scaling is not None and llama3.rope_scaling["rope_type"] == "llama3"
    assert llama3.rope_scaling["factor"] == 8.0 and llama3.rope_theta == 10000.0
    assert not llama3.attention_bias and not llama3.qk_norm and not llama3.tie_word_embeddings
    qwen2 = ModelConfig.from_hf(configs["qwen2"])
    assert qwen2.attention_bias and not qwen2.attention_out_bias and qwen2.rope_scaling is None
    qwen3 = ModelConfig.from_hf(configs["qwen3"])
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.tie_word_embeddings
    assert ModelConfig.from_hf(configs["mistral"]).head_dim == 16


def test_unsupported_rope_type_is_a_clear_error() -> None:
    config = LlamaConfig(**_TINY, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        ModelConfig.from_hf(config)


def test_unknown_and_missing_weights_are_errors() -> None:
    hf_config = _configs()["llama-tied"]
    model = LlamaForCausalLM(ModelConfig.from_hf(hf_config))
    state = dict(hf_model(hf_config).state_dict())
    with pytest.raises(ValueError, match="unexpected weight 'model.layers.0.mlp.extra.weight'"):
        model.load_weights([*state.items(), ("model.layers.0.mlp.extra.weight", torch.ones(1))])
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="missing weights: model.norm.weight"):
        model.load_weights(state.items())


def test_bfloat16_model_tracks_float32() -> None:
    """The bf16 path (fp32 norms, bf16 rotary table, packed bf16 GEMMs) stays near fp32."""
    hf_config = _configs()["qwen3"]
    reference = hf_model(hf_config)
    full = our_model(hf_config, reference.state_dict().items())
    half = LlamaForCausalLM(ModelConfig.from_hf(hf_config)).to(torch.bfloat16)
    half.load_weights(reference.state_dict().items())
    half.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    assert half.model.cos_sin_cache.dtype == torch.bfloat16
    tokens = [Seq([3, 14, 15, 92, 65, 35, 89, 79, 32]) for _ in range(2)]
    expected = run_step(full, [(tokens[0], 9)], list(range(NUM_BLOCKS)))[0]
    got = run_step(half, [(tokens[1], 9)], list(range(NUM_BLOCKS)))[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)
