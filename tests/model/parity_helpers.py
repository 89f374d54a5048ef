"""Our models against transformers' on the same ragged steps over a paged KV cache.

Shared by the Llama-family and GPT-2 parity tests. The mixed step under test holds everything a
real step can: a fresh prefill, a prefill chunk over a cached prefix, and decodes, laid out in
shuffled non-contiguous blocks. Every new token's logits must match transformers'
full-sequence forward.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from yaie.model import CausalLM, ModelConfig, get_model_class
from yaie.model.attention import AttentionMetadata

BLOCK_SIZE = 4
NUM_BLOCKS = 40


def hf_model(hf_config: PretrainedConfig) -> torch.nn.Module:
    """transformers' model with random weights, eager attention, fp32."""
    torch.manual_seed(0)
    hf_config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: perturb so loading shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def our_model(
    hf_config: PretrainedConfig,
    weights: Iterable[tuple[str, torch.Tensor]],
    device: str = "cpu",
) -> CausalLM:
    """Built the way the executor builds it: on the meta device, then materialised and loaded."""
    config = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config)
    model = model.to_empty(device=device).to(torch.float32)
    model.load_weights(weights)
    model.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    return model


@dataclass
class Seq:
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    computed: int = 0


def run_step(
    model: CausalLM, work: list[tuple[Seq, int]], free_blocks: list[int]
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
    device = model.lm_head.weight.device
    meta = AttentionMetadata.build(qsl, seq_lens, tables, slots, BLOCK_SIZE, device)
    hidden = model(torch.tensor(token_ids, device=device), torch.tensor(positions, device=device),
                   meta)
    logits = model.compute_logits(hidden).cpu()
    assert logits.dtype == torch.float32
    assert logits.shape == (len(token_ids), model.config.vocab_size)
    return [logits[qsl[i] : qsl[i + 1]] for i in range(len(work))]


def assert_matches_hf(reference: torch.nn.Module, seq: Seq, logits: torch.Tensor) -> None:
    with torch.no_grad():
        expected = reference(torch.tensor([seq.tokens[: seq.computed]])).logits[0]
    new = logits.shape[0]
    torch.testing.assert_close(logits, expected[seq.computed - new :], rtol=0, atol=1e-4)


def check_mixed_batch(
    reference: torch.nn.Module, model: CausalLM, seed: str, order: str, shuffled_blocks: bool
) -> None:
    """Two steps: B's first 5 tokens and C's and D's prompts but their last token; then A fresh
    (7), B's next chunk (6) over its cached 5, and C and D decoding, in ``order``."""
    rng = random.Random(seed)
    free_blocks = list(range(NUM_BLOCKS))
    if shuffled_blocks:
        rng.shuffle(free_blocks)
    else:
        free_blocks.reverse()  # pop() yields 0, 1, 2, ...
    vocab = model.config.vocab_size
    a, b, c, d = (Seq([rng.randrange(vocab) for _ in range(n)]) for n in (7, 11, 10, 14))

    earlier = run_step(model, [(b, 5), (c, 9), (d, 13)], free_blocks)
    for seq, logits in zip((b, c, d), earlier):
        assert_matches_hf(reference, seq, logits)

    work = {"interleaved": [(c, 1), (a, 7), (d, 1), (b, 6)],
            "decodes-first": [(c, 1), (d, 1), (a, 7), (b, 6)]}[order]
    for (seq, _), logits in zip(work, run_step(model, work, free_blocks)):
        assert_matches_hf(reference, seq, logits)
