"""The default model's tokenizer from GGUF: chat template, stop ids, and the error paths."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from yaie.hub import ResolvedModel
from yaie.tokenizer import apply_chat_template, eos_token_ids, load_tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.slow


def test_chat_template_matches_the_tokenizers_own(
    smollm2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    ids = apply_chat_template(smollm2_tokenizer, QUESTION)

    own = smollm2_tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == list(own)
    assert smollm2_tokenizer.decode(ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids[:3] == [1, 9690, 198]  # <|im_start|>system\n, no extra BOS in front
    assert ids[-4:] == [1, 520, 9531, 198]  # <|im_start|>assistant\n


def test_generation_prompt_is_optional(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    with_prompt = apply_chat_template(smollm2_tokenizer, QUESTION)
    without = apply_chat_template(smollm2_tokenizer, QUESTION, add_generation_prompt=False)
    assert with_prompt[: len(without)] == without
    assert smollm2_tokenizer.decode(with_prompt[len(without) :]) == "<|im_start|>assistant\n"


def test_eos_ids_contain_im_end(
    smollm2_tokenizer: PreTrainedTokenizerBase, smollm2_config: PretrainedConfig
) -> None:
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 2
    assert im_end in eos_token_ids(smollm2_tokenizer, smollm2_config)
    generation = GenerationConfig(eos_token_id=[0, 7])
    assert eos_token_ids(smollm2_tokenizer, smollm2_config, generation) == {0, 2, 7}


def test_missing_chat_template_is_a_clear_error(
    smollm2_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match=r"no chat template.*chat_template=\.\.\."):
        apply_chat_template(smollm2_tokenizer, QUESTION)
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ids = apply_chat_template(smollm2_tokenizer, QUESTION, chat_template=plain)
    assert smollm2_tokenizer.decode(ids) == "What is the capital of France?"


def test_template_errors_become_value_errors(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    strict = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ValueError, match="rejected these messages: Conversation roles must"):
        apply_chat_template(smollm2_tokenizer, QUESTION, chat_template=strict)


def test_gguf_chat_template_read_from_metadata_when_transformers_drops_it(
    smollm2: ResolvedModel,
    smollm2_tokenizer: PreTrainedTokenizerBase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """transformers 5 keeps the GGUF's template; older versions did not, and the fallback
    must give the very same template."""
    real = AutoTokenizer.from_pretrained

    def without_template(*args: object, **kwargs: object) -> PreTrainedTokenizerBase:
        tokenizer = real(*args, **kwargs)
        tokenizer.chat_template = None
        return tokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", without_template)
    tokenizer = load_tokenizer(smollm2)
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template
    assert tokenizer.chat_template.startswith("{% for message in messages %}")
