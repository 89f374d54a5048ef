"""``yaie.kernels.greedy_head``: greedy decoding's argmax from a bf16 screen confirmed in fp32.

The screen is built on any CPU oneDNN can run bf16 on (``_native_bf16`` forced on: where the
CPU lacks AVX512-BF16 oneDNN emulates it, slower but with the same results), so these tests
check the arithmetic everywhere, not only where the engine turns the screen on.
"""

from __future__ import annotations

import pytest
import torch

from yaie.executor.sampler import argmax_suffices
from yaie.kernels import greedy_head
from yaie.kernels.greedy_head import bf16_screen, greedy_argmax

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="oneDNN cannot run bf16 GEMMs on this CPU",
)


@pytest.fixture
def screen_anywhere(monkeypatch):
    monkeypatch.setattr(greedy_head, "_native_bf16", lambda: True)
    return bf16_screen


@pytest.mark.parametrize(
    "rows, vocab, hidden", [(1, 1000, 64), (5, 64 * 7 + 17, 96), (16, 4096, 576)]
)
def test_equals_the_argmax_of_the_logits(screen_anywhere, rows, vocab, hidden) -> None:
    torch.manual_seed(rows)
    weight = torch.randn(vocab, hidden) * 0.05
    x = torch.randn(rows, hidden) * 3
    expected = (x.double() @ weight.double().T).argmax(dim=-1)
    assert torch.equal(greedy_argmax(x, screen_anywhere(weight)), expected)


def test_the_fp32_logit_decides_where_bf16_would_rank_wrong(screen_anywhere) -> None:
    """Row A's exact logit is the larger, but rounded to bf16 its weights lose their excess
    and most of row B's double theirs: the screen alone would answer B."""
    hidden, vocab = 16, 64 * 3 + 9  # the two rows sit in the tail after whole chunks
    weight = torch.randn(vocab, hidden) * 0.01
    a, b = vocab - 5, vocab - 3
    weight[a] = 1.0038  # bf16 1.0; logit 4.0152 (x = 0.25)
    weight[b, :12] = 1.004  # bf16 1.0078125
    weight[b, 12:] = 0.9981  # bf16 1.0; logit 4.0101, screened 4.03125
    x = torch.full((2, hidden), 0.25)
    bf16_logits = (x.bfloat16() @ weight.bfloat16().T).float()
    assert bf16_logits[0, b] > bf16_logits[0, a]  # the trap is set
    assert greedy_argmax(x, screen_anywhere(weight)).tolist() == [a, a]


def test_ties_go_to_the_lower_index(screen_anywhere) -> None:
    weight = torch.randn(300, 32) * 0.01
    weight[70] = weight[250] = 0.5
    assert greedy_argmax(torch.ones(1, 32), screen_anywhere(weight)).tolist() == [70]


def test_non_finite_input_is_refused(screen_anywhere) -> None:
    screen = screen_anywhere(torch.randn(100, 16))
    x = torch.randn(2, 16)
    x[1, 3] = float("nan")
    assert greedy_argmax(x, screen) is None
    x[1, 3] = float("inf")
    assert greedy_argmax(x, screen) is None


def test_no_screen_where_it_would_not_pay(monkeypatch) -> None:
    monkeypatch.setattr(greedy_head, "_native_bf16", lambda: False)
    assert bf16_screen(torch.randn(100, 16)) is None
    monkeypatch.setattr(greedy_head, "_native_bf16", lambda: True)
    assert bf16_screen(torch.randn(100, 16, dtype=torch.bfloat16)) is None


def test_only_plain_greedy_rows_may_skip_the_logits() -> None:
    from yaie.core.batch import ScheduledRequest
    from yaie.core.sampling import SamplingParams

    def rows(**kw) -> list[ScheduledRequest]:
        return [ScheduledRequest(name, 5, 1, True, params, [1, 2, 3], [4, 5])
                for name, params in (("a", SamplingParams(temperature=0.0)),
                                     ("b", SamplingParams(**kw)))]

    assert argmax_suffices(rows(temperature=0.0))
    assert not argmax_suffices(rows(temperature=0.7))
    assert not argmax_suffices(rows(temperature=0.0, logprobs=2))
    assert not argmax_suffices(rows(temperature=0.0, repetition_penalty=1.2))
    assert not argmax_suffices(rows(temperature=0.0, presence_penalty=0.5))
    assert not argmax_suffices(rows(temperature=0.0, frequency_penalty=0.5))


def test_a_head_on_a_grid_leaves_few_rows_to_its_exact_logits(screen_anywhere) -> None:
    """Below ``SCREEN_MIN_ROWS`` rows a Q8_0 head computes the exact logits (through
    ``yaie.kernels.grid_linear``) instead of screening; from there on it screens."""
    from kernel_helpers import gguf_round_trip

    from yaie.model.layers import SCREEN_MIN_ROWS, ParallelLMHead

    torch.manual_seed(0)
    head = ParallelLMHead(4096, 64)
    head.weight.data = gguf_round_trip(torch.randn(4096, 64) * 0.05, "Q8_0")
    head.pack()
    assert head.packed.grid is not None and head.screen is not None
    for rows in (SCREEN_MIN_ROWS - 1, SCREEN_MIN_ROWS):
        x = torch.randn(rows, 64) * 3
        expected = (x.double() @ head.weight.double().T).argmax(dim=-1)
        got = head.greedy(x)
        if rows < SCREEN_MIN_ROWS:
            assert got is None
            got = head(x).argmax(dim=-1)
        assert torch.equal(got, expected)
