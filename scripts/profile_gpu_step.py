"""Where does a GPU step's time go? torch.profiler over engine steps on CUDA.

Usage (on a GPU machine): ``python scripts/profile_gpu_step.py [--preset qwen3-0.6b]
[--requests 16] [--prompt-len 512] [--decode-steps N] [--max-model-len L]``. Builds the preset
with random weights and warms the engine on one round of the same shapes. Then, by default, it
profiles the first step of a second round (all prompts prefilling together, chunked by
``max_num_batched_tokens``) and prints the step's wall time and the top operators by self CUDA
and self CPU time. With ``--decode-steps N`` it lets the second round prefill and decode 30
steps, times 50 decode steps (the CUDA-graph path), then profiles N more and prints, per step,
the wall time, the GPU time of all kernels, and each kernel's share (GPU time between kernels
and host time between steps are what the two totals leave apart).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from yaie.args import EngineArgs
from yaie.bench.gpu import build_engine
from yaie.core.engine import LLMEngine
from yaie.core.sampling import SamplingParams
from yaie.model.presets import preset_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--decode-steps", type=int, default=0,
                        help="profile this many decode steps instead of a prefill step")
    parser.add_argument("--vary", action="store_true", help="prompt lengths uniform in [len/2, len]")
    parser.add_argument("--no-cudnn", action="store_true", help="keep SDPA off its cuDNN backend")
    opts = parser.parse_args()
    if opts.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    config = preset_config(opts.preset)
    args = EngineArgs(device="cuda", max_num_batched_tokens=opts.max_num_batched_tokens,
                      max_num_seqs=max(opts.requests, 1), max_model_len=opts.max_model_len,
                      enable_prefix_caching=False)
    engine = build_engine(config, args)
    rng = random.Random(0)
    new_tokens = 2 if not opts.decode_steps else 80 + opts.decode_steps + 5
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def add_round(tag: str) -> None:
        for i in range(opts.requests):
            n = rng.randint(opts.prompt_len // 2, opts.prompt_len) if opts.vary else opts.prompt_len
            prompt = [rng.randrange(config.vocab_size) for _ in range(n)]
            engine.add_request(f"{tag}-{i}", prompt, params)

    add_round("warm")
    while engine.has_unfinished:
        engine.step()
    add_round("prof")
    if opts.decode_steps:
        _profile_decode(engine, opts.decode_steps)
    else:
        _profile_prefill(engine)


def _profile_prefill(engine: LLMEngine) -> None:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    batch = engine.steps[-1]
    print(f"step: {batch.num_prefill_tokens} prefill + {batch.num_decode_tokens} decode tokens, "
          f"{batch.num_requests} requests, {1000 * wall:.1f} ms wall")
    table = prof.key_averages()
    print(table.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def _profile_decode(engine: LLMEngine, steps: int) -> None:
    for _ in range(30):  # the prefill, then decodes
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        engine.step()
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) / 50 * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) / steps
    short, long = _idle_gaps(prof)
    print(f"decode step of {engine.steps[-1].num_requests} requests: {wall_us:.0f} us wall, "
          f"{total:.0f} us of GPU kernels; GPU idle {short / steps:.0f} us/step in gaps under "
          f"{_HOST_GAP_US} us (between kernels), {long / steps:.0f} us/step in longer ones "
          "(waiting for the host)")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]:
        per_step = e.self_device_time_total / steps
        print(f"{per_step:9.1f} us/step {e.count // steps:4d}x "
              f"{e.self_device_time_total / max(e.count, 1):8.2f} us each  {e.key[:80]}")


_HOST_GAP_US = 20


def _idle_gaps(prof: profile) -> tuple[float, float]:
    """Microseconds the GPU ran nothing, in gaps under ``_HOST_GAP_US`` and in longer ones."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type.name == "CUDA")
    short = long = 0.0
    busy_until = spans[0][1] if spans else 0.0
    for start, end in spans[1:]:
        gap = start - busy_until
        if gap > 0:
            if gap < _HOST_GAP_US:
                short += gap
            else:
                long += gap
        busy_until = max(busy_until, end)
    return short, long


if __name__ == "__main__":
    main()
