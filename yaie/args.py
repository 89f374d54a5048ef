"""Engine arguments shared by the offline API and every command (generate, serve, chat, bench)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass(slots=True)
class EngineArgs:
    model: str | None = None  # local dir, .gguf file or Hub repo id; None = the default model
    device: str | None = None  # "cpu" / "cuda"; None = CUDA when available
    dtype: str | None = None  # "float32" / "bfloat16" / "float16"; None = fp32 on CPU, bf16 on CUDA
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's own context
    kv_cache_memory: str = "1GiB"  # CPU budget for the KV cache
    gpu_memory_utilization: float = 0.9  # CUDA: share of the GPU the engine may take
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False  # CUDA: no CUDA graphs
    seed: int = 0  # for requests without their own seed
    allow_pickle: bool = False
    max_waiting: int | None = None
    chat_template: str | None = None  # a Jinja file; None = the tokenizer's own (yaie.tokenizer)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        d = cls()  # slots dataclass: defaults live on an instance, not on the class
        g = parser.add_argument_group("engine")
        g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
        g.add_argument("--block-size", type=int, default=d.block_size)
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
        g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
        g.add_argument("--max-model-len", type=int, default=None)
        g.add_argument("--kv-cache-memory", default=d.kv_cache_memory, help="CPU KV budget, e.g. 512MiB")
        g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
        g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
        g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
        g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
        g.add_argument("--seed", type=int, default=d.seed)
        g.add_argument("--allow-pickle", action="store_true", help="load .bin/.pt checkpoints")
        g.add_argument("--chat-template", metavar="FILE", default=None,
                       help="Jinja chat template for models without one")

    @classmethod
    def from_cli(cls, ns: argparse.Namespace, **overrides) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(ns).items() if k in names}
        values.update(overrides)
        return cls(**values)


def parse_size(text: str) -> int:
    """'512MiB', '2GiB', '1.5GB', '1000000' → bytes."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    s = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            try:
                return int(float(s[: -len(suffix)]) * units[suffix])
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a memory size (try 512MiB or 2GiB)") from None
