"""GGUF weights: names, shapes, q/k row order and every supported tensor type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PretrainedConfig
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from yaie.hub import ResolvedModel, resolve_model
from yaie.model.loader import iter_weights

Q = GGMLQuantizationType


@pytest.mark.slow
def test_default_gguf_config(smollm2_config: PretrainedConfig) -> None:
    c = smollm2_config
    assert c.architectures == ["LlamaForCausalLM"]
    assert c.model_type == "llama"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (49152, 576, 1536)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    assert c.tie_word_embeddings is True
    assert c.max_position_embeddings == 8192
    assert c.rms_norm_eps == pytest.approx(1e-5)


@pytest.mark.slow
def test_default_gguf_matches_transformers(
    smollm2: ResolvedModel, smollm2_config: PretrainedConfig
) -> None:
    """Our dequantizer and name mapping agree with transformers' own GGUF loader, bit for bit.

    ``AutoModelForCausalLM.from_pretrained(gguf_file=...)`` needs ``accelerate``; it calls
    ``load_gguf_checkpoint`` to dequantize, so the test calls that directly.
    """
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(smollm2_config)
    reference = load_gguf_checkpoint(
        str(smollm2.gguf_path), return_tensors=True, model_to_load=skeleton
    )["tensors"]
    ours = dict(iter_weights(smollm2, torch.float32, progress=False))

    # The file has no output.weight: lm_head is tied to the embeddings, so neither side has it.
    assert "lm_head.weight" not in ours
    assert sorted(ours) == sorted(reference)
    assert len(ours) == 2 + 9 * 30
    shapes = {name: p.shape for name, p in skeleton.state_dict().items()}
    assert set(ours) == set(shapes) - {"lm_head.weight"}
    for name, tensor in ours.items():
        ref = torch.as_tensor(reference[name])
        assert tensor.shape == ref.shape == shapes[name], name
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, ref.float()), name


# --- a tiny Llama written to GGUF the way llama.cpp's converter does it ---------------------

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Verbatim from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def write_gguf(model: LlamaForCausalLM, path: Path, qtype: GGMLQuantizationType) -> None:
    """Norms stay F32 (as llama.cpp keeps them); every matrix is stored as ``qtype``."""
    config = model.config
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    for name, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, config.num_key_value_heads)
        if w.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(gguf_name(name), w)
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name(name), w.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Largest error allowed, relative to the tensor's largest magnitude. A wrong q/k row order
# puts errors at ~100% of the magnitude, so each bound still catches it.
RELATIVE_ERROR = {
    Q.F32: 0.0,
    Q.F16: 1e-3,
    Q.BF16: 8e-3,
    Q.Q8_0: 1e-2,
    Q.Q5_0: 7e-2,
    Q.Q5_1: 7e-2,
    Q.Q4_0: 0.15,
    Q.Q4_1: 0.15,
}


@pytest.mark.parametrize("qtype", list(RELATIVE_ERROR), ids=lambda q: q.name)
def test_gguf_round_trip_restores_hf_weights(
    tiny_llama: LlamaForCausalLM, tmp_path: Path, qtype: GGMLQuantizationType
) -> None:
    path = tmp_path / f"tiny.{qtype.name}.gguf"
    write_gguf(tiny_llama, path, qtype)
    original = tiny_llama.state_dict()

    loaded = dict(iter_weights(resolve_model(path), torch.float32, progress=False))

    assert list(loaded) == list(original)
    for name, tensor in loaded.items():
        assert tensor.shape == original[name].shape, name
        error = (tensor - original[name]).abs().max().item()
        assert error <= RELATIVE_ERROR[qtype] * original[name].abs().max().item(), (name, error)

    # Any other dtype is the same values, rounded once.
    for name, tensor in iter_weights(resolve_model(path), torch.bfloat16, progress=False):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, loaded[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K], ids=lambda q: q.name)
def test_k_quants_dequantize_per_tensor(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    """gguf-py cannot write K-quants, so random blocks stand in for them: the loader must still
    undo the q/k permutation and the reversed shape of these 256-element block formats."""
    rows, cols, heads = 8, 256, 2
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (rows, cols // block_size * type_size), dtype=np.uint8)
    # Random bytes may encode inf/nan fp16 scales; keep those checks about layout, not values.
    dense = np.nan_to_num(quants.dequantize(raw, qtype), nan=0.0, posinf=0.0, neginf=0.0)

    path = tmp_path / f"k.{qtype.name}.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qtype)
    writer.add_tensor("blk.0.attn_v.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    loaded = dict(iter_weights(resolve_model(path), torch.float32, progress=False))
    q = torch.nan_to_num(loaded["model.layers.0.self_attn.q_proj.weight"], 0.0, 0.0, 0.0)
    v = torch.nan_to_num(loaded["model.layers.0.self_attn.v_proj.weight"], 0.0, 0.0, 0.0)
    assert q.shape == v.shape == (rows, cols)
    assert torch.equal(v, torch.from_numpy(dense))
    assert torch.equal(torch.from_numpy(llama_cpp_permute(q.numpy(), heads)), v)


def test_unknown_gguf_tensor_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_head_count(1)
    writer.add_tensor("blk.0.ssm_conv1d.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'blk.0.ssm_conv1d.weight' .* not supported"):
        list(iter_weights(resolve_model(path), torch.float32, progress=False))
