"""Engine arguments shared by the offline API and every command (generate, serve, chat, bench)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from yaie.core.engine import EngineConfig
from yaie.core.scheduler import SchedulerConfig


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

    def context_limit(self, model_limit: int) -> int:
        """The longest context (prompt + output) a request may have: ``max_model_len``, never
        past what the model was trained for (``model_limit``)."""
        return min(self.max_model_len or model_limit, model_limit)

    def engine_config(
        self, model_limit: int, num_blocks: int, eos_token_ids: frozenset[int] = frozenset()
    ) -> EngineConfig:
        """The engine and scheduler settings these arguments give, for a model whose context is
        at most ``model_limit`` tokens and a KV pool of ``num_blocks`` blocks."""
        return EngineConfig(
            num_blocks=num_blocks,
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_model_len=self.context_limit(model_limit),
                enable_chunked_prefill=self.enable_chunked_prefill,
            ),
            eos_token_ids=eos_token_ids,
            max_waiting=self.max_waiting,
        )


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
