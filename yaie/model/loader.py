"""Reading a resolved model's config and weights, whatever format it came in.

``iter_weights`` is the one contract the model code sees: a stream of ``(name, tensor)`` pairs
with Hugging Face parameter names (``model.layers.3.self_attn.q_proj.weight``), already in the
requested dtype, one tensor at a time so peak memory stays near one tensor above the model
itself. Safetensors checkpoints already use those names; GGUF files use llama.cpp's names,
shapes and row order, which ``_iter_gguf`` translates back. A tied ``lm_head`` is not yielded
when the file has none: the model ties it to ``model.embed_tokens.weight`` itself.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from yaie.hub import ResolvedModel

if TYPE_CHECKING:  # gguf is imported where a GGUF file is read: safetensors-only setups skip it
    from gguf import GGMLQuantizationType, GGUFReader

logger = logging.getLogger(__name__)

# llama.cpp's per-layer tensor names -> the Hugging Face module names of Llama-family models
# (Llama, Mistral, Qwen2/3, SmolLM). ".weight"/".bias" suffixes carry over unchanged.
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors with no Hugging Face parameter: Llama 3's rope frequency factors are recomputed from
# config.rope_scaling, which transformers fills from the same GGUF metadata.
_GGUF_SKIPPED = {"rope_freqs.weight"}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GGUF_GLOBAL = re.compile(r"^(\w+)\.(weight|bias)$")

# Architectures whose q/k rows llama.cpp's converter permutes (see _unpermute_rows).
_PERMUTED_ARCHITECTURES = {"llama"}


def load_config(resolved: ResolvedModel) -> PretrainedConfig:
    """The model's transformers config; for GGUF, built by transformers from the file's metadata.

    GGUF metadata has no ``architectures`` entry, so it is filled in from the model type
    (``llama`` -> ``LlamaForCausalLM``): the model registry picks a class by that name.
    """
    if resolved.kind == "gguf":
        config = AutoConfig.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
    else:
        config = AutoConfig.from_pretrained(resolved.path)
    if not getattr(config, "architectures", None):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if architecture is not None:
            config.architectures = [architecture]
    return config


def load_generation_config(resolved: ResolvedModel) -> GenerationConfig | None:
    """The checkpoint's ``generation_config.json`` (extra stop ids, default sampling), if any.

    Instruct models often list their chat end token only there (Llama 3: ``<|eot_id|>``), so
    ``eos_token_ids`` needs it. GGUF files carry no generation config.
    """
    if resolved.kind != "hf_dir" or not (resolved.path / "generation_config.json").exists():
        return None
    return GenerationConfig.from_pretrained(resolved.path)


def iter_weights(
    resolved: ResolvedModel, dtype: torch.dtype, *, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(hf_name, tensor)`` pairs, floating tensors cast to ``dtype``, on the CPU.

    ``progress`` shows a byte-count bar on stderr; it stays off when stderr is not a terminal,
    so logs and test output are not littered with carriage returns.
    """
    start = time.perf_counter()
    if resolved.kind == "gguf":
        weights = _iter_gguf(resolved.gguf_path, dtype, progress)
    else:
        weights = _iter_checkpoint(resolved.path, dtype, progress)
    count = 0
    for name, tensor in weights:
        count += 1
        yield name, tensor
    logger.info(
        "Loaded %d tensors of %s in %.1f s", count, resolved.name, time.perf_counter() - start
    )


