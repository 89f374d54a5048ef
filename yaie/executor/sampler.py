"""Turn one step's logits into one token per request, for a batch of mixed sampling settings.

Every request in a continuous batch brings its own ``SamplingParams``, so the sampler never loops
over rows to do arithmetic: it turns the settings into per-row tensors and runs each stage once for
the whole batch, in the order vLLM and Hugging Face use:

    penalties → temperature → top-k → top-p → min-p → draw

The draw is an *exponential race*: ``argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d. per token picks
token ``i`` with probability ``probs[i]`` (the same trick as Gumbel-max, without logs). It needs no
CDF search and no host round trip, and it makes seeding easy: a seeded row's noise comes from a
generator seeded by ``(seed, number of output tokens so far)`` alone, so the row's token does not
depend on which other requests share the batch, where the row sits in it, or whether the request
was preempted and recomputed in between.

Everything stays on the logits' device; the only host syncs are the ones the caller cannot avoid
(reading the sampled ids, and the logprobs it asked for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor

from yaie.core.batch import ScheduledRequest
from yaie.core.sampling import SamplingParams
from yaie.kernels import argmax

_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class SamplerOutput:
    """One sampled token per row; ``logprobs`` as in ``StepResult`` (``None`` if nobody asked).

    ``token_ids`` stays on the logits' device so the executor decides when to pay the sync.
    ``logprobs[i]`` is ``(logprob of the sampled token, {token: logprob} of the top-n)``, taken from
    the model's raw log-softmax (before penalties and temperature, as OpenAI reports them), with
    the top-n dict ordered from most to least likely; rows that did not ask hold ``None``.
    """

    token_ids: Tensor
    logprobs: list[tuple[float, dict[int, float]] | None] | None = None


class Sampler:
    """Samples a batch of rows, each with its own ``SamplingParams``.

    ``seed`` seeds the sampler-wide generator used by unseeded requests (``None``: from the OS).
    One generator is kept per device, so the same ``Sampler`` serves CPU and CUDA logits.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}
        self._per_request: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: Tensor, requests: list[ScheduledRequest]) -> SamplerOutput:
        """Sample one token per row of ``logits`` ``[N, V]``; row ``i`` is ``requests[i]``."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(
                f"logits must be [len(requests), vocab], got {tuple(logits.shape)} "
                f"for {len(requests)} requests"
            )
        params = [r.sampling_params for r in requests]
        penalized = _apply_penalties(logits, requests)
        if all(p.greedy for p in params):
            # Fast path: nothing random, so skip temperature, filters and noise altogether.
            token_ids = argmax(penalized)
        else:
            token_ids = self._sample_mixed(penalized, requests)
        return SamplerOutput(token_ids, _logprobs(logits, token_ids, params))

    def _sample_mixed(self, logits: Tensor, requests: list[ScheduledRequest]) -> Tensor:
        """Greedy and random rows together: sample every row, then take argmax for greedy ones."""
        params = [r.sampling_params for r in requests]
        device = logits.device
        greedy = _on_device([p.greedy for p in params], torch.bool, device)
        # A greedy row divides by 1 so the batch stays finite; its draw is discarded below.
        temperature = _on_device([p.temperature or 1.0 for p in params], torch.float32, device)
        scaled = logits / temperature[:, None]

        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            vocab = logits.shape[1]
            top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
            top_p = [p.top_p for p in params]
            scaled = _apply_top_k_top_p(
                scaled,
                _on_device(top_k, torch.int64, device),
                _on_device(top_p, torch.float32, device),
            )
        if any(p.min_p > 0 for p in params):
            min_p = _on_device([p.min_p for p in params], torch.float32, device)
            scaled = _apply_min_p(scaled, min_p)

        probs = scaled.softmax(dim=-1)
        sampled = argmax(probs / self._exponential_noise(probs, requests))
        return torch.where(greedy, argmax(logits), sampled)

    def _exponential_noise(self, probs: Tensor, requests: list[ScheduledRequest]) -> Tensor:
        """Exp(1) noise shaped like ``probs``; seeded rows get their own reproducible stream."""
        shared = self._shared_generator(probs.device)
        noise = torch.empty_like(probs).exponential_(generator=shared)
        for row, request in enumerate(requests):
            seed = request.sampling_params.seed
            if seed is not None:
                generator = self._per_request_generator(probs.device)
                generator.manual_seed(_row_seed(seed, len(request.output_token_ids)))
                noise[row].exponential_(generator=generator)
        # An exact 0 would turn a masked token's 0 / 0 into NaN and win the argmax.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._shared[device] = generator
        return self._shared[device]

    def _per_request_generator(self, device: torch.device) -> torch.Generator:
        """One reusable generator per device, re-seeded for every seeded row it serves."""
        if device not in self._per_request:
            self._per_request[device] = torch.Generator(device=device)
        return self._per_request[device]


def argmax_suffices(requests: list[ScheduledRequest]) -> bool:
    """Whether every row's token is the argmax of its raw logits: greedy rows with no
    penalties and no logprobs, whose logits the sampler would only read for their argmax
    (so the executor may get it without them: ``CausalLM.greedy_tokens``)."""
    return all(
        p.greedy
        and p.logprobs is None
        and p.repetition_penalty == 1.0
        and p.frequency_penalty == 0
        and p.presence_penalty == 0
        for p in (r.sampling_params for r in requests)
    )


def _apply_penalties(logits: Tensor, requests: list[ScheduledRequest]) -> Tensor:
    """Return logits with repetition, frequency and presence penalties applied (never in place).

    Repetition penalty (HF/CTRL) looks at prompt and output tokens: a seen token's logit is
    divided by the penalty if positive and multiplied by it if negative, so ``> 1`` always makes
    it less likely. Frequency and presence penalties (OpenAI) look at output tokens only:
    ``logit -= frequency * count + presence * (count > 0)``.

    The token lists are flattened on the host each step; only rows with a penalty pay for it.
    """
    params = [r.sampling_params for r in requests]
    repetition_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    additive_rows = [
        i for i, p in enumerate(params) if p.frequency_penalty != 0 or p.presence_penalty != 0
    ]
    if not repetition_rows and not additive_rows:
        return logits
    device = logits.device

    if repetition_rows:
        seen_tokens = {
            i: [*requests[i].prompt_token_ids, *requests[i].output_token_ids]
            for i in repetition_rows
        }
        rows, tokens = _flatten(seen_tokens, device)
        seen = torch.zeros_like(logits, dtype=torch.bool)
        # A device-side True: ``seen[rows, tokens] = True`` would sync to copy the Python bool.
        seen.index_put_((rows, tokens), torch.ones((), dtype=torch.bool, device=device))
        penalty = _column([p.repetition_penalty for p in params], device)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)

    if additive_rows:
        rows, tokens = _flatten({i: requests[i].output_token_ids for i in additive_rows}, device)
        # Count with atomic adds into the flattened [N * V] table (an accumulating index_put_
        # sorts the indices first, several times slower on CUDA).
        vocab = logits.shape[1]
        ones = torch.ones_like(tokens, dtype=logits.dtype)
        counts = torch.zeros_like(logits).view(-1).scatter_add_(0, rows * vocab + tokens, ones)
        counts = counts.view_as(logits)
        frequency = _column([p.frequency_penalty for p in params], device)
        presence = _column([p.presence_penalty for p in params], device)
        logits = logits - frequency * counts - presence * (counts > 0)
    return logits


def _apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Mask all but each row's ``top_k`` best tokens, then all beyond its top-p nucleus.

    Works in sorted order so "the k best" is exact even with tied logits, and the nucleus is the
    smallest prefix whose mass reaches ``top_p`` (a token is kept if the mass *before* it is
    still short of ``top_p``, so the best token always survives). Rows with ``top_p == 1`` skip
    the nucleus test, which float rounding of the cumulative sum could otherwise trip.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)
    drop = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, -math.inf).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
    drop_in_vocab_order = torch.empty_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(drop_in_vocab_order, -math.inf)


def _apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Mask tokens less likely than ``min_p`` times the row's most likely token.

    ``p_i < min_p * p_max`` is ``logit_i < logit_max + log(min_p)``: no softmax needed, and since
    it is a ratio to the best token it gives the same answer before or after top-k/top-p
    renormalise the row. ``min_p == 0`` gives ``log 0 = -inf``, which masks nothing.
    """
    threshold = logits.max(dim=-1, keepdim=True).values + min_p.log()[:, None]
    return logits.masked_fill(logits < threshold, -math.inf)


