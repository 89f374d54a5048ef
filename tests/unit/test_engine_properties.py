"""Property-based: random interleavings of add / step / abort over random pools and prompts.

After every step: no block owned twice, refcounts equal their holders, free list exact. At the
end: every request finished or aborted, the pool idle (free or held only by the radix tree),
and the tokens of every request that ran to completion equal those of running it alone.
"""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yaie.core.sampling import SamplingParams

from engine_helpers import assert_idle_pool, drain, make_engine

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 5), st.integers(1, 40), st.integers(1, 12)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
    ),
    min_size=1,
    max_size=40,
)


def _alone(prompt, max_tokens):
    engine = make_engine(caching=False, num_blocks=64, max_model_len=64)
    engine.add_request("r", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return drain(engine, check=False)["r"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=ops,
    block_size=st.sampled_from([1, 2, 4, 8]),
    num_blocks=st.integers(14, 80),
    budget=st.integers(4, 64),
    max_seqs=st.integers(1, 6),
    caching=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_random_interleavings_keep_the_cache_sound(ops, block_size, num_blocks, budget, max_seqs, caching, seed):
    rng = random.Random(seed)
    heads = [[rng.randrange(8, 100) for _ in range(40)] for _ in range(6)]
    engine = make_engine(
        num_blocks=num_blocks,
        block_size=block_size,
        caching=caching,
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
        max_model_len=64,
    )
    added: dict[str, tuple[list[int], int]] = {}
    tokens: dict[str, list[int]] = {}
    ended: dict[str, str] = {}
    for op in ops:
        if op[0] == "add":
            _, head, extra, max_tokens = op
            prompt = heads[head][: rng.randrange(1, 40)] + [rng.randrange(8, 100) for _ in range(extra)]
            rid = str(len(added))
            try:
                engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            except ValueError as exc:
                assert "KV blocks" in str(exc) or "context" in str(exc)
                continue
            added[rid] = (prompt, max_tokens)
        elif op[0] == "step":
            for _ in range(op[1]):
                for out in engine.step():
                    tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                    if out.finished:
                        ended[out.request_id] = out.finish_reason.value
                engine.kv.check_invariants(engine.live_requests())
        else:
            rid = str(op[1])
            for out in engine.abort(rid):
                ended[out.request_id] = out.finish_reason.value
            engine.kv.check_invariants(engine.live_requests())
    # drain what is left: nothing may wait forever
    for _ in range(5000):
        if not engine.has_unfinished:
            break
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                ended[out.request_id] = out.finish_reason.value
        engine.kv.check_invariants(engine.live_requests())
    assert not engine.has_unfinished
    assert set(ended) == set(added)
    assert_idle_pool(engine)
    for rid, reason in ended.items():
        if reason == "length":
            prompt, max_tokens = added[rid]
            assert tokens[rid] == _alone(prompt, max_tokens)
