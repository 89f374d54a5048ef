"""The roofline cost model against hand calculations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yaie.core.batch import ScheduledBatch, ScheduledRequest
from yaie.core.sampling import SamplingParams
from yaie.simulator.cost import (
    MODELS,
    ModelSpec,
    RooflineCostModel,
    get_model,
    num_kv_blocks,
    with_dtype,
)
from yaie.simulator.hardware import GiB, HARDWARE, get_hardware

H100 = HARDWARE["h100"]
LLAMA = MODELS["llama-3.1-8b"]


def batch_of(*entries: tuple[int, int]) -> ScheduledBatch:
    """A batch of (start_pos, num_new_tokens) entries, each sampling its last token."""
    params = SamplingParams()
    batch = ScheduledBatch(step_id=1, block_size=16)
    for i, (start, n) in enumerate(entries):
        batch.requests.append(ScheduledRequest(str(i), start, n, True, params, [], []))
        batch.token_ids.extend([0] * n)
        batch.positions.extend(range(start, start + n))
        batch.query_start_loc.append(len(batch.token_ids))
        batch.seq_lens.append(start + n)
        batch.sample_indices.append(len(batch.token_ids) - 1)
        if n == 1:
            batch.num_decode_tokens += 1
        else:
            batch.num_prefill_tokens += n
    return batch


def test_model_sizes_match_the_published_ones() -> None:
    assert LLAMA.num_params == pytest.approx(8.03e9, rel=0.001)
    assert MODELS["smollm2-135m"].num_params == pytest.approx(134.5e6, rel=0.001)
    assert MODELS["qwen3-0.6b"].num_params == pytest.approx(0.596e9, rel=0.01)
    assert LLAMA.weight_bytes == pytest.approx(16.06e9, rel=0.001)
    # K and V, 32 layers, 8 KV heads of 128, bf16: 128 KiB per token
    assert LLAMA.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 128 * 1024


def test_llama8b_decode_at_batch_1_on_h100_streams_the_weights() -> None:
    cost = RooflineCostModel(LLAMA, H100)
    t = cost.step_time(batch_of((1000, 1)))
    # ~16 GB of weights (the embedding table is not read, only one row) over 3.35 TB/s ≈ 4.8 ms
    weights_read = LLAMA.weight_bytes - LLAMA.vocab_size * LLAMA.hidden_size * 2
    assert t == pytest.approx(weights_read / 3.35e12 + H100.step_overhead, rel=0.02)
    assert 4.5e-3 < t < 5.8e-3
    parts = cost.breakdown(batch_of((1000, 1)))
    assert sum(parts.values()) == pytest.approx(t)
    # the KV read: 1001 tokens x 128 KiB over 3.35 TB/s
    assert parts["attention_decode"] == pytest.approx(
        (1001 * 128 * 1024 + 32 * 2 * 4096 * 2) / 3.35e12, rel=1e-6
    )


def test_decode_is_memory_bound_so_batching_is_almost_free() -> None:
    cost = RooflineCostModel(LLAMA, H100)
    one = cost.step_time(batch_of((500, 1)))
    many = cost.step_time(batch_of(*[(500, 1)] * 64))
    assert many < 1.6 * one  # 64x the tokens for well under 2x the time
    assert cost.step_time(batch_of(*[(4000, 1)] * 64)) > many  # longer contexts: more KV to read


def test_prefill_is_compute_bound() -> None:
    cost = RooflineCostModel(LLAMA, H100)
    parts = cost.breakdown(batch_of((0, 2048)))
    linear_flops = (
        2
        * 2048
        * (LLAMA.num_params - 2 * LLAMA.vocab_size * LLAMA.hidden_size - 4096 - 32 * 2 * 4096)
    )
    assert parts["linear"] == pytest.approx(linear_flops / 989.4e12, rel=1e-6)  # ≈ 28 ms
    # causal attention: 4 * layers * heads * head_dim FLOPs per (query, key) pair
    pairs = 2048 * 2049 // 2
    assert parts["attention_prefill"] == pytest.approx(
        4 * 32 * 32 * 128 * pairs / 989.4e12, rel=1e-6
    )
    assert parts["lm_head"] == pytest.approx(
        LLAMA.vocab_size * 4096 * 2 / 3.35e12, rel=0.01
    )  # one row samples


def test_a_cached_prefix_costs_attention_not_linear_layers() -> None:
    cost = RooflineCostModel(LLAMA, H100)
    fresh = cost.breakdown(batch_of((0, 512)))
    after_prefix = cost.breakdown(batch_of((4096, 512)))
    assert after_prefix["linear"] == fresh["linear"]
    assert after_prefix["attention_prefill"] > 5 * fresh["attention_prefill"]


def test_hardware_ordering_and_the_cpu_profile() -> None:
    batch = batch_of((0, 256), *[(300, 1)] * 8)
    small = MODELS["smollm2-135m"]
    times = {
        name: RooflineCostModel(with_dtype(small, hw.dtype_bytes), hw).step_time(batch)
        for name, hw in HARDWARE.items()
    }
    assert times["h200"] <= times["h100"] < times["a100"] < times["l4"] < times["cpu"]
    # SmolLM2 in fp32 on this 2-core machine: 0.54 GB of weights over 24 GB/s ≈ 22 ms per decode
    cpu = HARDWARE["cpu"]
    decode = RooflineCostModel(with_dtype(small, 4), cpu).step_time(batch_of((100, 1)))
    assert decode == pytest.approx(small.num_params * 4 / 24e9 + cpu.step_overhead, rel=0.15)


def test_kv_blocks_fill_the_memory_left_by_the_weights() -> None:
    blocks = num_kv_blocks(LLAMA, H100, 16)
    assert blocks == int((0.9 * 80 * GiB - LLAMA.weight_bytes) // (16 * 128 * 1024))
    assert num_kv_blocks(with_dtype(MODELS["smollm2-135m"], 4), HARDWARE["cpu"], 16) == GiB // (
        16 * 46080
    )
    assert num_kv_blocks(LLAMA, HARDWARE["l4"], 16) == int(
        (0.9 * 24e9 - LLAMA.weight_bytes) // 2**21
    )
    with pytest.raises(ValueError, match="no memory for the KV cache"):
        num_kv_blocks(with_dtype(LLAMA, 4), HARDWARE["l4"], 16)  # 32 GB of fp32 weights on 24 GB


def test_models_from_hf_config_json(tmp_path: Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    spec = ModelSpec.from_hf_config(config, name="Llama-3.1-8B")
    assert spec == LLAMA
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert get_model(str(tmp_path)).num_params == LLAMA.num_params
    with pytest.raises(ValueError, match="unknown model"):
        get_model("gpt-5")
    with pytest.raises(ValueError, match="no 'hidden_size'"):
        ModelSpec.from_hf_config({"num_attention_heads": 2})
    with pytest.raises(ValueError, match="unknown hardware"):
        get_hardware("tpu")