def _logprobs(
    logits: Tensor, token_ids: Tensor, params: list[SamplingParams]
) -> list[tuple[float, dict[int, float]] | None] | None:
    """Raw-model logprobs of the sampled token and the top-n, for the rows that asked."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    index = _on_device(rows, torch.int64, logits.device)
    logprobs = logits[index].float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids[index][:, None]).squeeze(1)
    top_values, top_ids = logprobs.topk(max(params[i].logprobs for i in rows), dim=-1)
    chosen_list, values, ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()

    out: list[tuple[float, dict[int, float]] | None] = [None] * len(params)
    for j, row in enumerate(rows):
        n = params[row].logprobs
        out[row] = (chosen_list[j], dict(zip(ids[j][:n], values[j][:n])))
    return out


def _flatten(token_lists: dict[int, list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """``{row: tokens}`` → (row index, token id) pairs, ready for advanced indexing.

    The token ids are chained in C and the row indices expanded on the device: a Python loop
    over every token would cost a millisecond per step for a batch of long prompts.
    """
    tokens = list(chain.from_iterable(token_lists.values()))
    rows = torch.repeat_interleave(
        _on_device(list(token_lists), torch.int64, device),
        _on_device([len(t) for t in token_lists.values()], torch.int64, device),
        output_size=len(tokens),  # known on the host, so no sync to size the result
    )
    return rows, _on_device(tokens, torch.int64, device)


def _column(values: list[float], device: torch.device) -> Tensor:
    """Per-row scalars as an ``[N, 1]`` float column that broadcasts over the vocabulary."""
    return _on_device(values, torch.float32, device)[:, None]


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host list → device tensor via pinned memory, so the copy does not stall the host."""
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)


def _row_seed(seed: int, step: int) -> int:
    """Seed for a seeded request's draw number ``step``: a pure function of the two.

    SplitMix64 scrambles both, so neighbouring seeds or steps give unrelated streams.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ step)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
