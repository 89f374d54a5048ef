"""``yaie profile [MODEL]``: measure the real engine's step times and fit a calibrated cost model.

A roofline knows a device's peaks; a real engine reaches some fraction of them that depends on
the batch's shape, and pays host work (scheduling, tensor building, sampling, detokenizing) on
top. So we measure: the real ``LLM`` engine runs a grid of workloads built so that its steps
have chosen shapes — ``D`` requests decoding at context ``C`` while a prompt chunk of ``P``
tokens (with or without a cached prefix) joins them — and every ``engine.step()`` is timed
whole, on the clock the real engine's metrics use. Least squares over those steps gives the
``CalibratedCostModel`` (``cost.py``), saved as JSON for ``yaie simulate --cost-model``.

torch and numpy are imported inside the functions that need them: importing this module (the
CLI does, to register the command) stays as light as the simulate path.
"""

from __future__ import annotations

import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from yaie.core.batch import ScheduledBatch, StepResult
from yaie.core.sampling import SamplingParams
from yaie.simulator.cost import CalibratedCostModel, interpolation_weight

if TYPE_CHECKING:
    from yaie.core.batch import Executor
    from yaie.core.engine import LLMEngine, RequestOutput
    from yaie.llm import LLM


@dataclass(slots=True)
class Grid:
    """The workloads to time. Setups whose decoding requests would hold more than
    ``max_setup_tokens`` of context are skipped: prefilling them would take minutes on a CPU."""

    decodes: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    contexts: tuple[int, ...] = (64, 256, 1024)
    prefills: tuple[int, ...] = (16, 64, 256, 512)
    repeats: int = 2
    max_setup_tokens: int = 4096

    @classmethod
    def quick(cls) -> Grid:
        """A grid that runs in well under a minute on a small CPU model (tests, smoke runs)."""
        return cls(decodes=(1, 4, 16), contexts=(64, 256), prefills=(32, 256), repeats=2)


@dataclass(slots=True)
class StepSample:
    """One timed step: what the cost model sees of the batch, and the seconds it took."""

    tokens: int
    features: tuple[int, ...]
    seconds: float
    kind: str  # "decode", "prefill" or "mixed": for the error table

    def to_json(self) -> list:
        return [self.kind, self.tokens, list(self.features), round(self.seconds, 7)]

    @classmethod
    def from_json(cls, row: list) -> StepSample:
        kind, tokens, features, seconds = row
        return cls(int(tokens), tuple(int(f) for f in features), float(seconds), str(kind))


