"""Decode CUDA graphs on a real GPU: the graph path computes what the eager and torch paths do.

Random-weight presets (``yaie.model.presets``) of both families — Qwen3's q/k norm and tied
embeddings, Llama 3.1's scaled rope with a 4:1 GQA — run through three executors on the same
weights: CUDA graphs for decode steps, eager steps on the numba kernels (``--enforce-eager``), and
every op on its torch reference (``YAIE_KERNELS=torch``, eager). The engine mixes prefills,
chunked prefills and decodes; decode-only steps of 1 to 5 requests replay graphs of sizes 1, 2,
4 and 8, so padded rows are exercised. In float32 the three compute the same function to ~1e-6,
so greedy tokens must agree exactly; in bfloat16 the graph path's logits must stay within 2e-2
(relative) of the float32 reference on identical inputs.
"""

from __future__ import annotations

import gc
import os
import random

import pytest
import torch

from yaie.args import EngineArgs
from yaie.core.batch import ScheduledBatch, ScheduledRequest
from yaie.core.sampling import SamplingParams
from yaie.executor.cuda_graph import DecodeGraphs

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(SIMULATED or not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PRESETS = ["tiny-qwen3", "tiny-llama"]
GREEDY = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)


def _args(dtype: str, enforce_eager: bool) -> EngineArgs:
    return EngineArgs(
        device="cuda", dtype=dtype, enforce_eager=enforce_eager, max_num_seqs=8,
        max_num_batched_tokens=64, max_model_len=512, gpu_memory_utilization=0.25,
        enable_prefix_caching=False,
    )


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture
def torch_kernels(monkeypatch: pytest.MonkeyPatch):
    """A function that switches every op to its torch reference for the rest of the test."""
    from yaie.kernels import _numba

    def switch() -> None:
        monkeypatch.setenv(_numba.KERNELS_ENV, "torch")
        _numba.gpu_available.cache_clear()

    yield switch
    monkeypatch.delenv(_numba.KERNELS_ENV, raising=False)
    _numba.gpu_available.cache_clear()


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts graph replays: one entry per decode step run as a graph, its batch size."""
    calls: list[int] = []
    run = DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, b: calls.append(len(b.requests)) or run(self, b))
    return calls


def _greedy_tokens(preset: str, dtype: str, enforce_eager: bool) -> dict[str, list[int]]:
    """Requests arriving over several steps, so prefill chunks and decodes share steps and
    decode-only steps have 1 to 5 rows; returns each request's greedy tokens."""
    from yaie.bench.gpu import build_engine
    from yaie.model.presets import preset_config

    engine = build_engine(preset_config(preset), _args(dtype, enforce_eager))
    rng = random.Random(0)
    arrivals = {0: [(5, 30)], 3: [(17, 20), (90, 12)], 8: [(3, 25), (9, 18)], 30: [(40, 10)]}
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished or step <= max(arrivals):
        for length, new in arrivals.get(step, []):
            rid = f"r{len(tokens)}"
            tokens[rid] = []
            engine.add_request(rid, [rng.randrange(1024) for _ in range(length)],
                               SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id] += out.new_token_ids
        step += 1
    return tokens


@pytest.mark.parametrize("preset", PRESETS)
def test_graph_eager_and_torch_paths_pick_the_same_greedy_tokens(
    preset: str, replays: list[int], torch_kernels
) -> None:
    graph = _greedy_tokens(preset, "float32", enforce_eager=False)
    _release()
    assert replays and set(replays) >= {1, 2, 3, 4, 5}, f"graph batch sizes run: {sorted(set(replays))}"
    count = len(replays)
    eager = _greedy_tokens(preset, "float32", enforce_eager=True)
    _release()
    assert len(replays) == count, "--enforce-eager replayed a graph"
    torch_kernels()
    reference = _greedy_tokens(preset, "float32", enforce_eager=True)
    _release()
    assert [len(t) for t in graph.values()] == [30, 20, 12, 25, 18, 10]
    assert graph == eager
    assert graph == reference


