"""The engine on the HashExecutor: whatever the batching, caching, chunking or preemption, the
tokens are those of running each request alone, and the pool always ends idle."""

import random

import pytest

from yaie.core.batch import ScheduledBatch, StepResult
from yaie.core.engine import EngineOverloadedError
from yaie.core.request import FinishReason
from yaie.core.sampling import SamplingParams

from engine_helpers import assert_idle_pool, drain, make_engine


def _workload(seed=0, n=16, shared=37):
    rng = random.Random(seed)
    system = [rng.randrange(8, 100) for _ in range(shared)]
    prompts = []
    for i in range(n):
        head = system if i % 3 else system[: rng.randrange(1, shared)]
        prompts.append(head + [rng.randrange(8, 100) for _ in range(rng.randrange(1, 50))])
    return prompts


def _run(prompts, max_tokens=24, **kw):
    engine = make_engine(**kw)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=max_tokens))
    outputs = drain(engine)
    assert_idle_pool(engine)
    return outputs, engine


def _alone(prompts, max_tokens=24):
    """Reference: each request run by itself on a fresh engine, no caching."""
    return {str(i): _run([p], max_tokens, caching=False)[0]["0"] for i, p in enumerate(prompts)}


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(caching=False),
        dict(chunked=False, max_num_batched_tokens=128),
        dict(max_num_batched_tokens=8),
        dict(max_num_batched_tokens=1000, max_num_seqs=64),
        dict(block_size=16, num_blocks=64),
        dict(num_blocks=30),  # forces preemption
        dict(num_blocks=30, caching=False),
    ],
    ids=repr,
)
def test_outputs_match_running_alone(config):
    prompts = _workload()
    outputs, engine = _run(prompts, **config)
    assert outputs == _alone(prompts)
    if config.get("num_blocks") == 30:
        assert engine.scheduler.num_preemptions > 0


def test_eos_and_max_tokens_and_context_end_requests():
    engine = make_engine(max_model_len=40)
    engine.add_request("eos", [8, 9, 10], SamplingParams(max_tokens=500, stop_token_ids=[]))
    engine.add_request("len", [8, 9, 11], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.add_request("ctx", [8, 9, 12] * 10, SamplingParams(max_tokens=None, ignore_eos=True))
    finals = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["len"].finish_reason is FinishReason.LENGTH and finals["len"].metrics.num_output_tokens == 5
    assert finals["ctx"].metrics.num_output_tokens == 40 - 30
    eos = finals["eos"]
    assert eos.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


def test_stop_token_ids_stop_the_request():
    probe = _run([[8, 9, 10]], max_tokens=6)[0]["0"]
    engine = make_engine()
    engine.add_request("a", [8, 9, 10], SamplingParams(max_tokens=50, stop_token_ids=[probe[2]]))
    out = drain(engine)["a"]
    assert out == probe[:3]


def test_prefix_sharing_computes_a_shared_system_prompt_once():
    """32 requests with a 1,000-token system prompt, all arriving together."""
    rng = random.Random(1)
    system = [rng.randrange(8, 100) for _ in range(1000)]
    engine = make_engine(
        num_blocks=4096, block_size=16, max_num_batched_tokens=512, max_num_seqs=64, max_model_len=2048
    )
    for i in range(32):
        engine.add_request(str(i), system + [rng.randrange(8, 100) for _ in range(20)], SamplingParams(max_tokens=4))
    drain(engine)
    prefill = sum(s.num_prefill_tokens + s.num_decode_tokens for s in engine.steps) - sum(
        m.num_output_tokens - 1 for m in engine.finished_metrics
    )
    # the prompt's 62 full blocks (992 tokens) once, then each request's own 28 tokens
    assert prefill == 992 + 32 * 28
    assert engine.kv.radix.stats.hit_rate == pytest.approx(31 * 992 / (32 * 1020))
    assert all(m.num_cached_tokens == 992 for m in list(engine.finished_metrics)[1:])


def test_late_arrivals_share_blocks_of_a_running_request():
    engine = make_engine(block_size=4, max_num_batched_tokens=16)
    prompt = list(range(10, 50))
    engine.add_request("first", prompt, SamplingParams(max_tokens=30))
    for _ in range(2):
        engine.step()  # 32 of 40 prompt tokens computed: 8 full blocks in the tree
    engine.add_request("second", prompt + [1, 2], SamplingParams(max_tokens=3))
    engine.step()  # second waits one step: "first" is computing its next block right now
    assert engine.requests["second"].num_computed_tokens == 0
    engine.step()
    second = engine.requests["second"]
    assert second.num_cached_tokens == 40
    assert second.block_ids[:10] == engine.requests["first"].block_ids[:10]
    drain(engine)
    assert_idle_pool(engine)


def test_n_choices_share_the_prompt_and_follow_seeds():
    engine = make_engine()
    ids = engine.add_request("x", list(range(8, 60)), SamplingParams(max_tokens=5, n=3, seed=4))
    assert ids == ["x-0", "x-1", "x-2"]
    seen = []
    while engine.has_unfinished:
        seen += engine.step()
    assert {(o.parent_id, o.index) for o in seen} == {("x", 0), ("x", 1), ("x", 2)}
    assert engine.kv.radix.stats.hit_tokens >= 2 * 48
    assert_idle_pool(engine)


def test_abort_frees_blocks_at_any_point():
    engine = make_engine()
    engine.add_request("a", list(range(8, 90)), SamplingParams(max_tokens=100))
    engine.add_request("b", list(range(8, 30)), SamplingParams(max_tokens=100))
    engine.step()
    out = engine.abort("a")
    assert out[0].finish_reason is FinishReason.ABORT and out[0].finished
    assert engine.abort("a") == [] and engine.abort("nope") == []
    engine.abort("b")
    assert not engine.has_unfinished
    assert_idle_pool(engine)


def test_abort_during_a_step_is_safe():
    """A simulator (or async front end) may abort between schedule() and finish_step()."""
    engine = make_engine()
    engine.add_request("a", list(range(8, 40)), SamplingParams(max_tokens=10))
    engine.add_request("b", list(range(60, 90)), SamplingParams(max_tokens=10))
    batch = engine.schedule()
    result = engine.executor.execute(batch)
    engine.abort("a")
    outs = engine.finish_step(batch, result)
    assert [o.request_id for o in outs] == ["b"]
    drain(engine)
    assert_idle_pool(engine)


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ([], SamplingParams(), "empty"),
        (list(range(100)), SamplingParams(), "context is 100"),
        (list(range(50)), SamplingParams(max_tokens=2000), "KV blocks"),
    ],
)
def test_impossible_requests_fail_with_a_clear_message(prompt, params, match):
    engine = make_engine(num_blocks=20, max_model_len=100)
    with pytest.raises(ValueError, match=match):
        engine.add_request("r", prompt, params)
    assert not engine.has_unfinished


