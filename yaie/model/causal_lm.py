"""What every YAIE model gives the executor, written once for all families.

A family (``llama.py``, ``gpt2.py``) builds its layers and answers three questions: which
attention layers hold the KV cache, which embedding a tied LM head shares, and where each of
its checkpoint's tensors goes. Loading, tying, allocating the paged cache and computing logits
are the same for every family, so they live here.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Iterable

import torch
from torch import nn

from yaie.kernels.cpu import keep_freed_memory
from yaie.model.attention import Attention
from yaie.model.config import ModelConfig
from yaie.model.layers import PackedWeight, ParallelLMHead, VocabParallelEmbedding

ParamSlice = tuple[str, int | str | None, torch.Tensor]
"""``(our parameter name, shard id, tensor)``: one piece of a checkpoint tensor, ready to load."""


class CausalLM(nn.Module, metaclass=ABCMeta):
    """A decoder-only LM on a paged KV cache, loaded from Hugging Face weights.

    Life cycle: construct (parameters uninitialised; the ``meta`` device works), ``to_empty`` /
    ``.to(dtype/device)``, ``load_weights`` (which ends with ``prepare_for_inference``),
    ``allocate_kv_cache``, then ``forward(input_ids, positions, meta)`` each step and
    ``compute_logits`` on the rows to sample.

    A subclass sets ``lm_head`` and implements ``forward``, ``attention_layers``,
    ``input_embedding`` and ``checkpoint_params``.
    """

    lm_head: ParallelLMHead

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.kv_cache: torch.Tensor | None = None

    @abstractmethod
    def attention_layers(self) -> list[Attention]:
        """Every layer's ``Attention``, in layer order: the KV cache has one slice per entry."""

    @abstractmethod
    def input_embedding(self) -> VocabParallelEmbedding:
        """The token embedding a tied LM head shares its weight with."""

    @abstractmethod
    def checkpoint_params(self, name: str, tensor: torch.Tensor) -> list[ParamSlice]:
        """Where checkpoint tensor ``name`` goes: one or more slices, or none to skip it."""

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> fp32 ``[N, vocab]``; pass only the rows that sample."""
        return self.lm_head(hidden).float()

    @property
    def screens_greedy(self) -> bool:
        """Whether ``greedy_tokens`` can skip the fp32 logits here (a CPU LM head with a bf16
        screen); callers check this before the per-row sampling settings, on every step."""
        return self.lm_head.screen is not None

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``argmax(compute_logits(hidden), dim=-1)``, cheaper where the LM head can screen
        (``ParallelLMHead.greedy``); ``None`` where it cannot."""
        return self.lm_head.greedy(hidden)

    def allocate_kv_cache(
        self,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Allocate one zeroed ``[layers, 2, num_blocks, block_size, Hkv, D]`` tensor and bind
        each layer's K and V views of it; returns it (one allocation: easy to size and free).

        Defaults to the model's own dtype and device. Zeros because padded attention reads
        stale slots under a mask, which must hold finite values.
        """
        layers = self.attention_layers()
        weight = self.lm_head.weight
        self.kv_cache = torch.zeros(
            len(layers), 2, num_blocks, block_size, layers[0].num_kv_heads, layers[0].head_dim,
            dtype=dtype or weight.dtype, device=device or weight.device,
        )
        for attn, kv in zip(layers, self.kv_cache):
            attn.k_cache, attn.v_cache = kv[0], kv[1]
        return self.kv_cache

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors where ``checkpoint_params`` sends them; then prepare
        for inference.

        A tied ``lm_head`` in the checkpoint is skipped (it is the embedding). Unknown or
        missing parameters raise ``ValueError``: a silently ignored tensor would be a model that
        runs and talks nonsense.
        """
        tied = self.config.tie_word_embeddings
        if tied:
            # Again: materialising from the meta device (``to_empty``) unties parameters.
            self.lm_head.tie(self.input_embedding())
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name == "lm_head.weight" and tied:
                    continue
                for target, shard_id, part in self.checkpoint_params(name, tensor):
                    if target not in params:
                        raise ValueError(
                            f"unexpected weight {name!r} for {self.config.architecture}"
                        )
                    self._load_param(name, params[target], target, part, shard_id)
                    loaded.add(target)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        self.prepare_for_inference()

    def _load_param(self, name: str, param: nn.Parameter, target: str, tensor: torch.Tensor,
                    shard_id: int | str | None) -> None:
        """Through the owning layer's ``weight_loader`` (which cuts this rank's shard), else a
        plain copy of a tensor that must already have the parameter's shape."""
        module = self.get_submodule(target.rpartition(".")[0])
        loader = getattr(module, "weight_loader", None)
        if loader is not None:
            loader(param, tensor, shard_id)
        elif param.shape != tensor.shape:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(param.shape)}")
        else:
            param.copy_(tensor)

    def prepare_for_inference(self) -> None:
        """Build what derives from the weights' device and dtype: on CPU, each projection's
        oneDNN-layout weight (families add their own tables, e.g. Llama's rotary one).

        On CPU this also sets glibc to keep freed memory for reuse (``yaie.kernels.cpu``), a
        process-wide setting without which every layer of a step page-faults its buffers in.
        ``load_weights`` calls this; call it again after changing weights in place or moving
        the model to another device or dtype.
        """
        if self.lm_head.weight.device.type == "cpu":
            keep_freed_memory()
        for module in self.modules():
            if isinstance(module, PackedWeight):
                module.pack()
