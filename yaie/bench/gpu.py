"""``yaie bench latency|throughput --preset NAME``: YAIE on the GPU beside transformers and the
roofline, all from one process.

The models are built-in shapes with random weights (``yaie.model.presets``), so nothing is
downloaded and every engine runs the very same weights. Each run prints, for its workload:

- YAIE as it serves (decode steps replay CUDA graphs), and YAIE with ``--enforce-eager``;
- transformers' continuous batching (``generate_batch``) on the same weights and prompts;
- the roofline floor: the least time the workload can take on this GPU, from the model's
  shapes and two ceilings measured here first (a large device-to-device copy for bandwidth, a
  large bf16 matrix product for arithmetic). A step needs at least ``bytes / bandwidth`` and
  ``FLOPs / matrix rate``; the floor is the larger, summed over the steps.

Workloads (the issue's, and nano-vllm's/vLLM's for throughput): ``throughput`` runs 256 requests
whose prompt and output lengths are uniform in [100, 1024] (random token ids, seed 0, EOS
ignored, greedy), all submitted at once; ``latency`` runs batch 1 and batch ``--batch`` of
128-token prompts generating 256 tokens each and reports time to first token and decode
milliseconds per step (per request: time after the first token over the tokens after it).
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from transformers import PretrainedConfig

from yaie.args import EngineArgs
from yaie.core.engine import LLMEngine
from yaie.core.metrics import RequestMetrics
from yaie.core.request import FinishReason
from yaie.core.sampling import SamplingParams
from yaie.executor.model_executor import ModelExecutor, pick_device, pick_dtype
from yaie.model.config import ModelConfig
from yaie.model.presets import preset_config, random_weights

logger = logging.getLogger(__name__)

LENGTHS = (100, 1024)
"""Prompt and output lengths of the throughput workload: uniform in this range."""

MAX_BATCHED_TOKENS = 16_384
"""Token budget of one step in both workloads (nano-vllm's default): a batch-64 latency run
prefills all its prompts in one step."""


# --- ceilings and the roofline ------------------------------------------------------------------


@dataclass(slots=True)
class Ceilings:
    """What this device sustains, measured: bytes/s of a copy (read + written) and FLOP/s of a
    large matrix product in the model's dtype."""

    bandwidth: float
    matmul: float


def _time_per_call(fn: Callable[[], object], device: torch.device, repeat: int,
                   rounds: int = 5) -> float:
    """Seconds per call of ``fn``: the fastest of ``rounds`` timings of ``repeat`` calls each,
    after as many warm-up calls.

    For a ceiling, the fastest round is the figure: anything else on the device only slows a
    round down."""
    for _ in range(repeat):
        fn()
    return min(_round_seconds(fn, device, repeat) for _ in range(rounds)) / repeat


def _round_seconds(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Seconds for ``repeat`` calls of ``fn``: device events on CUDA, the wall clock elsewhere."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000


@functools.cache
def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """A 1 GiB device-to-device copy and an 8192^3 matrix product (smaller on a CPU), on random
    data (zeros can run faster than real data).

    Measured once per process, before the first engine, and reused: on an H100, the same copy
    measured after a Qwen3-0.6B engine had been built and freed read 2,566 GB/s, against
    3,005 GB/s in a fresh process, while the 8B model's own GEMMs then read 2.8 TB/s; the
    floor would have been 17% too lenient."""
    big = device.type == "cuda"
    bandwidth = _copy_bandwidth(device, 2**28 if big else 2**22)  # 1 GiB of fp32 on a GPU
    n = 8192 if big else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul_s = _time_per_call(lambda: a @ b, device, 10)
    return Ceilings(bandwidth, 2 * n**3 / matmul_s)


def _copy_bandwidth(device: torch.device, numel: int) -> float:
    """Bytes read + written per second by a copy of ``numel`` fp32 values."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _time_per_call(lambda: dst.copy_(src), device, 20)


@dataclass(slots=True)
class Roofline:
    """The least time steps of a model can take under ``Ceilings``.

    ``layer_params``: the decoder layers' projection weights; ``head_params``: the LM head;
    ``kv_bytes``: K and V of one token, all layers; ``pair_flops``: attention FLOPs of one
    (query, key) pair, all layers (q.k and p.v, two FLOPs per multiply-add).
    """

    ceilings: Ceilings
    itemsize: int
    layer_params: int
    head_params: int
    kv_bytes: int
    pair_flops: int

    @classmethod
    def of(cls, cfg: ModelConfig, itemsize: int, ceilings: Ceilings) -> Roofline:
        h, d = cfg.hidden_size, cfg.head_dim
        per_layer = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h
        per_layer += 3 * h * cfg.intermediate_size
        return cls(
            ceilings, itemsize, cfg.num_layers * per_layer, cfg.vocab_size * h,
            2 * cfg.num_layers * cfg.num_kv_heads * d * itemsize, 4 * cfg.num_layers * cfg.num_heads * d,
        )

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights a step reads (embedding rows are a gather: not counted)."""
        return (self.layer_params + self.head_params) * self.itemsize

    def _time(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self.ceilings.bandwidth, flops / self.ceilings.matmul)

    def prefill(self, prompt_lens: np.ndarray) -> float:
        """One step computing every prompt (causal attention) and one token's logits each."""
        n = prompt_lens.astype(np.float64)
        flops = 2 * self.layer_params * n.sum() + 2 * self.head_params * len(n)
        flops += self.pair_flops * (n * (n + 1) / 2).sum()
        return self._time(self.weight_bytes + self.kv_bytes * n.sum(), flops)

    def decode(self, context_lens: np.ndarray) -> float:
        """One step of one new token per request, each over its whole context."""
        ctx = context_lens.astype(np.float64)
        flops = 2 * (self.layer_params + self.head_params) * len(ctx) + self.pair_flops * ctx.sum()
        return self._time(self.weight_bytes + self.kv_bytes * ctx.sum(), flops)

    def generation(self, prompt_lens: np.ndarray, output_lens: np.ndarray) -> tuple[float, float]:
        """``(prefill, decode)`` floors of requests all running at once: one prefill, then a
        step per token after the first while any request still wants one (the fewest weight
        reads; the KV bytes are the same in any schedule)."""
        decode = sum(
            self.decode(prompt_lens[output_lens > s] + s)
            for s in range(1, int(output_lens.max()))
        )
        return self.prefill(prompt_lens), decode


# --- engines ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    """One engine's run of a workload (``None``: not measured); ``note`` says why, or how."""

    engine: str
    batch: int
    ttft_ms: float | None = None
    decode_ms: float | None = None
    output_tok_s: float | None = None
    total_tok_s: float | None = None
    seconds: float | None = None
    note: str = ""


def _release() -> None:
    """Free the last engine's memory before the next one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_engine(config: PretrainedConfig, args: EngineArgs) -> LLMEngine:
    """A YAIE engine on ``config``'s model with random weights; no tokenizer (ids in and out)."""
    device = pick_device(args.device)
    weights = random_weights(config, device, pick_dtype(args.dtype, device), args.seed)
    executor = ModelExecutor.from_weights(config, weights, args)
    engine_config = args.engine_config(
        executor.model_config.max_position_embeddings, executor.plan.num_blocks
    )
    return LLMEngine(engine_config, executor, time.monotonic)


def run_requests(
    engine: LLMEngine, prompts: list[list[int]], output_lens: list[int]
) -> tuple[float, list[RequestMetrics]]:
    """Submit every request at once and step until all finish: ``(seconds, metrics)``."""
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, output_lens)):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        engine.add_request(f"bench-{engine.num_steps}-{i}", prompt, params)
    metrics = []
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                if out.finish_reason is FinishReason.ERROR:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                metrics.append(out.metrics)
    return time.perf_counter() - start, metrics


