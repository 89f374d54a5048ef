"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) on CPU, against transformers."""

from __future__ import annotations

import pytest
import torch

from yaie.cli import main
from yaie.core.sampling import SamplingParams

from model_helpers import engine_on

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "1, 2, 3, 4,",
    "Translate to French: I like apples.",
    "The mitochondria is the powerhouse of the cell. " * 12 + "In summary,",
    "Q: What is 12 times 12?\nA:",
    "A shared system prompt that many requests begin with. " * 6 + "User: hello",
    "A shared system prompt that many requests begin with. " * 6 + "User: goodbye",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def reference(llm, hf_model) -> dict[int, list[int]]:
    """transformers' greedy tokens, one prompt at a time, with its own KV cache.

    A plain argmax loop rather than ``generate(min_new_tokens=...)``: that option masks EOS,
    which changes the argmax, while ``ignore_eos`` only keeps going past it.
    """
    out = {}
    with torch.inference_mode():
        for i, text in enumerate(PROMPTS):
            ids = torch.tensor([llm.tokenizer.encode(text)])
            step = hf_model(ids, use_cache=True)
            tokens = []
            for _ in range(NEW_TOKENS):
                nxt = int(step.logits[0, -1].argmax())
                tokens.append(nxt)
                step = hf_model(torch.tensor([[nxt]]), past_key_values=step.past_key_values, use_cache=True)
            out[i] = tokens
    return out


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(caching=False),
        dict(max_num_batched_tokens=64),  # long prompts split into chunks
        dict(chunked=False, max_num_batched_tokens=512),
        dict(num_blocks=24),  # 384 tokens for ~700 needed: forces preemption
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default",
)
def test_greedy_tokens_equal_transformers(llm, reference, config):
    engine = engine_on(llm, **config)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, text in enumerate(PROMPTS):
        engine.add_request(str(i), llm.tokenizer.encode(text), params)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    for i in range(len(PROMPTS)):
        assert got[str(i)] == reference[i], f"prompt {i} differs"
    if "num_blocks" in config:
        assert engine.scheduler.num_preemptions > 0
    if config == {}:
        assert engine.kv.radix.stats.hit_tokens > 0  # the two shared-prefix prompts


def test_every_projection_keeps_its_quantized_form(llm):
    """The Q4_1 file's projections, and its Q8_0 embedding (tied LM head), are found on their
    grids, so the parity test above ran its decodes through the quantized kernel
    (``yaie.kernels.grid_linear``)."""
    from yaie.model.layers import LinearBase

    projections = [m for m in llm.executor.model.modules() if isinstance(m, LinearBase)]
    assert len(projections) == 4 * llm.executor.model_config.num_layers
    assert all(m.packed is not None and m.packed.grid.bits == 4 for m in projections)
    assert llm.executor.model.lm_head.packed.grid.bits == 8


def test_chat_answers_the_capital_of_france(llm):
    answer = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=32, temperature=0.0),
    )
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"


def test_same_seed_same_text_whatever_the_batch(llm):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    alone = llm.generate("Write a haiku about the sea.", params)[0].text
    crowd = llm.generate(
        ["Tell me a joke.", "Write a haiku about the sea.", "List three colors."],
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7),
    )
    assert crowd[1].text == alone


def test_stop_string_is_cut_from_the_output(llm):
    full = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=16, temperature=0.0))[0].text
    assert " 7" in full
    cut = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=16, temperature=0.0, stop=[" 7"]))[0]
    assert cut.text == full[: full.index(" 7")] and cut.finish_reason == "stop"


def test_generate_cli_streams_and_bad_input_is_one_clear_line(smollm2, capsys):
    assert main(["generate", str(smollm2.gguf_path), "What is the capital of France?", "--max-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert main(["generate", "/no/such/model", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file or directory" in err[0].lower()


def test_prompt_longer_than_context_is_a_clear_error(llm):
    with pytest.raises(ValueError, match="context is 2048 tokens"):
        llm.generate([list(range(100, 2200))], SamplingParams(max_tokens=4))
