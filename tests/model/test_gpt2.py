"""The GPT-2 family against transformers on tiny random checkpoints, offline.

Each checkpoint is saved with ``save_pretrained`` (safetensors) beside a GPT-2 byte-level BPE
tokenizer built here from a tiny vocabulary, and read back through YAIE's own loader, so the
Conv1D transposition, the ``c_attn`` split and the tied head are all on the path under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from parity_helpers import Seq, check_mixed_batch, hf_model, our_model, run_step
from tokenizers import pre_tokenizers
from transformers import GPT2Config, GPT2Tokenizer, PreTrainedTokenizerBase

from yaie.cli import main
from yaie.core.sampling import SamplingParams
from yaie.hub import resolve_model
from yaie.llm import LLM
from yaie.model import ModelConfig
from yaie.model.loader import iter_weights, load_config
from yaie.tokenizer import apply_chat_template, use_chat_template

N_POSITIONS = 128
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("o", "u"), ("Ġ", "y"), ("Ġy", "ou"),
           ("Ġ", "a"), ("r", "e"), ("Ġa", "re"), ("Ġ", "s"), ("e", "a")]


def _tokenizer() -> GPT2Tokenizer:
    """GPT-2's tokenizer type over all 256 byte symbols, a few merges and ``<|endoftext|>``."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=_MERGES)


def _config(**overrides) -> GPT2Config:
    eos = len(pre_tokenizers.ByteLevel.alphabet()) + len(_MERGES)
    sizes = {"vocab_size": eos + 1, "n_embd": 64, "n_head": 4, "n_layer": 2,
             "n_positions": N_POSITIONS}
    return GPT2Config(**{**sizes, **overrides}, bos_token_id=eos, eos_token_id=eos)


CONFIGS = {
    "gpt2": _config(),
    # An untied head, a non-default MLP width and the other name of the same activation.
    "untied": _config(tie_word_embeddings=False, n_inner=96,
                      activation_function="gelu_pytorch_tanh"),
}


def _save(name: str, folder: Path) -> torch.nn.Module:
    """Save a random checkpoint of ``CONFIGS[name]`` with the tokenizer; returns the HF model."""
    reference = hf_model(CONFIGS[name])
    reference.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    assert (folder / "model.safetensors").exists()
    return reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    return folder, _save("gpt2", folder)


@pytest.fixture(scope="module")
def llm(checkpoint: tuple[Path, torch.nn.Module]) -> LLM:
    return LLM(str(checkpoint[0]), kv_cache_memory="1MiB", block_size=4)