def _latency_figures(metrics: list[RequestMetrics]) -> tuple[float, float]:
    """Median TTFT and median decode time per token after the first, both in ms."""
    ttft = statistics.median(m.ttft for m in metrics)
    decode = statistics.median((m.e2e - m.ttft) / (m.num_output_tokens - 1) for m in metrics)
    return 1000 * ttft, 1000 * decode


class TransformersPeer:
    """transformers' continuous batching (``generate_batch``) on the preset's weights.

    ``paged|sdpa`` is the paged attention that ran on the H100 with transformers 5.17; the other
    names are tried in turn. One generation config serves all requests, so outputs have one
    length: the bench passes the workload's mean output length.
    """

    name = "transformers generate_batch"
    ATTENTION = ("paged|sdpa", "sdpa_paged", "paged_attention")

    def __init__(self, config: PretrainedConfig, device: torch.device, dtype: torch.dtype,
                 seed: int) -> None:
        from transformers import AutoModelForCausalLM

        errors = []
        for attention in self.ATTENTION:
            try:
                with torch.device(device):
                    model = AutoModelForCausalLM.from_config(
                        config, attn_implementation=attention, dtype=dtype
                    )
                break
            except (ValueError, ImportError, KeyError) as exc:
                errors.append(f"{attention}: {exc}")
        else:
            raise RuntimeError("no paged attention in this transformers: " + "; ".join(errors))
        state = model.state_dict()
        with torch.no_grad():
            for name, tensor in random_weights(config, device, dtype, seed):
                state[name].copy_(tensor)
        model.tie_weights()
        self.model = model.eval()
        self.attention = attention

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
        """``(seconds, outputs)`` of one ``generate_batch`` call, per-token timestamps recorded
        where this transformers can."""
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        start = time.perf_counter()
        try:
            outputs = self.model.generate_batch(
                inputs=prompts, generation_config=config, record_timestamps=True
            )
        except TypeError:  # a release without record_timestamps
            outputs = self.model.generate_batch(inputs=prompts, generation_config=config)
        return time.perf_counter() - start, list(outputs.values())


