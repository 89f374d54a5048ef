"""IncrementalDetokenizer against two real tokenizers trained here in milliseconds.

``byte_level`` is GPT-2/SmolLM-style byte-level BPE; ``sentencepiece`` is Llama-style: Metaspace
``▁`` word marks, byte-fallback tokens ``<0xNN>`` for characters outside the vocabulary, and a
decoder that strips the leading space of a text.
"""

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from yaie.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. Stop here!",
    "Streaming text one token at a time: hello, world; 你好，世界。",
    "Emoji 🙂 and accents: café, naïve, über.  Numbers 12345 and symbols <>#.",
] * 20

# Pieces of random texts: words in the vocabulary, and characters that are not (Ж, 🙃, 👍🏽, ß),
# which the tokenizers split into several byte tokens.
PIECES = [
    *("Hello", " world", "hello", " the", " fox", "Stop", " here", "123", ".", "!", ","),
    *("你好", "世界", "🙂", "🙃", "👍🏽", "café", " naïve", "Ж", "ß", " ", "  ", "\n"),
]


def build_byte_level() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )


def build_sentencepiece() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<unk>", "</s>", *byte_tokens],
        limit_alphabet=60,
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    # The trainer registers the byte tokens as special, but they are ordinary vocabulary
    # (skip_special_tokens must not drop them): keep only <unk> and </s> special.
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in ("<unk>", "</s>")]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


BYTE_LEVEL = build_byte_level()
SENTENCEPIECE = build_sentencepiece()
TOKENIZERS = {"byte_level": BYTE_LEVEL, "sentencepiece": SENTENCEPIECE}

texts = st.lists(st.sampled_from(PIECES), min_size=1, max_size=20).map("".join)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    return [detokenizer.step(token_id) for token_id in token_ids]


def test_test_tokenizers_split_characters_into_byte_tokens() -> None:
    """Guard the premise of the multibyte tests: 🙃 takes several tokens in both tokenizers."""
    for tokenizer in TOKENIZERS.values():
        assert len(encode(tokenizer, "🙃")) > 1
    assert "<0xF0>" in SENTENCEPIECE.convert_ids_to_tokens(encode(SENTENCEPIECE, "🙃"))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_hello_world_streams_word_by_word(name: str) -> None:
    tokenizer = TOKENIZERS[name]
    ids = encode(tokenizer, "Hello world")
    assert len(ids) == 2
    assert stream(IncrementalDetokenizer(tokenizer, []), ids) == ["Hello", " world"]


def test_first_word_after_a_prompt_keeps_its_sentencepiece_space() -> None:
    """``decode([▁world])`` alone is "world"; after a prompt the continuation is " world"."""
    prompt, output = encode(SENTENCEPIECE, "Hello"), encode(SENTENCEPIECE, " world")[-1:]
    assert SENTENCEPIECE.decode(output) == "world"
    detokenizer = IncrementalDetokenizer(SENTENCEPIECE, prompt)
    assert stream(detokenizer, output) == [" world"]


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=150, deadline=None)
@given(text=texts, prompt=st.sampled_from(["", "Hello", "你好 ", "Say: 🙂"]))
def test_deltas_are_whole_characters_and_add_up_to_the_decode(
    name: str, text: str, prompt: str
) -> None:
    tokenizer = TOKENIZERS[name]
    prompt_ids, ids = encode(tokenizer, prompt), encode(tokenizer, text)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = stream(detokenizer, ids)

    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == detokenizer.text
    assert detokenizer.flush() == ""
    if prompt_ids and name == "sentencepiece":
        # The text continues the prompt: decode the two together and take what the output adds.
        expected = tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)) :]
    else:
        expected = tokenizer.decode(ids)
    assert detokenizer.text == expected


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.integers(0, len(BYTE_LEVEL) - 1), max_size=30),
    skip_special_tokens=st.booleans(),
)
def test_random_byte_level_ids_add_up_to_the_decode(
    ids: list[int], skip_special_tokens: bool
) -> None:
    """Any id sequence, even invalid UTF-8 or special tokens: stream + flush == decode."""
    detokenizer = IncrementalDetokenizer(
        BYTE_LEVEL, encode(BYTE_LEVEL, "Hi"), skip_special_tokens=skip_special_tokens
    )
    text = "".join(stream(detokenizer, ids)) + detokenizer.flush()
    expected = BYTE_LEVEL.decode(ids, skip_special_tokens=skip_special_tokens)
    assert text == detokenizer.text == expected


@pytest.mark.parametrize("name", TOKENIZERS)
def test_an_emoji_in_several_tokens_appears_once_complete(name: str) -> None:
    tokenizer = TOKENIZERS[name]
    ids = encode(tokenizer, "a🙃")
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas = stream(detokenizer, ids)
    assert "".join(deltas) == "a🙃"
    assert deltas[-1].endswith("🙃") and all("🙃" not in d for d in deltas[:-1])


