"""``yaie bench latency`` / ``yaie bench throughput``: YAIE beside its peers, in one process.

Every engine gets the same weights (dequantized once by our loader and handed to transformers
too), the same prompts (random token ids from a fixed seed) and the same greedy settings with
EOS ignored, so each one produces exactly the requested number of tokens. llama.cpp joins when
``llama-cpp-python`` is installed and the model is a GGUF file (it reads the file itself).
Figures are medians of ``--repeat`` runs in which the engines take turns; compare ratios from
one run, never across machines.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from yaie.core.sampling import SamplingParams
from yaie.llm import LLM


@dataclass(slots=True)
class Row:
    engine: str
    workload: str
    tokens_per_s: float
    note: str = ""


def _interleaved_medians(
    runs: dict[tuple[str, str], Callable[[], float]], repeat: int
) -> dict[tuple[str, str], float]:
    """Median rate of each ``(engine, workload)`` run: one warm-up round, then ``repeat`` rounds
    in which every run goes once, in turn.

    Interleaving puts each engine's samples in the same stretches of time, so a load that
    comes and goes (other jobs on a shared machine) weighs on every engine alike and the ratios
    stay meaningful where the absolute rates drift.
    """
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for round_ in range(repeat + 1):
        for key, fn in runs.items():
            rate = fn()
            if round_:
                samples[key].append(rate)
    return {key: statistics.median(rates) for key, rates in samples.items()}


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


class _Yaie:
    name = "yaie"

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def generate(self, prompts: list[list[int]], new_tokens: int | list[int]) -> float:
        """Output tokens per second over the whole run (prefill included, no prefix hits)."""
        lengths = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
        self.llm.engine.kv.radix.reset()
        t0 = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(prompts, lengths)):
            self.llm.add(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), f"bench-{i}")
        made = 0
        while self.llm.engine.has_unfinished:
            made += sum(len(o.new_token_ids) for o in self.llm.engine.step())
        return made / (time.perf_counter() - t0)

    def decode_rate(self, prompt: list[int], new_tokens: int) -> float:
        """Batch-1 decode tokens/s, prefill excluded (from the request's own timestamps)."""
        self.llm.engine.kv.radix.reset()
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        m = self.llm.generate([prompt], params)[0].metrics
        return (m.num_output_tokens - 1) / (m.e2e - m.ttft)

    def prefill_rate(self, prompt: list[int]) -> float:
        self.llm.engine.kv.radix.reset()  # no prefix hits: every run computes the whole prompt
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        self.llm.generate([prompt], params)
        return len(prompt) / (time.perf_counter() - t0)


class _Transformers:
    name = "transformers"

    def __init__(self, llm: LLM) -> None:
        from transformers import AutoModelForCausalLM

        from yaie.model.loader import iter_weights

        config = llm.executor.hf_config
        model = AutoModelForCausalLM.from_config(config, dtype=llm.executor.dtype)
        state = dict(iter_weights(llm.resolved, llm.executor.dtype, progress=False))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("lm_head" not in k for k in missing):
            raise RuntimeError(f"weights do not fit transformers' model: {missing} {unexpected}")
        model.tie_weights()
        self.model = model.to(llm.executor.device).eval()
        self.device = llm.executor.device

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int | list[int], batch: int = 16) -> float:
        """Static batches of ``batch`` left-padded prompts, each run to its longest output;
        only the tokens each request asked for count as output."""
        lengths = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            group, want = prompts[i : i + batch], lengths[i : i + batch]
            width = max(map(len, group))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=self.device)
            self.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max(want),
                min_new_tokens=max(want),
                do_sample=False,
                pad_token_id=0,
            )
        return sum(lengths) / (time.perf_counter() - t0)

    @torch.inference_mode()
    def prefill_rate(self, prompt: list[int]) -> float:
        ids = torch.tensor([prompt], device=self.device)
        t0 = time.perf_counter()
        self.model(ids, logits_to_keep=1)
        return len(prompt) / (time.perf_counter() - t0)


