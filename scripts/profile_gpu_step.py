"""Where does an eager prefill step's time go? torch.profiler over one engine step on CUDA.

Usage (on a GPU machine): ``python scripts/profile_gpu_step.py [--preset qwen3-0.6b]
[--requests 16] [--prompt-len 512]``. Builds the preset with random weights, warms the engine
on one round of the same shapes, then profiles the first step of a second round (all prompts
prefilling together, chunked by ``max_num_batched_tokens``) and prints the step's wall time and
the top operators by self CUDA and self CPU time.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from yaie.args import EngineArgs
from yaie.bench.gpu import build_engine
from yaie.core.sampling import SamplingParams
from yaie.model.presets import preset_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--vary", action="store_true", help="prompt lengths uniform in [len/2, len]")
    parser.add_argument("--no-cudnn", action="store_true", help="keep SDPA off its cuDNN backend")
    opts = parser.parse_args()
    if opts.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    config = preset_config(opts.preset)
    args = EngineArgs(device="cuda", max_num_batched_tokens=opts.max_num_batched_tokens)
    engine = build_engine(config, args)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def add_round(tag: str) -> None:
        for i in range(opts.requests):
            n = rng.randint(opts.prompt_len // 2, opts.prompt_len) if opts.vary else opts.prompt_len
            prompt = [rng.randrange(config.vocab_size) for _ in range(n)]
            engine.add_request(f"{tag}-{i}", prompt, params)

    add_round("warm")
    while engine.has_unfinished:
        engine.step()
    add_round("prof")
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


if __name__ == "__main__":
    main()
