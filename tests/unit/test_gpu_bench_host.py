"""The host side of the GPU path, on the CPU: graph ladder, staged inputs, presets, roofline and
the ``yaie bench --preset`` command (graphs and the real device are ``tests/gpu``'s job)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from yaie.bench import gpu
from yaie.cli import main
from yaie.core.batch import ScheduledBatch, ScheduledRequest
from yaie.core.sampling import SamplingParams
from yaie.executor.cuda_graph import StagedInputs, graph_batch_sizes
from yaie.model.config import ModelConfig
from yaie.model.presets import preset_config, random_weights


def test_graph_ladder_covers_every_batch_up_to_max_num_seqs() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(256)[-3:] == [224, 240, 256]


def _decode_batch(seq_lens: list[int], tables: list[list[int]], block_size: int = 4) -> ScheduledBatch:
    batch = ScheduledBatch(7, block_size)
    for i, (seq_len, table) in enumerate(zip(seq_lens, tables)):
        pos = seq_len - 1
        batch.requests.append(ScheduledRequest(f"r{i}", pos, 1, True, SamplingParams(), [], []))
        batch.token_ids.append(100 + i)
        batch.positions.append(pos)
        batch.slot_mapping.append(table[pos // block_size] * block_size + pos % block_size)
        batch.query_start_loc.append(i + 1)
        batch.seq_lens.append(seq_len)
        batch.block_tables.append(table)
        batch.sample_indices.append(i)
    return batch


def test_staged_inputs_pad_to_the_graph_size_and_copy_one_prefix() -> None:
    staged = StagedInputs(max_rows=8, max_blocks=5, device=torch.device("cpu"))
    staged.host["block_tables"][:] = 99  # stale ids from an earlier step
    staged.fill(_decode_batch([3, 9, 17, 2, 6], [[4], [0, 1, 2], [5, 6, 7, 8, 9], [3], [10, 11]]), 8)
    staged.upload()
    batch = _decode_batch([9, 2, 13], [[0, 1, 2], [3], [5, 6, 7, 8]])
    staged.fill(batch, 4)
    staged.device["block_tables"].fill_(-7)
    staged.upload(staged.nbytes(4))
    dev = staged.device
    assert dev["token_ids"][:4].tolist() == [100, 101, 102, 0]
    assert dev["positions"][:4].tolist() == [8, 1, 12, 0]
    assert dev["slot_mapping"][:5].tolist() == [8, 13, 32, -1, 45]  # row 4: past this step's rows, left as the last step wrote it
    assert dev["seq_lens"][:4].tolist() == [9, 2, 13, 0]
    tables = dev["block_tables"]
    assert tables[0, :3].tolist() == [0, 1, 2]
    assert tables[1, 0] == 3 and tables[2, :4].tolist() == [5, 6, 7, 8]
    assert (tables[4:] == -7).all(), "rows past the graph size must not be copied"
    assert dev["token_ids"].dtype == torch.int64 and tables.dtype == torch.int32


def test_random_weights_fit_both_loaders_and_repeat_per_seed() -> None:
    config = preset_config("tiny-llama")
    names = [name for name, _ in random_weights(config, "cpu", torch.float32)]
    with torch.device("meta"):
        hf_names = set(AutoModelForCausalLM.from_config(config).state_dict())
    assert set(names) == hf_names  # untied: lm_head included
    a = dict(random_weights(config, "cpu", torch.float32, seed=1))
    b = dict(random_weights(config, "cpu", torch.bfloat16, seed=1))
    assert torch.equal(a["model.norm.weight"], torch.ones(256))
    assert torch.equal(a["lm_head.weight"].bfloat16(), b["lm_head.weight"])
    assert not torch.equal(a["lm_head.weight"], dict(random_weights(config, "cpu", torch.float32))["lm_head.weight"])
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*qwen3-0.6b"):
        preset_config("gpt5")


@pytest.mark.parametrize("preset, params", [("qwen3-0.6b", 596_049_920), ("llama-3.1-8b", 8_030_261_248)])
def test_roofline_counts_the_weights_a_step_reads(preset: str, params: int) -> None:
    """Every parameter but norms and the embedding gather (the published totals count a tied
    head once); decode bytes and FLOPs of one step by hand."""
    cfg = ModelConfig.from_hf(preset_config(preset))
    ceilings = gpu.Ceilings(bandwidth=3e12, matmul=8e14)
    roof = gpu.Roofline.of(cfg, 2, ceilings)
    norms = cfg.num_layers * (2 * cfg.hidden_size + (2 * cfg.head_dim if cfg.qk_norm else 0))
    norms += cfg.hidden_size
    embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    assert roof.layer_params + roof.head_params == params - norms - embedding
    ctx = np.array([1000, 3000])
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    assert roof.decode(ctx) == pytest.approx((roof.weight_bytes + 4000 * kv) / 3e12)
    prefill, decode = roof.generation(np.array([10, 20]), np.array([3, 2]))
    assert decode == pytest.approx(roof.decode(np.array([11, 21])) + roof.decode(np.array([12])))
    assert prefill == roof.prefill(np.array([10, 20]))


def test_bench_latency_with_a_preset_prints_every_engine_and_the_floor(capsys) -> None:
    code = main(["bench", "latency", "--preset", "tiny-qwen3", "--device", "cpu", "--batch", "2",
                 "--prompt-len", "8", "--new-tokens", "4", "--no-peers"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [(line[:29].strip(), int(line[29:35]), line[35:].split()) for line in out.splitlines()[3:]]
    assert [(engine, batch) for engine, batch, _ in rows] == [
        ("yaie", 1), ("yaie", 2), ("yaie --enforce-eager", 1), ("yaie --enforce-eager", 2),
        ("roofline floor", 1), ("roofline floor", 2),
    ], out
    assert all(float(ttft) > 0 and float(decode) > 0 for _, _, (ttft, decode, *_) in rows), out


def test_bench_throughput_counts_every_requested_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "LENGTHS", (4, 12))
    base = gpu.EngineArgs(device="cpu", kv_cache_memory="64MiB")
    results, _, bound = gpu.throughput("tiny-llama", base, num_requests=5, peers=False, eager=False)
    yaie, floor = results
    assert yaie.engine == "yaie" and yaie.output_tok_s > 0 and yaie.note == ""
    assert floor.output_tok_s == bound and floor.seconds > 0


def test_bench_preset_needs_a_gpu_for_real_shapes(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "throughput", "--preset", "qwen3-0.6b", "--device", "cpu"]) == 2
    assert "need a CUDA GPU" in capsys.readouterr().err
