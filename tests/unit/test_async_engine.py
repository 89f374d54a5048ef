"""AsyncEngine: the engine on a background thread, driven from asyncio."""

from __future__ import annotations

import asyncio

import pytest

from engine_helpers import assert_idle_pool, drain, make_engine
from yaie.core.async_engine import AsyncEngine
from yaie.core.engine import EngineOverloadedError
from yaie.core.sampling import SamplingParams

PROMPTS = [list(range(10 + i, 30 + 3 * i)) for i in range(6)]
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


async def _collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(prompt, params):
        tokens += out.new_token_ids
    return tokens


def test_concurrent_requests_match_the_synchronous_engine():
    reference = make_engine()
    for i, p in enumerate(PROMPTS):
        reference.add_request(f"r{i}", p, PARAMS)
    expected = drain(reference)

    async def main() -> list[list[int]]:
        async with AsyncEngine(make_engine()) as engine:
            results = await asyncio.gather(*(_collect(engine, p, PARAMS) for p in PROMPTS))
            assert engine.is_idle
            assert_idle_pool(engine.engine)
            return results

    assert asyncio.run(main()) == [expected[f"r{i}"] for i in range(len(PROMPTS))]


def test_n_choices_stream_until_all_finish():
    async def main() -> dict[int, int]:
        async with AsyncEngine(make_engine()) as engine:
            counts: dict[int, int] = {}
            async for out in engine.generate(PROMPTS[0], SamplingParams(n=3, max_tokens=5, ignore_eos=True)):
                counts[out.index] = counts.get(out.index, 0) + len(out.new_token_ids)
            return counts

    assert asyncio.run(main()) == {0: 5, 1: 5, 2: 5}


def test_leaving_early_aborts_and_frees_blocks():
    async def main() -> None:
        async with AsyncEngine(make_engine()) as engine:
            stream = engine.generate(PROMPTS[1], SamplingParams(max_tokens=500, ignore_eos=True))
            async for out in stream:
                if out.new_token_ids:
                    break
            await stream.aclose()
            for _ in range(200):
                if engine.is_idle:
                    break
                await asyncio.sleep(0.005)
            assert engine.is_idle
            snap = await asyncio.to_thread(engine.snapshot)
            assert not snap["running"] and not snap["waiting"]
            assert_idle_pool(engine.engine)

    asyncio.run(main())


def test_bad_and_excess_requests_fail_before_streaming():
    async def main() -> None:
        engine = AsyncEngine(make_engine(max_model_len=64, max_waiting=1))  # not started:
        with pytest.raises(ValueError, match="context"):  # queued requests stay queued
            await anext(engine.generate(list(range(100)), PARAMS))
        first = asyncio.ensure_future(anext(engine.generate(PROMPTS[0], PARAMS)))
        await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloadedError):
            await anext(engine.generate(PROMPTS[1], PARAMS))
        engine.start()
        assert (await first).request_id.startswith("req-")
        await asyncio.to_thread(engine.stop)

    asyncio.run(main())


def test_a_loop_failure_ends_requests_with_an_error_and_the_loop_survives():
    engine = make_engine()
    calls = {"n": 0}
    step = engine.step

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return step()

    engine.step = flaky_step

    async def main() -> None:
        async with AsyncEngine(engine) as a:
            outs = [o async for o in a.generate(PROMPTS[0], PARAMS)]
            assert outs[-1].finished and "boom" in (outs[-1].error or "")
            assert a.loop_error is not None
            assert len(await _collect(a, PROMPTS[1], PARAMS)) == PARAMS.max_tokens

    asyncio.run(main())