class _LlamaCpp:
    name = "llama.cpp"

    def __init__(self, llm: LLM, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.model = Llama(
            model_path=str(llm.resolved.gguf_path),
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=torch.get_num_threads(),
            logits_all=False,
            verbose=False,
        )

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        assert len(prompts) == 1, "llama-cpp-python serves one sequence at a time"
        m = self.model
        m.reset()
        t0 = time.perf_counter()
        made = 0
        for token in m.generate(prompts[0], temp=0.0, top_k=1, reset=True):
            made += 1
            if made == new_tokens:
                break
        return made / (time.perf_counter() - t0)

    def prefill_rate(self, prompt: list[int]) -> float:
        m = self.model
        m.reset()
        t0 = time.perf_counter()
        m.eval(prompt)
        return len(prompt) / (time.perf_counter() - t0)


def _peers(llm: LLM, n_ctx: int) -> list[_Transformers | _LlamaCpp]:
    """transformers, and llama.cpp where it is installed and the model is a GGUF file. Both
    stay loaded for the whole benchmark: an idle llama.cpp context keeps no thread spinning."""
    peers: list[_Transformers | _LlamaCpp] = [_Transformers(llm)]
    if llm.resolved.kind == "gguf":
        try:
            peers.append(_LlamaCpp(llm, n_ctx))
        except ImportError:
            pass
    return peers


def latency(
    llm: LLM,
    prompt_len: int = 32,
    new_tokens: int = 128,
    batch: int = 16,
    prefill_len: int = 512,
    repeat: int = 3,
) -> list[Row]:
    """Batch-1 decode, ``batch`` concurrent requests, and prompt processing, per engine; the
    engines take turns within each workload (``_interleaved_medians``)."""
    vocab = llm.executor.model_config.vocab_size
    one = _prompts(1, prompt_len, vocab)
    many = _prompts(batch, prompt_len, vocab, seed=1)
    long_prompt = _prompts(1, prefill_len, vocab, seed=2)[0]
    ours = _Yaie(llm)
    peers = _peers(llm, prefill_len + new_tokens + 8)
    workloads: list[dict[tuple[str, str], Callable[[], float]]] = [
        {("yaie", "batch 1 (e2e)"): lambda: ours.generate(one, new_tokens)}
        | {(p.name, "batch 1 (e2e)"): partial(p.generate, one, new_tokens) for p in peers},
        {("yaie", "batch 1 (decode)"): lambda: ours.decode_rate(one[0], new_tokens)},
        {("yaie", f"batch {batch}"): lambda: ours.generate(many, new_tokens)}
        | {
            (p.name, f"batch {batch}"): partial(p.generate, many, new_tokens)
            for p in peers
            if isinstance(p, _Transformers)  # llama-cpp-python serves one sequence at a time
        },
        {("yaie", f"prefill {prefill_len}"): lambda: ours.prefill_rate(long_prompt)}
        | {(p.name, f"prefill {prefill_len}"): partial(p.prefill_rate, long_prompt) for p in peers},
    ]
    rows = []
    for runs in workloads:
        medians = _interleaved_medians(runs, repeat)
        rows += [Row(engine, workload, rate) for (engine, workload), rate in medians.items()]
    return rows


def throughput(
    llm: LLM,
    num_requests: int = 64,
    input_len: tuple[int, int] = (16, 512),
    output_len: tuple[int, int] = (16, 256),
    seed: int = 0,
) -> list[Row]:
    """Requests with random lengths (uniform in the given ranges), all submitted at once."""
    rng = random.Random(seed)
    vocab = llm.executor.model_config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(*input_len))] for _ in range(num_requests)]
    outputs = [rng.randint(*output_len) for _ in range(num_requests)]
    workload = f"{num_requests} reqs"
    rows = [Row("yaie", workload, _Yaie(llm).generate(prompts, outputs))]
    rows.append(Row("transformers", workload, _Transformers(llm).generate(prompts, outputs)))
    return rows


def print_rows(rows: list[Row], title: str) -> None:
    """The table, with the machine's load average: on shared cores, rates move with it."""
    print(title)
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    workloads = list(dict.fromkeys(r.workload for r in rows))
    engines = list(dict.fromkeys(r.engine for r in rows))
    table = {(r.engine, r.workload): r.tokens_per_s for r in rows}
    print(f"{'workload (tok/s)':<20}" + "".join(f"{e:>14}" for e in engines) + "   yaie / peer")
    for w in workloads:
        cells = "".join(f"{table[(e, w)]:>14.1f}" if (e, w) in table else f"{'-':>14}" for e in engines)
        ours = table.get(("yaie", w))
        ratios = ", ".join(
            f"{ours / table[(e, w)]:.2f}x {e}" for e in engines if e != "yaie" and (e, w) in table and ours
        )
        print(f"{w:<20}{cells}   {ratios}")
