"""Sampler behaviour on hand-made logits; each test runs on CPU, and on CUDA with ``-m gpu``."""

import math

import pytest
import torch

from yaie.core.batch import ScheduledRequest
from yaie.core.sampling import SamplingParams
from yaie.executor.sampler import Sampler, _apply_penalties

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def randn(*shape: int, seed: int, device: torch.device) -> torch.Tensor:
    """Same numbers on every device: drawn on the CPU, then moved."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def request(
    prompt: list[int] | None = None, output: list[int] | None = None, **params
) -> ScheduledRequest:
    prompt = prompt if prompt is not None else [1, 2, 3]
    output = output if output is not None else []
    return ScheduledRequest(
        request_id="r",
        start_pos=len(prompt) + len(output) - 1,
        num_new_tokens=1,
        samples=True,
        sampling_params=SamplingParams(**params),
        prompt_token_ids=prompt,
        output_token_ids=output,
    )


def sample_rows(logits: torch.Tensor, rows: int, seed: int = 0, **params) -> list[int]:
    """Sample ``rows`` independent draws of the same logits row."""
    batch = logits.expand(rows, -1).contiguous()
    out = Sampler(seed=seed).sample(batch, [request(**params) for _ in range(rows)])
    return out.token_ids.tolist()


def test_greedy_is_argmax(device: torch.device) -> None:
    logits = randn(8, 50, seed=0, device=device)
    out = Sampler(seed=0).sample(logits, [request(temperature=0) for _ in range(8)])
    assert out.token_ids.dtype == torch.int64 and out.token_ids.device == logits.device
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_greedy_rows_stay_greedy_in_a_mixed_batch(device: torch.device) -> None:
    logits = randn(6, 50, seed=1, device=device)
    requests = [request(temperature=0 if i % 2 else 1.5, top_p=0.9) for i in range(6)]
    tokens = Sampler(seed=0).sample(logits, requests).token_ids.tolist()
    assert [tokens[i] for i in (1, 3, 5)] == logits.argmax(-1)[[1, 3, 5]].tolist()


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
def test_top_k_1_is_greedy_at_any_temperature(device: torch.device, temperature: float) -> None:
    logits = randn(16, 100, seed=2, device=device)
    requests = [request(temperature=temperature, top_k=1) for _ in range(16)]
    assert Sampler().sample(logits, requests).token_ids.tolist() == logits.argmax(-1).tolist()


# probabilities 0.5, 0.3, 0.15, 0.05 at token ids 3, 1, 0, 2 (not sorted, to test un-sorting)
PROBS = torch.tensor([0.15, 0.3, 0.05, 0.5])
LOGITS = PROBS.log()[None, :]


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        ({"top_p": 0.75}, {3, 1}),  # 0.5 < 0.75, then 0.8 reaches it: the nucleus is {3, 1}
        ({"top_p": 0.85}, {3, 1, 0}),
        ({"top_p": 0.4}, {3}),  # the best token survives any top_p
        ({"top_k": 3}, {3, 1, 0}),
        ({"top_k": 3, "top_p": 0.75}, {3, 1}),
        ({"min_p": 0.2}, {3, 1, 0}),  # threshold 0.2 * 0.5 = 0.1 drops only 0.05
        ({"min_p": 0.5}, {3, 1}),  # threshold 0.25
        ({"top_k": 2, "min_p": 0.5}, {3, 1}),
        ({"top_k": -1, "top_p": 1.0, "min_p": 0.0}, {3, 1, 0, 2}),
    ],
)
def test_filters_keep_exactly_the_right_tokens(
    device: torch.device, params: dict, kept: set[int]
) -> None:
    # 4000 draws: every kept token (renormalised probability >= 0.05) shows up, none other does.
    assert set(sample_rows(LOGITS.to(device), 4000, **params)) == kept


def test_top_p_renormalises_over_the_nucleus(device: torch.device) -> None:
    draws = sample_rows(LOGITS.to(device), 20000, top_p=0.75)
    share_of_best = draws.count(3) / len(draws)
    assert share_of_best == pytest.approx(0.5 / 0.8, abs=0.015)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits(
    device: torch.device,
) -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]], device=device)
    # token 0 in the prompt, token 1 in the output, token 4 in both; 2 and 3 unseen
    r = request(prompt=[0, 4], output=[1, 4], repetition_penalty=2.0)
    expected = [[1.0, -2.0, 0.5, -3.0, 0.5]]
    assert _apply_penalties(logits, [r]).tolist() == expected


def test_frequency_and_presence_penalties_count_output_tokens_only(device: torch.device) -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]], device=device)
    # token 0 only in the prompt (ignored); token 1 once, token 2 three times in the output
    r = request(prompt=[0, 0], output=[2, 1, 2, 2], frequency_penalty=0.5, presence_penalty=0.25)
    expected = [1.0, 1.0 - 0.5 - 0.25, 1.0 - 1.5 - 0.25, 1.0]
    assert _apply_penalties(logits, [r])[0].tolist() == pytest.approx(expected)


def test_penalties_apply_per_row_and_leave_the_input_untouched(device: torch.device) -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0], device=device).repeat(3, 1)
    original = logits.clone()
    requests = [
        request(output=[0]),
        request(prompt=[0], output=[0], repetition_penalty=4.0),
        request(output=[0, 0], frequency_penalty=-1.0),
    ]
    penalized = _apply_penalties(logits, requests)
    assert torch.equal(logits, original)
    assert penalized.tolist() == [[3, 2, 1, 0], [0.75, 2, 1, 0], [5, 2, 1, 0]]


def test_penalties_change_the_greedy_choice(device: torch.device) -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0]], device=device)
    sampler = Sampler(seed=0)
    cases = [({}, 0), ({"repetition_penalty": 1.2}, 1), ({"presence_penalty": 0.2}, 1)]
    for params, token in cases:
        r = request(prompt=[2], output=[0], temperature=0, **params)
        assert sampler.sample(logits, [r]).token_ids.item() == token


def test_seeded_request_is_independent_of_its_batch(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(64, generator=gen)

    def run(seed: int, batch_size: int, position: int, sampler_seed: int) -> list[int]:
        """Generate 12 tokens for a seeded request placed among unseeded strangers."""
        sampler, output = Sampler(seed=sampler_seed), []
        for _ in range(12):
            logits = torch.randn(batch_size, 64, generator=gen)
            logits[position] = row
            requests = [request(temperature=0.5 + i % 3, top_p=0.95) for i in range(batch_size)]
            requests[position] = request(output=output, seed=seed)
            tokens = sampler.sample(logits.to(device), requests).token_ids
            output = [*output, tokens[position].item()]
        return output

    alone = run(1234, batch_size=1, position=0, sampler_seed=0)
    assert run(1234, batch_size=5, position=3, sampler_seed=1) == alone
    assert run(1234, batch_size=9, position=0, sampler_seed=2) == alone
    assert len(set(alone)) > 1  # a fresh draw each step, not one frozen choice
    assert run(99, batch_size=1, position=0, sampler_seed=0) != alone


def test_seeded_draw_survives_recompute(device: torch.device) -> None:
    """After preemption a fresh step sees the same output so far, so it must draw the same."""
    logits = randn(1, 1000, seed=4, device=device)
    output = [5, 6, 7]
    first = Sampler(seed=0).sample(logits, [request(output=list(output), seed=7)]).token_ids
    again = Sampler(seed=1).sample(logits, [request(output=list(output), seed=7)]).token_ids
    assert first.item() == again.item()


def chi_square(draws: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(draws), minlength=len(probs)).double()
    expected = probs.cpu().double() * len(draws)
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square with 5 degrees of freedom: P(stat > 20.5) = 0.001
CHI2_5_DOF_0_001 = 20.5
SIX_LOGITS = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3, -1.0]])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_draws_follow_the_softmax(device: torch.device, temperature: float) -> None:
    draws = sample_rows(SIX_LOGITS.to(device), 60000, seed=5, temperature=temperature)
    assert chi_square(draws, (SIX_LOGITS[0] / temperature).softmax(-1)) < CHI2_5_DOF_0_001


def test_seeded_draws_follow_the_softmax_across_seeds(device: torch.device) -> None:
    n = 20000
    requests = [request(seed=s) for s in range(n)]
    batch = SIX_LOGITS.to(device).expand(n, -1).contiguous()
    draws = Sampler().sample(batch, requests).token_ids.tolist()
    assert chi_square(draws, SIX_LOGITS[0].softmax(-1)) < CHI2_5_DOF_0_001


def test_logprobs_are_the_raw_log_softmax_sorted(device: torch.device) -> None:
    logits = randn(3, 40, seed=6, device=device)
    requests = [
        request(logprobs=5, temperature=0.7, repetition_penalty=1.5, output=[1, 2]),
        request(),
        request(logprobs=0, temperature=0),
    ]
    out = Sampler(seed=0).sample(logits, requests)
    reference = logits.cpu().log_softmax(-1)
    assert out.logprobs is not None and out.logprobs[1] is None

    chosen, top = out.logprobs[0]
    token = out.token_ids[0].item()
    assert chosen == pytest.approx(reference[0, token].item(), abs=1e-6)
    assert list(top) == reference[0].topk(5).indices.tolist()
    values = list(top.values())
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(reference[0].topk(5).values.tolist(), abs=1e-6)
    assert all(math.isfinite(v) and v <= 0 for v in values)

    chosen, top = out.logprobs[2]
    assert top == {}
    assert chosen == pytest.approx(reference[2].max().item(), abs=1e-6)


def test_rejects_logits_that_do_not_match_the_requests() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        Sampler().sample(torch.zeros(2, 10), [request()])
