"""Decode latency of the CUDA-graph path: ``yaie bench latency --preset`` without its slow rows.

Usage (on a GPU machine): ``python scripts/decode_latency.py [--rope-ab] [PRESET ...]``
(default: ``qwen3-0.6b llama-3.1-8b``). For each preset it runs the latency workload of
``yaie.bench.gpu.latency`` (batch 1 and 64, 128-token prompts, 256 new tokens, greedy) through
YAIE with CUDA graphs and prints the same table, leaving out the ``--enforce-eager`` engine and
transformers, which take most of the full command's minutes. For comparing two versions of the
code on one machine; the full command stays the one that publishes figures' context.
``--rope-ab`` runs each preset four times instead, with rotary and the K/V store outside and
inside the decode kernel in turn (``yaie.kernels.attention.DECODE_ROPE_IN_KERNEL``), and prints
one line per run.
"""

from __future__ import annotations

import importlib
import sys

from yaie.args import EngineArgs
from yaie.bench import gpu

attention = importlib.import_module("yaie.kernels.attention")


def main(presets: list[str], rope_ab: bool) -> None:
    base = EngineArgs(device="cuda")
    for preset in presets:
        for in_kernel in (False, True, False, True) if rope_ab else (True,):
            attention.DECODE_ROPE_IN_KERNEL = in_kernel
            results, ceilings = gpu.latency(preset, base, peers=False, eager=False)
            if not rope_ab:
                gpu.print_latency(preset, base, results, ceilings, prompt_len=128,
                                  new_tokens=256)
                continue
            yaie = "  ".join(f"batch {r.batch}: {r.decode_ms:.3f}" for r in results
                             if r.engine == "yaie")
            print(f"{preset}, rotary in the decode kernel: {in_kernel!s:5}  decode ms/step "
                  f"{yaie}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    rope_ab = "--rope-ab" in args
    presets = [a for a in args if a != "--rope-ab"]
    main(presets or ["qwen3-0.6b", "llama-3.1-8b"], rope_ab)