class StepTimer:
    """Times every ``engine.step()`` and keeps what the cost model sees of its batch.

    While in use (a ``with`` block) it sits between the engine and its executor, so it sees
    each batch as the executor gets it; the duration is the whole step, scheduling and
    detokenization included, as the real engine's clock counts it."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.inner: Executor = engine.executor
        self.samples: list[StepSample] = []
        self._last: tuple[int, tuple[int, ...], str] | None = None

    def __enter__(self) -> Self:
        self.engine.executor = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.executor = self.inner

    def execute(self, batch: ScheduledBatch) -> StepResult:
        tokens, features = CalibratedCostModel.features(batch)
        decode = batch.num_decode_tokens
        kind = "decode" if decode == tokens else "prefill" if decode == 0 else "mixed"
        self._last = (tokens, features, kind)
        return self.inner.execute(batch)

    def step(self) -> list[RequestOutput]:
        self._last = None
        start = time.perf_counter()
        outputs = self.engine.step()
        seconds = time.perf_counter() - start
        if self._last is not None:
            tokens, features, kind = self._last
            self.samples.append(StepSample(tokens, features, seconds, kind))
        return outputs


def measure(
    llm: LLM, grid: Grid, progress: Callable[[str], None] | None = None, seed: int = 0
) -> list[StepSample]:
    """Run ``grid`` on ``llm``'s engine (which must be idle) and return every timed step."""
    engine = llm.engine
    if engine.has_unfinished:
        raise ValueError("the engine must be idle to be profiled")
    vocab = llm.executor.model_config.vocab_size
    rng = random.Random(seed)
    budget = engine.config.scheduler.max_num_batched_tokens
    max_seqs = engine.config.scheduler.max_num_seqs
    max_len = engine.config.scheduler.max_model_len
    ids = iter(range(1 << 62))

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    def add(tokens: list[int], max_tokens: int) -> str:
        rid = f"profile-{next(ids)}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(rid, tokens, params)
        return rid

    warm_up(engine)
    with StepTimer(engine) as timer:
        setups = [
            (d, c)
            for c in grid.contexts
            for d in grid.decodes
            if d * c <= grid.max_setup_tokens and d < max_seqs and c + 64 < max_len
        ]
        # In random order: if the machine speeds up or slows down during the profile (other
        # jobs come and go), that shows as noise spread over all shapes, not as a slope from
        # the first shapes to the last that the fit would read as how step time grows.
        rng.shuffle(setups)
        for i, (d, c) in enumerate(setups):
            if progress is not None:
                progress(f"[{i + 1}/{len(setups)}] {d} decoding at context {c}")
            # pure decode steps are most of a trace's steps and cheap to time: three times as many
            decode_steps = 3 * grid.repeats
            keep = decode_steps + len(grid.prefills) * (grid.repeats + 1) + 8  # steps to outlast
            prompts = [prompt(c) for _ in range(d)]
            running = [add(p, keep) for p in prompts]
            # their prefill steps are samples too: chunks of up to `budget` tokens
            while any(len(engine.requests[r].output_token_ids) == 0 for r in running):
                timer.step()
            for _ in range(decode_steps):
                timer.step()  # pure decode: d requests at context ~c
            for p in grid.prefills:
                if d + p > budget or c + p + 1 >= max_len:
                    continue
                for cached in (False, True):
                    # a cached newcomer reuses the first decoder's prompt, so it prefills p
                    # tokens after a c-token prefix: prefill attention over a long context
                    head = prompts[0][: c - c % engine.kv.block_size] if cached else []
                    for _ in range(grid.repeats if not cached else 1):
                        newcomer = add(head + prompt(p), 1)
                        timer.step()  # d decodes + the newcomer's whole prompt
                        engine.abort(newcomer)
            for rid in running:
                engine.abort(rid)
    return timer.samples