def _peer(config: PretrainedConfig, args: EngineArgs) -> TransformersPeer:
    device = pick_device(args.device)
    return TransformersPeer(config, device, pick_dtype(args.dtype, device), args.seed)


def _failed(engine: str, batch: int, exc: Exception) -> Result:
    logger.exception("%s failed", engine)
    return Result(engine, batch, note=f"failed: {type(exc).__name__}: {str(exc)[:120]}")


# --- workloads ----------------------------------------------------------------------------------


def _random_prompts(rng: random.Random, lengths: list[int], vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def _setup(preset: str, base: EngineArgs) -> tuple[PretrainedConfig, Roofline]:
    """The preset's config and its roofline under ceilings measured now, before any engine
    holds memory."""
    config = preset_config(preset)
    device = pick_device(base.device)
    dtype = pick_dtype(base.dtype, device)
    ceilings = measure_ceilings(device, dtype)
    return config, Roofline.of(ModelConfig.from_hf(config), dtype.itemsize, ceilings)


def _each_yaie(
    config: PretrainedConfig, args: EngineArgs, eager_too: bool, warm: list[list[int]],
    measure: Callable[[str, LLMEngine], list[Result]],
) -> list[Result]:
    """YAIE with CUDA graphs, then with ``--enforce-eager``: each engine is built, warmed on
    ``warm`` (8 tokens each: the eager prefill path's first shapes), measured, and freed; one
    that fails becomes a row saying why."""
    results = []
    for eager in (False, True) if eager_too else (False,):
        name = "yaie --enforce-eager" if eager else "yaie"
        try:
            engine = build_engine(config, replace(args, enforce_eager=eager))
            run_requests(engine, warm, [8] * len(warm))
            results += measure(name, engine)
            del engine
        except Exception as exc:  # noqa: BLE001 - one engine's failure is a row, not the end
            results.append(_failed(name, args.max_num_seqs, exc))
        _release()
    return results


def latency(
    preset: str, base: EngineArgs, batch: int = 64, prompt_len: int = 128, new_tokens: int = 256,
    peers: bool = True, eager: bool = True,
) -> tuple[list[Result], Ceilings]:
    """Batch 1 and batch ``batch``: TTFT and decode ms/step of each engine and of the floor
    (``eager=False`` leaves out the ``--enforce-eager`` rows, the slowest part of the run)."""
    config, roofline = _setup(preset, base)
    rng = random.Random(base.seed)
    batches = sorted({1, batch})
    prompts = {b: _random_prompts(rng, [prompt_len] * b, config.vocab_size) for b in batches}
    args = replace(
        base, max_num_seqs=max(batches), max_model_len=prompt_len + new_tokens,
        max_num_batched_tokens=max(MAX_BATCHED_TOKENS, max(batches) * prompt_len),
        enable_prefix_caching=False,
    )

    def measure(name: str, engine: LLMEngine) -> list[Result]:
        rows = []
        for b in batches:
            _, metrics = run_requests(engine, prompts[b], [new_tokens] * b)
            rows.append(Result(name, b, *_latency_figures(metrics)))
        return rows

    results = _each_yaie(config, args, eager, prompts[1], measure)
    if peers:
        results += _transformers_latency(config, args, prompts, new_tokens)
    for b in batches:
        lens = np.full(b, prompt_len)
        steps = [roofline.decode(lens + s) for s in range(1, new_tokens)]
        results.append(Result(
            "roofline floor", b, 1000 * roofline.prefill(lens), 1000 * statistics.fmean(steps),
            note=f"weights {roofline.weight_bytes / 1e9:.2f} GB/step",
        ))
    return results, roofline.ceilings


def _transformers_latency(config, args, prompts, new_tokens) -> list[Result]:
    """From each request's token timestamps where recorded: TTFT from the request's creation,
    decode ms/step over the tokens after the first (medians over the batch). Without them, from
    call times: a one-token call for TTFT, the rest of a full call over its later tokens."""
    name = TransformersPeer.name
    try:
        peer = _peer(config, args)
        peer.generate(prompts[1], 2)  # warm-up
        results = []
        for b, group in prompts.items():
            seconds, outputs = peer.generate(group, new_tokens)
            stamped = [o for o in outputs
                       if getattr(o, "timestamps", None) and hasattr(o, "created_time")]
            if stamped:
                ttft = statistics.median(o.timestamps[0] - o.created_time for o in stamped)
                decode = statistics.median(
                    (o.timestamps[-1] - o.timestamps[0]) / (len(o.timestamps) - 1) for o in stamped
                )
                note = peer.attention
            else:
                ttft, _ = peer.generate(group, 1)
                decode = (seconds - ttft) / (new_tokens - 1)
                note = f"{peer.attention}, from call times"
            results.append(Result(name, b, 1000 * ttft, 1000 * decode, note=note))
        del peer
    except Exception as exc:  # noqa: BLE001
        results = [_failed(name, 0, exc)]
    _release()
    return results


def throughput(
    preset: str, base: EngineArgs, num_requests: int = 256, peer_requests: int = 256,
    peers: bool = True, eager: bool = True,
) -> tuple[list[Result], Ceilings, float]:
    """The throughput workload through each engine; returns the rows, the ceilings and the
    roofline bound in output tokens/s."""
    config, roofline = _setup(preset, base)
    rng = random.Random(base.seed)
    input_lens = [rng.randint(*LENGTHS) for _ in range(num_requests)]
    output_lens = [rng.randint(*LENGTHS) for _ in range(num_requests)]
    prompts = _random_prompts(rng, input_lens, config.vocab_size)
    args = replace(
        base, max_num_seqs=num_requests, max_model_len=2 * LENGTHS[1],
        max_num_batched_tokens=MAX_BATCHED_TOKENS, enable_prefix_caching=False,
    )

    def measure(name: str, engine: LLMEngine) -> list[Result]:
        seconds, metrics = run_requests(engine, prompts, output_lens)
        made = sum(m.num_output_tokens for m in metrics)
        return [Result(name, num_requests, output_tok_s=made / seconds,
                       total_tok_s=(made + sum(input_lens)) / seconds, seconds=seconds)]

    results = _each_yaie(config, args, eager, prompts[:4], measure)
    if peers:
        results.append(_transformers_throughput(config, args, prompts[:peer_requests],
                                                round(statistics.fmean(output_lens))))
    prefill_s, decode_s = roofline.generation(np.array(input_lens), np.array(output_lens))
    floor_s = prefill_s + decode_s
    bound = sum(output_lens) / floor_s
    results.append(Result(
        "roofline floor", num_requests, output_tok_s=bound,
        total_tok_s=(sum(output_lens) + sum(input_lens)) / floor_s, seconds=floor_s,
        note=f"prefill {prefill_s:.2f} s + decode {decode_s:.2f} s",
    ))
    return results, roofline.ceilings, bound


def _transformers_throughput(config, args, prompts, output_len) -> Result:
    name = TransformersPeer.name
    try:
        peer = _peer(config, args)
        peer.generate(prompts[:2], 2)  # warm-up
        seconds, outputs = peer.generate(prompts, output_len)
        made = sum(len(o.generated_tokens) for o in outputs)
        tokens_in = sum(map(len, prompts))
        result = Result(name, len(prompts), output_tok_s=made / seconds,
                        total_tok_s=(made + tokens_in) / seconds, seconds=seconds,
                        note=f"{peer.attention}, every output {output_len} tokens")
        del peer
    except Exception as exc:  # noqa: BLE001
        result = _failed(name, len(prompts), exc)
    _release()
    return result


# --- printing -----------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _device_line(base: EngineArgs, ceilings: Ceilings) -> str:
    device = pick_device(base.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    dtype = pick_dtype(base.dtype, device)
    return (f"{name}, {str(dtype).removeprefix('torch.')}; measured here: copy "
            f"{ceilings.bandwidth / 1e9:,.0f} GB/s (read + write), matmul "
            f"{ceilings.matmul / 1e12:,.1f} TFLOP/s")


def print_latency(preset: str, base: EngineArgs, results: list[Result], ceilings: Ceilings,
                  prompt_len: int, new_tokens: int) -> None:
    print(f"yaie bench latency --preset {preset}: prompt {prompt_len}, {new_tokens} new tokens, "
          f"greedy, random weights")
    print(_device_line(base, ceilings))
    floors = {r.batch: r for r in results if r.engine == "roofline floor"}
    print(f"{'engine':<29}{'batch':>6}{'TTFT ms':>10}{'decode ms/step':>16}{'/ floor':>9}  note")
    for r in results:
        floor = floors.get(r.batch)
        ratio = r.decode_ms / floor.decode_ms if r.decode_ms and floor else None
        print(f"{r.engine:<29}{r.batch:>6}{_cell(r.ttft_ms, '.2f'):>10}"
              f"{_cell(r.decode_ms, '.3f'):>16}{_cell(ratio, '.2f'):>9}  {r.note}")


def print_throughput(preset: str, base: EngineArgs, results: list[Result], ceilings: Ceilings,
                     bound: float) -> None:
    print(f"yaie bench throughput --preset {preset}: lengths uniform in {list(LENGTHS)}, "
          f"greedy, EOS ignored, seed {base.seed}, random weights")
    print(_device_line(base, ceilings))
    print(f"{'engine':<29}{'requests':>9}{'output tok/s':>14}{'total tok/s':>13}{'seconds':>9}"
          f"{'% roofline':>12}  note")
    for r in results:
        share = 100 * r.output_tok_s / bound if r.output_tok_s else None
        print(f"{r.engine:<29}{r.batch:>9}{_cell(r.output_tok_s, ',.0f'):>14}"
              f"{_cell(r.total_tok_s, ',.0f'):>13}{_cell(r.seconds, '.1f'):>9}"
              f"{_cell(share, '.1f'):>12}  {r.note}")


def run(args: argparse.Namespace) -> None:
    """Entry point of ``yaie bench latency|throughput --preset``."""
    base = EngineArgs.from_cli(args)
    if pick_device(base.device).type != "cuda" and not args.preset.startswith("tiny"):
        raise ValueError("the --preset benchmarks need a CUDA GPU (or a tiny-* preset on the CPU)")
    if args.bench == "latency":
        results, ceilings = latency(args.preset, base, args.batch, args.prompt_len,
                                    args.new_tokens, args.peers)
        print_latency(args.preset, base, results, ceilings, args.prompt_len, args.new_tokens)
    else:
        peer_requests = args.peer_requests or args.num_requests
        results, ceilings, bound = throughput(args.preset, base, args.num_requests,
                                              peer_requests, args.peers)
        print_throughput(args.preset, base, results, ceilings, bound)