def _progress_bar(total_bytes: int, enabled: bool) -> tqdm:
    return tqdm(
        total=total_bytes,
        desc="Loading weights",
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
    )


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _iter_checkpoint(
    folder: Path, dtype: torch.dtype, progress: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Safetensors (or, when resolution allowed it, pickle) shards in transformers' layout."""
    files = _weight_files(folder)
    with _progress_bar(sum(f.stat().st_size for f in files), progress) as bar:
        for file in files:
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt") as shard:
                    for name in shard.keys():  # noqa: SIM118 - safe_open is not iterable
                        tensor = shard.get_tensor(name)
                        bar.update(tensor.nbytes)
                        yield name, _cast(tensor, dtype)
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for name, tensor in state.items():
                    bar.update(tensor.nbytes)
                    yield name, _cast(tensor, dtype)


def _weight_files(folder: Path) -> list[Path]:
    """The shard files in load order: the index's files when sharded, else the single file."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            return [folder / f for f in sorted(set(weight_map.values()))]
        if (folder / single).exists():
            return [folder / single]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no weights (no *.safetensors, no pytorch_model.bin)")
    return files


def _iter_gguf(
    path: Path, dtype: torch.dtype, progress: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize a GGUF file tensor by tensor, in Hugging Face names, shapes and row order."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = _gguf_string(reader, "general.architecture")
    num_heads = int(_gguf_scalar(reader, f"{arch}.attention.head_count"))
    num_kv_heads = int(_gguf_scalar(reader, f"{arch}.attention.head_count_kv", num_heads))
    permuted = arch in _PERMUTED_ARCHITECTURES
    with _progress_bar(sum(int(t.n_bytes) for t in reader.tensors), progress) as bar:
        for t in reader.tensors:
            bar.update(int(t.n_bytes))
            if t.name in _GGUF_SKIPPED:
                continue
            name = _hf_name(t.name, arch)
            data = t.data
            if permuted and ".self_attn.q_proj." in name:
                data = _unpermute_rows(data, num_heads)
            elif permuted and ".self_attn.k_proj." in name:
                data = _unpermute_rows(data, num_kv_heads)
            yield name, _dequantize(data, t.tensor_type, dtype)


def _hf_name(gguf_name: str, arch: str) -> str:
    if match := _GGUF_LAYER.match(gguf_name):
        layer, part, kind = match.groups()
        if part in _GGUF_LAYER_NAMES:
            return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
    elif (match := _GGUF_GLOBAL.match(gguf_name)) and match[1] in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[match[1]]}.{match[2]}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} (architecture {arch!r}) has no counterpart in YAIE's "
        "Llama-family models; this GGUF architecture is not supported"
    )


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of ``dtype``, in PyTorch's (rows, cols) order.

    GGUF lists dimensions fastest-first (``[cols, rows]``); gguf's reader already exposes the
    data row-major as ``(rows, cols)`` -- or ``(rows, bytes per row)`` for block-quantized types,
    which ``gguf.quants.dequantize`` expands. Float types skip the float32 detour: bf16 is
    reinterpreted bit for bit, f16/f32 are cast once. The copy out of the memory map is
    deliberate: tensors must outlive the reader and be writable.
    """
    from gguf import GGMLQuantizationType, quants

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return torch.from_numpy(np.array(data)).to(dtype)
    if qtype == GGMLQuantizationType.BF16:
        raw = np.array(data).view(np.int16)
        return torch.from_numpy(raw).view(torch.bfloat16).to(dtype)
    return torch.from_numpy(quants.dequantize(data, qtype)).to(dtype)


def _unpermute_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo the row permutation llama.cpp's converter applies to q/k projections.

    Hugging Face Llama rotates dimension ``i`` of each head with ``i + head_dim/2``
    (``rotate_half``); ggml's rope rotates adjacent pairs ``(2i, 2i+1)``. So the converter
    interleaves each head's two halves; this de-interleaves them: within a head, rows
    ``[a0, b0, a1, b1, ...]`` become ``[a0, a1, ..., b0, b1, ...]``. It runs on the raw rows,
    before dequantizing: GGML blocks never straddle rows, so moving whole rows of quantized
    bytes is exact, and moves a fraction of the bytes.
    """
    head_dim = rows.shape[0] // num_heads
    pairs = rows.reshape(num_heads, head_dim // 2, 2, *rows.shape[1:])
    return pairs.swapaxes(1, 2).reshape(rows.shape)


def _gguf_scalar(reader: GGUFReader, key: str, default: float | None = None) -> float:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF file has no {key!r} metadata")
        return default
    return field.parts[field.data[0]][0].item()


def _gguf_string(reader: GGUFReader, key: str) -> str:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"GGUF file has no {key!r} metadata")
    return bytes(field.parts[field.data[0]]).decode()
