"""Decode latency of the CUDA-graph path: ``yaie bench latency --preset`` without its slow rows.

Usage (on a GPU machine): ``python scripts/decode_latency.py [PRESET ...]`` (default:
``qwen3-0.6b llama-3.1-8b``). For each preset it runs the latency workload of
``yaie.bench.gpu.latency`` (batch 1 and 64, 128-token prompts, 256 new tokens, greedy) through
YAIE with CUDA graphs and prints the same table, leaving out the ``--enforce-eager`` engine and
transformers, which take most of the full command's minutes. For comparing two versions of the
code on one machine; the full command stays the one that publishes figures' context.
"""

from __future__ import annotations

import sys

from yaie.args import EngineArgs
from yaie.bench import gpu


def main(presets: list[str]) -> None:
    base = EngineArgs(device="cuda")
    for preset in presets:
        results, ceilings = gpu.latency(preset, base, peers=False, eager=False)
        gpu.print_latency(preset, base, results, ceilings, prompt_len=128, new_tokens=256)


if __name__ == "__main__":
    main(sys.argv[1:] or ["qwen3-0.6b", "llama-3.1-8b"])