def test_special_tokens_are_skipped_or_kept() -> None:
    eos = SENTENCEPIECE.eos_token_id
    ids = [*encode(SENTENCEPIECE, "Hello"), eos]
    skipped = IncrementalDetokenizer(SENTENCEPIECE, [])
    assert "".join(stream(skipped, ids)) == "Hello"
    kept = IncrementalDetokenizer(SENTENCEPIECE, [], skip_special_tokens=False)
    assert "".join(stream(kept, ids)) == "Hello</s>"


def test_flush_releases_an_incomplete_character_as_a_full_decode_would() -> None:
    ids = encode(SENTENCEPIECE, "a🙃")[:-1]  # the emoji's last byte never comes
    detokenizer = IncrementalDetokenizer(SENTENCEPIECE, [])
    assert "".join(stream(detokenizer, ids)) == "a"
    assert detokenizer.flush() == SENTENCEPIECE.decode(ids)[1:]
    assert detokenizer.text == SENTENCEPIECE.decode(ids)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stop_string_across_tokens_cuts_the_text(name: str) -> None:
    tokenizer = TOKENIZERS[name]
    ids = encode(tokenizer, "The quick brown fox jumps over")
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["brown f", "lazy"])
    deltas = [detokenizer.step(token_id) for token_id in ids]
    assert "".join(deltas) == detokenizer.text == "The quick "
    assert detokenizer.stopped and detokenizer.matched_stop == "brown f"
    assert detokenizer.step(ids[0]) == "" and detokenizer.flush() == ""
    assert detokenizer.text == "The quick "


def test_earliest_stop_string_wins() -> None:
    ids = encode(BYTE_LEVEL, "the lazy dog. Stop here!")
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["Stop", "dog", "lazy dog"])
    stream(detokenizer, ids)
    assert detokenizer.text == "the " and detokenizer.matched_stop == "lazy dog"


def test_stop_string_made_of_byte_tokens() -> None:
    ids = encode(SENTENCEPIECE, "x 🙃 y")
    detokenizer = IncrementalDetokenizer(SENTENCEPIECE, [], stop=["🙃"])
    assert "".join(stream(detokenizer, ids)) == "x "
    assert detokenizer.matched_stop == "🙃"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_false_start_of_a_stop_string_is_held_then_released(name: str) -> None:
    tokenizer = TOKENIZERS[name]
    text = "the fox jumps over the fox."
    ids = encode(tokenizer, text)
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["fox!"])
    for i, token_id in enumerate(ids):
        detokenizer.step(token_id)
        decoded = tokenizer.decode(ids[: i + 1])
        held = decoded[len(detokenizer.text) :]
        assert decoded.startswith(detokenizer.text)
        # what is held is exactly the longest tail that could still become "fox!"
        could_be_stop = (decoded[j:] for j in range(len(decoded)) if "fox!".startswith(decoded[j:]))
        assert held == next(could_be_stop, "")
    assert detokenizer.text == text and not detokenizer.stopped


def test_flush_releases_a_held_stop_prefix() -> None:
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["fox jumps!"])
    released = "".join(stream(detokenizer, encode(BYTE_LEVEL, "the quick fox")))
    assert released == "the quick "
    assert detokenizer.flush() == "fox"
    assert detokenizer.text == "the quick fox" and not detokenizer.stopped


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=150, deadline=None)
@given(data=st.data(), text=texts)
def test_stop_strings_cut_at_the_first_match_to_complete(name: str, data: st.DataObject, text: str) -> None:
    tokenizer = TOKENIZERS[name]
    ids = encode(tokenizer, text)
    full = tokenizer.decode(ids)
    assume(full)  # a lone " " decodes to "" with SentencePiece
    start = data.draw(st.integers(0, len(full) - 1))
    inside = full[start : data.draw(st.integers(start + 1, min(len(full), start + 6)))]
    stops = [inside, data.draw(st.sampled_from(["fox!", "Hello w", "🙂🙂", "\n\n"]))]

    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=stops)
    text_out = "".join(stream(detokenizer, ids))
    assert detokenizer.stopped
    assert text_out == detokenizer.text == first_stop_cut(tokenizer, ids, stops)
    assert full[len(text_out) :].startswith(detokenizer.matched_stop)


def test_the_stop_string_that_completes_first_wins() -> None:
    """"Hello w" starts earlier, but "el" is written first: generation stops there."""
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["Hello w", "el"])
    assert "".join(stream(detokenizer, encode(BYTE_LEVEL, " theHello world"))) == " theH"
    assert detokenizer.matched_stop == "el"


def first_stop_cut(tokenizer: PreTrainedTokenizerFast, ids: list[int], stops: list[str]) -> str:
    """Reference: generation stops at the first token after which the (complete) text contains a
    stop string, and is cut before the earliest one. A stop that would only complete later never
    happens, even if it starts earlier: the model stopped before writing it.
    """
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        if text.endswith("\ufffd"):
            continue  # a character still incomplete: nothing new is visible yet
        found = [text.find(stop) for stop in stops if stop in text]
        if found:
            return text[: min(found)]
    raise AssertionError("no stop string matched")
