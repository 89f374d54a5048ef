"""How much GPU memory the KV cache gets: what is left once everything else has its share.

The KV pool is the one allocation worth sizing: every block in it is a request that can run
concurrently. Everything else must fit beside it, so it is measured, not guessed:

- **already taken**: weights, the CUDA context, cuBLAS workspaces and any other process on the
  card: ``total - free`` right after the weights are loaded;
- **a step's activations**: the peak of one profiled step at the engine's limits — a prefill of
  ``max_num_batched_tokens`` tokens, logits for ``max_num_seqs`` rows, and a top-k/top-p draw over
  them (its sort is the sampler's largest temporary);
- **the decode graphs' pool**: CUDA graphs keep their own memory pool, which the caching
  allocator cannot hand to eager steps; a decode step of at most ``max_num_seqs`` rows needs less
  than the profiled step, so the same peak is reserved again when graphs are on.

The pool gets ``gpu_memory_utilization x total`` minus those three.
"""

from __future__ import annotations

import logging

import torch

from yaie.args import EngineArgs
from yaie.core.batch import ScheduledRequest
from yaie.core.sampling import SamplingParams
from yaie.executor.sampler import Sampler
from yaie.model.attention import AttentionMetadata
from yaie.model.causal_lm import CausalLM

logger = logging.getLogger(__name__)

_GIB = 2**30


def kv_cache_budget(model: CausalLM, args: EngineArgs, device: torch.device, graphs: bool) -> int:
    """Bytes the KV pool may take on ``device`` (negative when nothing is left)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    taken = total - free
    peak = step_activation_peak(model, args, device)
    reserve = 2 * peak if graphs else peak
    budget = int(args.gpu_memory_utilization * total) - taken - reserve
    logger.info(
        "GPU memory: %.1f GiB total x %.2f; %.2f GiB taken (weights %.2f GiB), step activation "
        "peak %.2f GiB%s, %.2f GiB left for the KV cache",
        total / _GIB, args.gpu_memory_utilization, taken / _GIB,
        sum(p.numel() * p.element_size() for p in model.parameters()) / _GIB, peak / _GIB,
        " (reserved twice: eager steps and CUDA graphs)" if graphs else "", budget / _GIB,
    )
    return budget


@torch.inference_mode()
def step_activation_peak(model: CausalLM, args: EngineArgs, device: torch.device) -> int:
    """Peak bytes one step at the engine's limits allocates beyond what it starts with.

    Runs on a scratch KV cache just large enough for the profiled prefill, shrunk back to one
    block afterwards so its memory is free again before the real pool is sized. Also the first
    launch of every prefill-path kernel, so numba compiles them here.
    """
    block_size = args.block_size
    tokens = min(args.max_num_batched_tokens, model.config.max_position_embeddings)
    num_blocks = -(-tokens // block_size)
    model.allocate_kv_cache(num_blocks, block_size)
    meta = AttentionMetadata.build(
        [0, tokens], [tokens], [list(range(num_blocks))], list(range(tokens)), block_size, device
    )
    token_ids = torch.randint(0, model.config.vocab_size, (tokens,), device=device)
    positions = torch.arange(tokens, device=device)
    rows = min(args.max_num_seqs, tokens)
    request = ScheduledRequest(
        "profile", 0, 1, True, SamplingParams(temperature=1.0, top_k=50, top_p=0.9), [], []
    )
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    hidden = model(token_ids, positions, meta)
    logits = model.compute_logits(hidden[-rows:])
    Sampler(0).sample(logits, [request] * rows)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    del hidden, logits, meta
    model.allocate_kv_cache(1, block_size)
    torch.cuda.empty_cache()
    return peak