@pytest.mark.parametrize("order", ["interleaved", "decodes-first"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_batch_matches_transformers(name: str, order: str, tmp_path: Path) -> None:
    reference = _save(name, tmp_path)
    resolved = resolve_model(tmp_path)
    model = our_model(load_config(resolved), iter_weights(resolved, torch.float32))
    check_mixed_batch(reference, model, name, order, shuffled_blocks=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mixed_batch_matches_transformers(tmp_path: Path) -> None:
    """On CUDA: the numba LayerNorm, GELU, KV-write and decode kernels at GPT-2's head size."""
    hf_config = _config(n_embd=256)  # 4 heads of 64, as in every GPT-2 size
    reference = hf_model(hf_config)
    model = our_model(hf_config, reference.state_dict().items(), device="cuda")
    check_mixed_batch(reference, model, "gpu", "interleaved", shuffled_blocks=True)


def test_openai_checkpoint_names_load_the_same() -> None:
    """OpenAI's GPT-2 checkpoints have no ``transformer.`` prefix and carry the causal mask as
    ``attn.bias`` buffers: same model, same logits."""
    reference = hf_model(CONFIGS["gpt2"])
    state = reference.state_dict()
    renamed = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    for i in range(CONFIGS["gpt2"].n_layer):
        renamed[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, N_POSITIONS, N_POSITIONS))
        renamed[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tokens = [5, 80, 260, 7, 31, 99, 12]
    expected = run_step(our_model(CONFIGS["gpt2"], state.items()), [(Seq(tokens), 7)], [0, 1])
    got = run_step(our_model(CONFIGS["gpt2"], renamed.items()), [(Seq(tokens), 7)], [0, 1])
    assert torch.equal(got[0], expected[0])


def test_config_mapping() -> None:
    config = ModelConfig.from_hf(CONFIGS["untied"])
    assert (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == (
        64, 4, 4, 16)
    assert config.intermediate_size == 96 and config.num_layers == 2
    assert config.max_position_embeddings == N_POSITIONS and config.rope_theta is None
    default = ModelConfig.from_hf(CONFIGS["gpt2"])
    assert not config.tie_word_embeddings and default.tie_word_embeddings
    assert default.intermediate_size == 4 * 64
    with pytest.raises(ValueError, match="activation_function='relu' is not supported"):
        ModelConfig.from_hf(_config(activation_function="relu"))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf(_config(scale_attn_by_inverse_layer_idx=True))


PROMPTS = [
    "Hello there, how are you?",
    "the sea",
    "A shared beginning that both prompts have. Then one way",
    "A shared beginning that both prompts have. Then another",
]
NEW_TOKENS = 12


def _hf_greedy(reference: torch.nn.Module, ids: list[int]) -> list[int]:
    """transformers' greedy continuation, the whole sequence recomputed each token."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-NEW_TOKENS:]


@pytest.mark.parametrize(
    "engine", [{}, {"enable_prefix_caching": False}, {"max_num_batched_tokens": 8}],
    ids=["prefix-caching", "no-prefix-caching", "chunked-prefill"],
)
def test_greedy_generation_equals_transformers(checkpoint, engine: dict) -> None:
    folder, reference = checkpoint
    llm = LLM(str(folder), kv_cache_memory="1MiB", block_size=4, **engine)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    expected = [_hf_greedy(reference, llm.tokenizer.encode(p)) for p in PROMPTS]
    for _ in range(2):  # the second round finds the prompts in the radix cache, if it is on
        assert [c.token_ids for c in llm.generate(PROMPTS, params)] == expected
    hits = llm.engine.kv.radix.stats.hit_tokens
    assert hits > 0 if llm.args.enable_prefix_caching else hits == 0


def test_prompt_longer_than_n_positions_is_the_engines_clear_error(checkpoint) -> None:
    llm = LLM(str(checkpoint[0]), kv_cache_memory="1MiB", max_model_len=4096)
    assert llm.max_model_len == N_POSITIONS  # n_positions caps whatever is asked for
    with pytest.raises(ValueError, match=f"context is {N_POSITIONS} tokens"):
        llm.generate([list(range(N_POSITIONS + 6))], SamplingParams(max_tokens=4))
    out = llm.generate([list(range(N_POSITIONS - 4))], SamplingParams(max_tokens=100))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4  # stops at the context


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Does money buy happiness?"},
    {"role": "assistant", "content": "Depends how much money you spend on it ."},
    {"role": "user", "content": "What is the best way to buy happiness ?"},
]


def test_dialogpt_chat_is_turns_joined_by_eos(llm: LLM) -> None:
    """The model card's way: each turn encoded with ``eos_token`` appended, then concatenated
    (DialoGPT has no system turn)."""
    tokenizer = llm.tokenizer
    expected = [i for m in CHAT[1:] for i in tokenizer.encode(m["content"] + tokenizer.eos_token)]
    assert llm.encode(CHAT) == expected
    assert expected.count(tokenizer.eos_token_id) == 3 and expected[-1] == tokenizer.eos_token_id
    reply = llm.chat(CHAT, SamplingParams(max_tokens=5, temperature=0.0))
    assert reply.prompt_token_ids == expected and len(reply.token_ids) >= 1


def test_models_without_a_template_get_a_clear_error_or_the_given_file(
    llm: LLM, checkpoint, tmp_path: Path
) -> None:
    plain: PreTrainedTokenizerBase = _tokenizer()
    use_chat_template(plain, "LlamaForCausalLM")  # not GPT-2: no DialoGPT fallback
    with pytest.raises(ValueError, match=r"no chat template.*--chat-template FILE"):
        apply_chat_template(plain, CHAT)

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    custom = LLM(str(checkpoint[0]), kv_cache_memory="1MiB", chat_template=str(template))
    assert custom.tokenizer.decode(custom.encode(CHAT[1:2])) == "<user>Does money buy happiness?"
    with pytest.raises(ValueError, match="cannot read the chat template file /no/such.jinja"):
        LLM(str(checkpoint[0]), chat_template="/no/such.jinja")


def test_generate_cli_runs_gpt2_and_a_bad_template_is_one_line(
    checkpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = str(checkpoint[0])
    args = ["--max-tokens", "3", "--kv-cache-memory", "1MiB", "-q"]
    assert main(["generate", folder, "Hello there", *args]) == 0
    assert main(["generate", folder, "Hello there", *args, "--chat-template", "/no/such"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "yaie: error: cannot read the chat template file /no/such: No such file or directory"
    ]