def test_request_larger_than_pool_is_refused_even_if_context_allows():
    engine = make_engine(num_blocks=8, block_size=4, max_model_len=1000)
    with pytest.raises(ValueError, match="needs up to 13 KV blocks"):
        engine.add_request("r", list(range(8, 58)), SamplingParams(max_tokens=2))
    engine.add_request("ok", list(range(8, 30)), SamplingParams(max_tokens=5))
    drain(engine)


def test_duplicate_ids_and_overload():
    engine = make_engine(max_waiting=2)
    engine.add_request("a", [8, 9], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [8, 9], SamplingParams())
    engine.add_request("b", [8, 9], SamplingParams())
    with pytest.raises(EngineOverloadedError, match="overloaded"):
        engine.add_request("c", [8, 9], SamplingParams())


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on():
    engine = make_engine()
    engine.add_request("a", list(range(8, 20)), SamplingParams(max_tokens=4))
    real = engine.executor

    class Broken:
        def execute(self, batch: ScheduledBatch) -> StepResult:
            raise RuntimeError("boom")

    engine.executor = Broken()
    outs = engine.step()
    assert outs[0].finish_reason is FinishReason.ERROR and "boom" in outs[0].error
    assert_idle_pool(engine)
    engine.executor = real
    engine.add_request("b", list(range(8, 20)), SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(drain(engine)["b"]) == 4


def test_priority_policy_runs_urgent_requests_first():
    engine = make_engine(max_num_seqs=1, policy="priority")
    engine.add_request("low", [8, 9, 10], SamplingParams(max_tokens=2, ignore_eos=True), priority=5)
    engine.add_request("high", [8, 9, 11], SamplingParams(max_tokens=2, ignore_eos=True), priority=0)
    first = engine.step()
    assert engine.scheduler.running[0].request_id == "high" or first[0].request_id == "high"


def test_timestamps_come_from_the_injected_clock():
    engine = make_engine()
    engine.clock.now = 100.0
    engine.add_request("a", [8, 9, 10, 11], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.clock.now = 101.0
    engine.step()
    engine.clock.now = 102.5
    engine.step()
    engine.clock.now = 104.0
    outs = engine.step()
    m = outs[-1].metrics
    assert (m.queue_time, m.ttft, m.e2e) == (1.0, 1.0, 4.0)
    assert m.itls == [1.5, 1.5] and m.tpot == 1.5


class _StopOnText:
    """A fake detokenizer: each token is the letter chr(97 + t % 26); stop string 'q' matches."""

    def __init__(self, req):
        self.stop = req.sampling_params.stop
        self.text = ""
        self.stopped = False

    def step(self, token_id):
        self.text += chr(97 + token_id % 26)
        if any(s in self.text for s in self.stop):
            self.stopped = True
            return ""
        return self.text[-1]

    def flush(self):
        return ""


def test_stop_strings_from_the_text_stream_end_requests():
    engine = make_engine()
    engine.text_stream = _StopOnText
    probe = _run([[8, 9, 10]], max_tokens=40)[0]["0"]
    letters = "".join(chr(97 + t % 26) for t in probe)
    stop = letters[5]
    engine.add_request("s", [8, 9, 10], SamplingParams(max_tokens=40, stop=[stop]))
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    assert outs[-1].finish_reason is FinishReason.STOP
    assert "".join(o.text for o in outs) == letters[: letters.index(stop)]
