"""The whole engine on a CUDA GPU: greedy tokens with the numba kernels equal the torch path's.

A small random-weight Llama (SmolLM2's head layout: 9 query / 3 KV heads of 64, so GQA 3) is
saved as a local checkpoint and loaded the way ``yaie.LLM`` loads one (``ModelExecutor.load``),
then driven by ``LLMEngine`` over prompts that make every step kind the kernels serve: chunked
prefill of a long prompt (an extend over its own cached first chunk), two prompts sharing a
prefix, short prompts, and their decodes, all mixed in the same steps. The
same executor runs the same requests twice: with the numba kernels, then with every op on its
torch reference (``YAIE_KERNELS=torch``). In float32 both paths compute the same function to
about 1e-6, so greedy decoding must pick the same tokens.
"""

from __future__ import annotations

import time

import pytest
import torch
from kernel_helpers import SIMULATED

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(SIMULATED or not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _run(executor, prompts: list[list[int]]) -> dict[str, list[int]]:
    from yaie.core.engine import EngineConfig, LLMEngine
    from yaie.core.sampling import SamplingParams
    from yaie.core.scheduler import SchedulerConfig

    config = EngineConfig(
        num_blocks=executor.plan.num_blocks,
        block_size=executor.plan.block_size,
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=192, max_model_len=1024),
    )
    engine = LLMEngine(config, executor, time.monotonic)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def test_engine_greedy_tokens_match_the_torch_path(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from yaie.args import EngineArgs
    from yaie.executor.model_executor import ModelExecutor
    from yaie.hub import ResolvedModel
    from yaie.kernels import _numba, attention

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1024,
        rope_theta=100000.0,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    # The KV cache gets what is free when the executor sizes it, less all but 4 GiB of what is
    # free now: a few GiB whatever else this process or another holds on the GPU.
    free, total = torch.cuda.mem_get_info()
    # Eager: every step goes through the dispatch functions, so YAIE_KERNELS=torch below applies
    # (a CUDA graph would replay the numba kernels it captured).
    args = EngineArgs(
        model=str(tmp_path), device="cuda", dtype="float32", enforce_eager=True,
        gpu_memory_utilization=1 - (free - (4 << 30)) / total,
    )
    executor = ModelExecutor.load(ResolvedModel(tmp_path, "hf_dir", None, "tiny"), args)

    shared = torch.randint(0, 512, (80,)).tolist()
    prompts = [
        torch.randint(0, 512, (300,)).tolist(),  # chunked: 192 + 108 tokens
        shared + torch.randint(0, 512, (5,)).tolist(),
        *(torch.randint(0, 512, (n,)).tolist() for n in (3, 17, 40)),
        shared + torch.randint(0, 512, (21,)).tolist(),  # 80 cached tokens, then an extend
    ]

    decode_calls = []
    launch = attention.paged_decode_attention
    monkeypatch.setattr(attention, "paged_decode_attention",
                        lambda *a, **k: decode_calls.append(1) or launch(*a, **k))
    with_kernels = _run(executor, prompts)
    assert decode_calls, "the numba decode kernel never ran"

    monkeypatch.setenv(_numba.KERNELS_ENV, "torch")
    _numba.gpu_available.cache_clear()
    try:
        calls_before = len(decode_calls)
        with_references = _run(executor, prompts)
        assert len(decode_calls) == calls_before, "YAIE_KERNELS=torch still ran a numba kernel"
    finally:
        monkeypatch.delenv(_numba.KERNELS_ENV)
        _numba.gpu_available.cache_clear()

    assert all(len(t) == 24 for t in with_kernels.values())
    assert with_kernels == with_references
