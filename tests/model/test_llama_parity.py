"""Our Llama-family model against transformers' on tiny random models, over a paged KV cache.

The step under test mixes everything a real step can hold: a fresh prefill, a prefill chunk
over a cached prefix, and decodes, laid out in shuffled non-contiguous blocks. Every new token's
logits must match transformers' full-sequence forward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from yaie.model import LlamaForCausalLM, ModelConfig, get_model_class
from yaie.model.attention import AttentionMetadata

BLOCK_SIZE = 4
NUM_BLOCKS = 40
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


def _hf_model(hf_config: PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    hf_config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: perturb so loading shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _our_model(hf_config: PretrainedConfig, hf_model: torch.nn.Module) -> LlamaForCausalLM:
    """Built the way the executor builds it: on the meta device, then materialised and loaded."""
    config = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config)
    model = model.to_empty(device="cpu").to(torch.float32)
    model.load_weights(hf_model.state_dict().items())
    model.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    return model


@dataclass
class _Seq:
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    computed: int = 0


def _step(
    model: LlamaForCausalLM, work: list[tuple[_Seq, int]], free_blocks: list[int]
) -> list[torch.Tensor]:
    """Run ``n`` new tokens of each ``(seq, n)`` as one ragged step; per-seq logits ``[n, V]``."""
    token_ids, positions, slots, qsl, seq_lens, tables = [], [], [], [0], [], []
    for seq, n in work:
        seq_len = seq.computed + n
        while len(seq.blocks) * BLOCK_SIZE < seq_len:
            seq.blocks.append(free_blocks.pop())
        for pos in range(seq.computed, seq_len):
            token_ids.append(seq.tokens[pos])
            positions.append(pos)
            slots.append(seq.blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        qsl.append(qsl[-1] + n)
        seq_lens.append(seq_len)
        tables.append(seq.blocks)
        seq.computed = seq_len
    meta = AttentionMetadata.build(qsl, seq_lens, tables, slots, BLOCK_SIZE, "cpu")
    hidden = model(torch.tensor(token_ids), torch.tensor(positions), meta)
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (len(token_ids), 128)
    return [logits[qsl[i] : qsl[i + 1]] for i in range(len(work))]


def _assert_matches_hf(hf_model: torch.nn.Module, seq: _Seq, logits: torch.Tensor) -> None:
    with torch.no_grad():
        expected = hf_model(torch.tensor([seq.tokens[: seq.computed]])).logits[0]
    new = logits.shape[0]
    torch.testing.assert_close(logits, expected[seq.computed - new :], rtol=0, atol=1e-4)


@pytest.mark.parametrize("order", ["interleaved", "decodes-first"])
@pytest.mark.parametrize("name", list(_configs()))
def test_mixed_batch_matches_transformers(name: str, order: str) -> None:
    _check_mixed_batch(name, order, shuffled_blocks=True)


def test_blocks_in_allocation_order_match_transformers() -> None:
    """Consecutive blocks take the kernels' no-gather path; same logits."""
    _check_mixed_batch("llama3", "interleaved", shuffled_blocks=False)


def _check_mixed_batch(name: str, order: str, shuffled_blocks: bool) -> None:
    hf_config = _configs()[name]
    hf_model = _hf_model(hf_config)
    model = _our_model(hf_config, hf_model)
    rng = random.Random(name)
    free_blocks = list(range(NUM_BLOCKS))
    if shuffled_blocks:
        rng.shuffle(free_blocks)
    else:
        free_blocks.reverse()  # pop() yields 0, 1, 2, ...
    a, b, c, d = (_Seq([rng.randrange(128) for _ in range(n)]) for n in (7, 11, 10, 14))

    # Earlier step: B's first 5 tokens, C's and D's whole prompts but their last token.
    earlier = _step(model, [(b, 5), (c, 9), (d, 13)], free_blocks)
    for seq, logits in zip((b, c, d), earlier):
        _assert_matches_hf(hf_model, seq, logits)

    # The step under test: A fresh (7), B chunk over its cached 5 (6 more), C and D decode.
    work = {"interleaved": [(c, 1), (a, 7), (d, 1), (b, 6)],
            "decodes-first": [(c, 1), (d, 1), (a, 7), (b, 6)]}[order]
    for (seq, _), logits in zip(work, _step(model, work, free_blocks)):
        _assert_matches_hf(hf_model, seq, logits)


def test_unsupported_architecture_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unsupported model architecture.*LlamaForCausalLM"):
        ModelConfig.from_hf(GPT2Config())
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
    hf_model = _hf_model(hf_config)
    model = LlamaForCausalLM(ModelConfig.from_hf(hf_config))
    state = dict(hf_model.state_dict())
    with pytest.raises(ValueError, match="unexpected weight 'model.layers.0.mlp.extra.weight'"):
        model.load_weights([*state.items(), ("model.layers.0.mlp.extra.weight", torch.ones(1))])
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="missing weights: model.norm.weight"):
        model.load_weights(state.items())


def test_bfloat16_model_tracks_float32() -> None:
    """The bf16 path (fp32 norms, bf16 rotary table, packed bf16 GEMMs) stays near fp32."""
    hf_config = _configs()["qwen3"]
    hf_model = _hf_model(hf_config)
    full = _our_model(hf_config, hf_model)
    half = LlamaForCausalLM(ModelConfig.from_hf(hf_config)).to(torch.bfloat16)
    half.load_weights(hf_model.state_dict().items())
    half.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    assert half.model.cos_sin_cache.dtype == torch.bfloat16
    tokens = [_Seq([3, 14, 15, 92, 65, 35, 89, 79, 32]) for _ in range(2)]
    expected = _step(full, [(tokens[0], 9)], list(range(NUM_BLOCKS)))[0]
    got = _step(half, [(tokens[1], 9)], list(range(NUM_BLOCKS)))[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)
