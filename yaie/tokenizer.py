"""Tokenizer loading, stop tokens and chat templates.

The engine works in token ids; this module is where text meets ids. Two things decide whether a
chat model behaves: its chat template (the exact prompt format it was trained on) and its set of
stop ids (an instruct model ends a turn with a chat end token such as ``<|im_end|>``, which is
not always the tokenizer's ``eos_token``). Both are gathered here from every place a checkpoint
may keep them. Models older than chat templates get one: ``--chat-template FILE``, or for GPT-2
models DialoGPT's convention, which ``use_chat_template`` installs on the tokenizer so every
front end formats chats the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from yaie.hub import ResolvedModel
from yaie.model.config import GPT2_ARCHITECTURES

logger = logging.getLogger(__name__)

# DialoGPT's format: each turn's text followed by the EOS token; after the last user turn the
# model writes its reply and ends it with EOS. It was trained on Reddit threads, which have no
# system prompt, so system messages are left out.
DIALOGPT_CHAT_TEMPLATE = (
    "{% for message in messages if message['role'] != 'system' %}"
    "{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
)


def load_tokenizer(resolved: ResolvedModel) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer; for GGUF, rebuilt by transformers from the file's vocabulary.

    If transformers drops a GGUF's chat template (older versions did), it is read from the
    ``tokenizer.chat_template`` metadata directly, so chat works the same for both formats.
    """
    if resolved.kind == "hf_dir":
        return AutoTokenizer.from_pretrained(resolved.path)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
    if tokenizer.chat_template is None:
        from gguf import GGUFReader

        field = GGUFReader(resolved.gguf_path).fields.get("tokenizer.chat_template")
        if field is not None:
            tokenizer.chat_template = bytes(field.parts[field.data[0]]).decode()
            logger.info("Chat template of %s read from GGUF metadata", resolved.name)
    return tokenizer


def eos_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    hf_config: PretrainedConfig | None = None,
    generation_config: GenerationConfig | None = None,
) -> set[int]:
    """Every id that ends a generation: the union of what tokenizer and configs declare.

    A union, because checkpoints disagree: SmolLM2-Instruct's tokenizer says ``<|im_end|>``;
    Llama 3 Instruct's config says ``<|end_of_text|>`` and only its generation config adds
    ``<|eot_id|>``, the token that actually ends a chat turn. Missing one means a model that
    never stops; an extra one is harmless.
    """
    ids: set[int] = set()
    for source in (tokenizer, hf_config, generation_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(_as_ids(value))
    return ids


def _as_ids(value: int | Iterable[int] | None) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def read_chat_template(path: str) -> str:
    """The Jinja chat template in file ``path`` (``--chat-template FILE``)."""
    try:
        return Path(path).expanduser().read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the chat template file {path}: {exc.strerror}") from None


def use_chat_template(
    tokenizer: PreTrainedTokenizerBase, architecture: str, template: str | None = None
) -> None:
    """Settle the template chats are formatted with, on the tokenizer itself.

    ``template`` (the user's) wins; else the tokenizer's own; else, for a GPT-2 model, which
    predates chat templates, DialoGPT's convention. Otherwise the tokenizer keeps none and
    ``apply_chat_template`` says how to pass one. Setting it on the tokenizer, rather than at
    each call, means every front end sees the same answer to "can this model chat?".
    """
    if template is not None:
        tokenizer.chat_template = template
    elif not tokenizer.chat_template and architecture in GPT2_ARCHITECTURES:
        tokenizer.chat_template = DIALOGPT_CHAT_TEMPLATE
        logger.info("No chat template: using DialoGPT's (turns joined by the EOS token)")


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> list[int]:
    """Render ``messages`` with the model's chat template (or ``chat_template``) into ids.

    Errors a request can cause (no template, messages the template rejects) are ``ValueError``.

    Rendered to text first and encoded without adding special tokens: the template already
    writes BOS and role markers, and this path returns plain ``list[int]`` across transformers
    versions (whose ``tokenize=True`` return type changed in v5).
    """
    if chat_template is None and not tokenizer.chat_template:
        raise ValueError(
            "This model has no chat template, so chat messages cannot be formatted for it. "
            "Pass one as a Jinja file (--chat-template FILE; in Python, chat_template=... with "
            "the Jinja string) or send a plain-text prompt to the completions endpoint instead."
        )
    try:
        text = tokenizer.apply_chat_template(
            list(messages),
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except TemplateError as exc:
        # Templates validate messages themselves, e.g. "Conversation roles must alternate".
        raise ValueError(f"The chat template rejected these messages: {exc}") from exc
    return tokenizer.encode(text, add_special_tokens=False)