def _batch(step_id: int, rows: list[tuple[int, int, list[int]]], block_size: int = 16) -> ScheduledBatch:
    """A batch of ``(request index, start position, new tokens)`` rows; request ``i`` owns blocks
    ``64 i, 64 i + 1, ...`` and samples every step."""
    batch = ScheduledBatch(step_id, block_size)
    for index, start, tokens in rows:
        end = start + len(tokens)
        table = list(range(64 * index, 64 * index + -(-end // block_size)))
        batch.requests.append(ScheduledRequest(f"r{index}", start, len(tokens), True, GREEDY, [], []))
        batch.token_ids += tokens
        batch.positions += range(start, end)
        batch.slot_mapping += [table[p // block_size] * block_size + p % block_size
                               for p in range(start, end)]
        batch.query_start_loc.append(batch.query_start_loc[-1] + len(tokens))
        batch.seq_lens.append(end)
        batch.block_tables.append(table)
        batch.sample_indices.append(batch.query_start_loc[-1] - 1)
        if len(tokens) > 1:
            batch.num_prefill_tokens += len(tokens)
        else:
            batch.num_decode_tokens += 1
    return batch


def _script(seed: int = 0) -> list[ScheduledBatch]:
    """Prefills, then decode-only steps (graphs) and one step mixing a prefill with decodes."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(1024) for _ in range(n)]

    steps = [[(0, 0, ids(20)), (1, 0, ids(7))]]
    pos = {0: 20, 1: 7}
    for _ in range(3):
        steps.append([(i, pos[i], ids(1)) for i in pos])
        pos = {i: p + 1 for i, p in pos.items()}
    steps.append([(2, 0, ids(33)), *((i, pos[i], ids(1)) for i in pos)])
    pos = {**{i: p + 1 for i, p in pos.items()}, 2: 33}
    for _ in range(3):
        steps.append([(i, pos[i], ids(1)) for i in pos])
        pos = {i: p + 1 for i, p in pos.items()}
    return [_batch(n, rows) for n, rows in enumerate(steps)]


def _step_logits(preset: str, dtype: str, enforce_eager: bool) -> list[torch.Tensor]:
    """The fp32 logits every step of ``_script`` samples from (teacher-forced: identical inputs
    whatever the model predicts)."""
    from yaie.executor.model_executor import ModelExecutor
    from yaie.model.presets import preset_config, random_weights

    config = preset_config(preset)
    weights = random_weights(config, "cuda", getattr(torch, dtype), seed=0)
    executor = ModelExecutor.from_weights(config, weights, _args(dtype, enforce_eager))
    logits: list[torch.Tensor] = []
    sample = executor.sampler.sample
    executor.sampler.sample = lambda x, reqs: logits.append(x.float().cpu()) or sample(x, reqs)
    for batch in _script():
        executor.execute(batch)
    return logits


@pytest.mark.parametrize("preset", PRESETS)
def test_graph_logits_match_the_float32_reference(
    preset: str, replays: list[int], torch_kernels
) -> None:
    bf16_graph = _step_logits(preset, "bfloat16", enforce_eager=False)
    _release()
    fp32_graph = _step_logits(preset, "float32", enforce_eager=False)
    _release()
    assert replays == [2, 2, 2, 3, 3, 3] * 2
    torch_kernels()
    reference = _step_logits(preset, "float32", enforce_eager=True)
    _release()
    for step, (low, exact, ref) in enumerate(zip(bf16_graph, fp32_graph, reference)):
        assert torch.isfinite(low).all() and torch.isfinite(exact).all()
        assert ((exact - ref).norm() / ref.norm()).item() < 1e-4, f"fp32, step {step}"
        assert ((low - ref).norm() / ref.norm()).item() < 2e-2, f"bf16, step {step}"


def test_the_engine_stays_under_gpu_memory_utilization() -> None:
    """KV pool, weights, activations and graph pool together: torch never reserves more than
    ``gpu_memory_utilization`` of the card, through capture and a run."""
    _release()
    torch.cuda.reset_peak_memory_stats()
    _greedy_tokens("tiny-qwen3", "bfloat16", enforce_eager=False)
    _, total = torch.cuda.mem_get_info()
    peak = torch.cuda.max_memory_reserved()
    _release()
    assert 0.2 * total < peak <= 0.25 * total