def warm_up(engine: LLMEngine) -> None:
    """Run a few shapes once so one-time costs (memory allocation, kernel selection) are paid
    before anything is timed. The prompts (token id 1 repeated) cannot match a real or
    synthesized prompt in the radix cache."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i, n in enumerate((512, 64, 8)):
        engine.add_request(f"warm-up-{i}", [1] * n, params)
    while engine.has_unfinished:
        engine.step()


def fit(samples: list[StepSample], info: dict) -> CalibratedCostModel:
    """Least squares on relative error (a 30 ms decode step matters as much as a 3 s prefill),
    with every coefficient kept >= 0: a negative price would let the fit trade one feature
    against another and predict nonsense outside the grid. ``f`` is free from knot to knot,
    not forced to grow: on this CPU a step of 2 decodes really is slower than one of 3 or 4."""
    import numpy as np

    if len(samples) < 8:
        raise ValueError(f"too few timed steps to fit a cost model ({len(samples)})")
    tokens = [s.tokens for s in samples]
    knots = _knots(tokens)
    features = np.array([s.features for s in samples], dtype=float)
    design = np.concatenate([_token_basis(knots, tokens), features], axis=1)
    seconds = np.array([s.seconds for s in samples])
    solution = _nonnegative_lstsq(design / seconds[:, None], np.ones_like(seconds))
    knot_times = solution[: len(knots)].tolist()
    coefficients = dict(zip(CalibratedCostModel.FEATURES, solution[len(knots) :].tolist()))
    model = CalibratedCostModel(knots, knot_times, coefficients, info)
    predicted = [model.predict(s.tokens, s.features) for s in samples]
    model.info["fit"] = fit_quality(samples, predicted)
    model.info["samples"] = [s.to_json() for s in samples]
    return model


def fit_quality(samples: list[StepSample], predicted: list[float]) -> dict:
    """Mean and worst relative error of the predictions, per kind of step."""
    out: dict[str, dict] = {}
    for kind in ("decode", "mixed", "prefill", "all"):
        errors = [
            abs(p - s.seconds) / s.seconds
            for s, p in zip(samples, predicted)
            if kind in ("all", s.kind)
        ]
        if errors:
            out[kind] = {
                "steps": len(errors),
                "mean_rel_error": sum(errors) / len(errors),
                "max_rel_error": max(errors),
            }
    return out


def _knots(tokens: list[int]) -> list[int]:
    """Token counts 1, 2, 3, 4, 6, 8, 12, 16, ... (each about 1.4x the last) up to the largest
    step, plus both ends; an inner knot is kept only if some step lies between its neighbours
    (an unsupported knot would be a free parameter). Small batches get a knot each: a CPU's
    matrix kernels can be slower at 2 rows than at 3, and a step of one decode is most of a
    quiet server's steps."""
    top = max(max(tokens), 2)
    ladder = {1, 2, 3, top}
    k = 4
    while k < top:
        ladder.update((k, k * 3 // 2))
        k *= 2
    candidates = sorted(x for x in ladder if x <= top)
    inner = [
        k
        for lo, k, hi in zip(candidates, candidates[1:], candidates[2:])
        if any(lo < t < hi for t in tokens)
    ]
    return [candidates[0], *inner, candidates[-1]]


def _token_basis(knots: list[int], tokens: list[int]):
    """One row per step: the weights ``f(tokens)`` gives each knot's time (two are nonzero)."""
    import numpy as np

    basis = np.zeros((len(tokens), len(knots)))
    for row, t in enumerate(tokens):
        i, u = interpolation_weight(knots, t)
        basis[row, i], basis[row, i + 1] = 1 - u, u
    return basis


def _nonnegative_lstsq(a, b):
    """Lawson–Hanson active-set non-negative least squares (numpy has none and scipy is not
    a dependency): minimise |a x - b| subject to x >= 0."""
    import numpy as np

    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(3 * n):
        gradient = a.T @ (b - a @ x)
        if passive.all() or gradient[~passive].max() <= 1e-12:
            break
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            bad = passive & (z <= 0)
            alpha = np.min(x[bad] / (x[bad] - z[bad]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x


def machine_info(llm: LLM) -> dict:
    """Where the numbers came from: a calibrated model is only true of this setup."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ex = llm.executor
    return {
        "model": llm.model_name,
        "device": ex.device.type,
        "dtype": str(ex.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def engine_info(llm: LLM) -> dict:
    """The engine settings profiled; ``yaie simulate --cost-model`` uses them by default."""
    cfg = llm.engine.config
    return {
        "num_blocks": cfg.num_blocks,
        "block_size": cfg.block_size,
        "max_num_seqs": cfg.scheduler.max_num_seqs,
        "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens,
        "max_model_len": cfg.scheduler.max_model_len,
        "kv_cache_memory": llm.args.kv_cache_memory,
    }


def profile(llm: LLM, grid: Grid, progress: Callable[[str], None] | None = None):
    """Measure and fit: the whole of ``yaie profile`` but the printing."""
    info = {"machine": machine_info(llm), "engine": engine_info(llm)}
    started = time.perf_counter()
    samples = measure(llm, grid, progress)
    info["profile_seconds"] = round(time.perf_counter() - started, 1)
    info["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return fit(samples, info)


def format_fit(model: CalibratedCostModel) -> Iterator[str]:
    """The table ``yaie profile`` prints: how well the fit matches the steps it measured."""
    yield f"{'steps':<10}{'count':>7}{'mean error':>13}{'worst':>9}"
    for kind, q in model.info["fit"].items():
        yield (f"{kind:<10}{q['steps']:>7}{q['mean_rel_error']:>13.1%}{q['max_rel_error']:>9.1%}")
    yield ""
    yield "step time = f(tokens) + per-feature costs"
    points = [f"{k}: {1000 * t:.1f}" for k, t in zip(model.knots, model.knot_times)]
    for i in range(0, len(points), 8):
        yield ("  f(tokens), ms: " if i == 0 else " " * 17) + ", ".join(points[i : i + 8])
    for name, c in model.coefficients.items():
        yield f"  {name:<16}{c * 1e6:>12.3f} µs each"
