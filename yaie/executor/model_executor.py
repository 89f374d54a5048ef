"""The real executor: our torch model on a paged KV cache.

Turns a ``ScheduledBatch`` (plain lists) into tensors, runs one forward pass over the ragged
batch, computes logits only for the tokens that are sampled, and samples on the model's device.
The only host sync per step is reading back the sampled token ids.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from yaie.args import EngineArgs, parse_size
from yaie.core.batch import ScheduledBatch, StepResult
from yaie.executor.cuda_graph import DecodeGraphs
from yaie.executor.gpu_memory import kv_cache_budget
from yaie.executor.sampler import Sampler, argmax_suffices
from yaie.hub import ResolvedModel
from yaie.model import get_model_class
from yaie.model.attention import AttentionMetadata
from yaie.model.config import ModelConfig
from yaie.model.loader import iter_weights, load_config

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class CachePlan:
    """How the KV cache was sized, for logs and for the engine config."""

    num_blocks: int
    block_size: int
    bytes_per_block: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def pick_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but this machine has no usable CUDA GPU")
    return device


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    if requested is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[requested]


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V, every layer, one block: the unit the pool is counted in."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize


class ModelExecutor:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        plan: CachePlan,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        hf_config: PretrainedConfig | None = None,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.plan = plan
        self.device = device
        self.dtype = dtype
        self.sampler = Sampler(seed)
        self.hf_config = hf_config  # the transformers config, when loaded from a checkpoint
        model.allocate_kv_cache(plan.num_blocks, plan.block_size, dtype, device)
        self.graphs: DecodeGraphs | None = None  # CUDA only, captured by from_weights

    @classmethod
    def load(cls, resolved: ResolvedModel, args: EngineArgs) -> ModelExecutor:
        """Load weights and size the KV cache from memory."""
        dtype = pick_dtype(args.dtype, pick_device(args.device))
        return cls.from_weights(load_config(resolved), iter_weights(resolved, dtype), args)

    @classmethod
    def from_weights(
        cls, hf_config: PretrainedConfig, weights: Iterable[tuple[str, torch.Tensor]],
        args: EngineArgs,
    ) -> ModelExecutor:
        """Build the model of ``hf_config`` from Hugging Face-named ``weights`` (a checkpoint's,
        or ``yaie.model.presets.random_weights``), size the KV cache, capture decode graphs."""
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        model_config = ModelConfig.from_hf(hf_config)
        model_cls = get_model_class(model_config.architecture)
        with torch.device("meta"):
            model = model_cls(model_config)
        model = model.to_empty(device=device).to(dtype)
        model.load_weights(weights)
        model.eval()
        graphs = device.type == "cuda" and not args.enforce_eager
        plan = cls._plan_cache(model, model_config, args, device, dtype, graphs)
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB)",
            plan.num_blocks,
            plan.block_size,
            plan.num_tokens,
            plan.num_blocks * plan.bytes_per_block / 2**20,
        )
        executor = cls(model, model_config, plan, device, dtype, args.seed, hf_config)
        if graphs:
            executor.graphs = DecodeGraphs(
                model, args.max_num_seqs, args.context_limit(model_config.max_position_embeddings),
                args.block_size,
            )
        return executor

    @staticmethod
    def _plan_cache(
        model: torch.nn.Module, cfg: ModelConfig, args: EngineArgs, device: torch.device,
        dtype: torch.dtype, graphs: bool,
    ) -> CachePlan:
        per_block = kv_bytes_per_block(cfg, args.block_size, dtype)
        if device.type == "cuda":
            budget = kv_cache_budget(model, args, device, graphs)
        else:
            budget = parse_size(args.kv_cache_memory)
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise ValueError(
                f"no memory left for the KV cache (one block needs {per_block / 2**20:.2f} MiB); "
                "raise --kv-cache-memory or --gpu-memory-utilization"
            )
        return CachePlan(num_blocks, args.block_size, per_block)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        if self.graphs is not None and self.graphs.fits(batch):
            hidden = self.graphs.run(batch)  # a decode step: every row samples
        else:
            hidden = self._forward_eager(batch)
            if hidden is None:
                return StepResult([])
        if self.model.screens_greedy and argmax_suffices(batch.sampling_requests):
            tokens = self.model.greedy_tokens(hidden)
            if tokens is not None:
                return StepResult(tokens.tolist())
        logits = self.model.compute_logits(hidden)
        out = self.sampler.sample(logits, batch.sampling_requests)
        return StepResult(out.token_ids.tolist(), out.logprobs)

    def _forward_eager(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Hidden states of the rows that sample (``None`` when none does)."""
        device = self.device
        input_ids = torch.tensor(batch.token_ids, dtype=torch.long, device=device)
        positions = torch.tensor(batch.positions, dtype=torch.long, device=device)
        meta = AttentionMetadata.build(
            batch.query_start_loc,
            batch.seq_lens,
            batch.block_tables,
            batch.slot_mapping,
            batch.block_size,
            device,
        )
        hidden = self.model(input_ids, positions, meta)
        if not batch.sample_indices:
            return None
        index = torch.tensor(batch.sample_indices, dtype=torch.long, device=device)
        return hidden.index_select(0, index)
