"""How long a step takes: the ``CostModel`` protocol, an analytic roofline model, and a
calibrated model fitted to the real executor's measured step times (``CalibratedCostModel``).

A step of a decoder is a chain of operators, each bounded either by arithmetic (FLOPs / peak
FLOP/s) or by memory traffic (bytes / bandwidth): whichever is larger is its time (the roofline).
Decode steps are memory-bound — every step streams all the weights and each request's KV cache —
while prefill chunks are compute-bound, which is why mixing them in one batch is nearly free for
the decodes. The model below adds up per-operator rooflines over one ``ScheduledBatch``:

- linear layers (QKV, output, gate/up, down; each max(FLOPs/peak, (weights + activations)/bw)),
- attention over the paged cache: prefill chunks pay causal FLOPs including the cached prefix
  they attend to; decodes pay reading their whole K/V,
- norms, rotary, SiLU-and-mul, residuals, the KV write: pure memory traffic per token,
- the LM head and sampling, only for the rows that sample,
- a fixed per-step overhead (host work, launches).

It runs once per simulated step, so it is O(1) for a pure-decode step and O(requests)
otherwise, with every per-token coefficient computed once in ``__init__``. A roofline knows only
peaks; the calibrated model below knows what this executor on this machine really takes.
"""

from __future__ import annotations

import bisect
import json
import operator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from yaie.core.batch import ScheduledBatch
from yaie.simulator.hardware import HardwareSpec

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


class CostModel(Protocol):
    """Predicts the wall time of one step of the real executor."""

    def step_time(self, batch: ScheduledBatch) -> float: ...


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """The shape of a Llama-family decoder: all a cost model needs to know of a model."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "custom") -> ModelSpec:
        """Read a Hugging Face ``config.json`` dict (Llama, Qwen2/3, Mistral, SmolLM...)."""
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            return cls(
                name=config.get("_name_or_path") or name,
                num_layers=int(config["num_hidden_layers"]),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                dtype_bytes=_DTYPE_BYTES.get(str(config.get("torch_dtype", "bfloat16")), 2),
            )
        except KeyError as exc:
            raise ValueError(
                f"the model config has no {exc.args[0]!r}: not a decoder config.json"
            ) from None

    @property
    def num_params(self) -> int:
        per_layer = self._linear_params + 2 * self.hidden_size  # + two RMSNorm weights
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * per_layer + embed + head + self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def _linear_params(self) -> int:
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        return h * (q + 2 * kv) + q * h + 2 * h * i + i * h


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 49152, 8192, True),
    "qwen3-0.6b": ModelSpec("Qwen3-0.6B", 28, 1024, 16, 8, 128, 3072, 151936, 40960, True),
    "llama-3.1-8b": ModelSpec("Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 128256, 131072, False),
}


def get_model(name_or_path: str) -> ModelSpec:
    """A built-in name, or a path to a ``config.json`` (or a folder holding one)."""
    key = name_or_path.lower()
    if key in MODELS:
        return MODELS[key]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"unknown model {name_or_path!r}: use one of {', '.join(MODELS)} "
            "or a path to a config.json"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg})") from None
    return ModelSpec.from_hf_config(config, name=path.parent.name)


def num_kv_blocks(model: ModelSpec, hw: HardwareSpec, block_size: int) -> int:
    """KV blocks that fit beside the weights (what a real engine's memory profiling finds)."""
    per_block = model.kv_bytes_per_token() * block_size
    budget = hw.kv_budget(model.weight_bytes)
    blocks = int(budget // per_block)
    if blocks < 1:
        raise ValueError(
            f"{model.name} ({model.weight_bytes / 2**30:.1f} GiB of weights) leaves no memory for "
            f"the KV cache on {hw.name}; pick a larger device or pass --num-blocks"
        )
    return blocks


class RooflineCostModel:
    """Per-operator roofline of one step of ``model`` on ``hw`` (see the module docstring)."""

    PARTS = (
        "linear",
        "attention_prefill",
        "attention_decode",
        "elementwise",
        "lm_head",
        "sampling",
        "overhead",
    )

    def __init__(self, model: ModelSpec, hw: HardwareSpec) -> None:
        self.model, self.hw = model, hw
        L, dt = model.num_layers, model.dtype_bytes
        h, i = model.hidden_size, model.intermediate_size
        q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
        self._peak, self._bw = hw.peak_flops, hw.mem_bandwidth
        # Linear layers as (weight bytes, FLOPs per token, activation bytes per token), summed
        # over layers: (in, out) = QKV (h, q+2kv), O (q, h), gate_up (h, 2i), down (i, h).
        self._linears = [
            (L * fan_in * fan_out * dt, 2 * L * fan_in * fan_out, L * (fan_in + fan_out) * dt)
            for fan_in, fan_out in ((h, q + 2 * kv), (q, h), (h, 2 * i), (i, h))
        ]
        # Attention: 2 FLOPs per multiply-add, QK^T and PV, per (query, key) pair per layer.
        self._attn_flops_pair = 4 * L * model.num_heads * model.head_dim
        self._kv_bytes_token = L * 2 * kv * dt  # read (or write) one token's K and V, all layers
        self._qo_bytes_token = L * 2 * q * dt  # read Q, write the attention output
        # Two RMSNorms and two residual adds (read + write h each, the adds read two), rotary on
        # q and k, SiLU-and-mul (read 2i, write i), the KV write; plus embedding and final norm.
        self._elem_bytes_token = (L * (4 * h + 6 * h + 2 * (q + kv) + 3 * i + 2 * kv) + 3 * h) * dt
        v = model.vocab_size
        self._head_weight_bytes = v * h * dt
        self._head_flops_row = 2 * h * v
        self._logit_bytes_row = 4 * v  # fp32 logits
        self._overhead = hw.step_overhead
        self._linear_time: dict[int, float] = {}

    def step_time(self, batch: ScheduledBatch) -> float:
        return sum(self._parts(batch))

    def breakdown(self, batch: ScheduledBatch) -> dict[str, float]:
        """Seconds per operator group; their sum is ``step_time``."""
        return dict(zip(self.PARTS, self._parts(batch)))

    def _parts(self, batch: ScheduledBatch) -> tuple[float, ...]:
        peak, bw = self._peak, self._bw
        tokens = len(batch.token_ids)
        linear = self._linear_time.get(tokens)
        if linear is None:  # depends on the token count alone: computed once per count
            linear = self._linear_time[tokens] = sum(
                max(tokens * flops_tok / peak, (weights + tokens * act_tok) / bw)
                for weights, flops_tok, act_tok in self._linears
            )

        pair, kv_tok, qo_tok = self._attn_flops_pair, self._kv_bytes_token, self._qo_bytes_token
        work = attention_work(batch)
        prefill = (
            max(
                pair * work.prefill_pairs / peak,
                (work.prefill_context * kv_tok + work.prefill_tokens * qo_tok) / bw,
            )
            if work.prefill_tokens
            else 0.0
        )
        ctx, n = work.decode_context, work.decodes
        decode = max(pair * ctx / peak, (ctx * kv_tok + n * qo_tok) / bw) if n else 0.0

        rows = len(batch.sample_indices)
        elementwise = tokens * self._elem_bytes_token / bw
        if rows:
            lm_head = max(
                rows * self._head_flops_row / peak,
                (self._head_weight_bytes + rows * self._logit_bytes_row) / bw,
            )
            sampling = 3 * rows * self._logit_bytes_row / bw  # softmax, top-k/p passes
        else:
            lm_head = sampling = 0.0
        return linear, prefill, decode, elementwise, lm_head, sampling, self._overhead


@dataclass(slots=True)
class AttentionWork:
    """What attention has to do in one step, in tokens: both cost models price it."""

    decodes: int = 0  # requests with one new token
    decode_context: int = 0  # tokens of K/V those decodes read
    prefills: int = 0  # prompt chunks (requests with several new tokens)
    prefill_tokens: int = 0
    prefill_context: int = 0  # K/V tokens the chunks attend over, cached prefix included
    prefill_pairs: int = 0  # causal (query, key) pairs of the chunks


def attention_work(batch: ScheduledBatch) -> AttentionWork:
    """O(1) for a pure-decode step (the common one), O(requests) otherwise."""
    if batch.num_prefill_tokens == 0:
        return AttentionWork(len(batch.seq_lens), sum(batch.seq_lens))
    work = AttentionWork()
    for r in batch.requests:
        n = r.num_new_tokens
        if n == 1:
            work.decodes += 1
            work.decode_context += r.start_pos + 1
        else:  # causal: each new token attends to the cached prefix and to its left
            work.prefills += 1
            work.prefill_tokens += n
            work.prefill_context += r.start_pos + n
            work.prefill_pairs += n * r.start_pos + n * (n + 1) // 2
    return work


COST_MODEL_FORMAT = "yaie-calibrated-cost-model"


class CalibratedCostModel:
    """Step times fitted to the real executor's (``yaie profile`` measures and fits them).

    ``t = f(tokens) + Σ coefficient × feature``. ``f`` is piecewise linear in the step's token
    count between ``knots`` (extended linearly past the last one): it carries everything that
    depends on the number of tokens alone — the weight GEMMs, which on any device are flat
    while memory-bound and then grow once compute-bound, plus the fixed per-step cost. The
    features price what the token count does not tell: attention (decode K/V read, prefill
    pairs and context), per-request host work, and the LM head and sampler per sampled row.
    Evaluating it is pure Python: the simulate path never imports numpy or torch.
    """

    FEATURES = (
        "requests",
        "decode_context",
        "prefills",
        "prefill_context",
        "prefill_pairs",
        "sampled_rows",
    )

    def __init__(
        self, knots: list[int], knot_times: list[float], coefficients: dict[str, float], info: dict
    ) -> None:
        if len(knots) < 2 or len(knots) != len(knot_times) or knots != sorted(set(knots)):
            raise ValueError("a calibrated cost model needs >= 2 increasing knots, one time each")
        unknown = set(coefficients) - set(self.FEATURES)
        if unknown:
            raise ValueError(f"unknown cost model features: {', '.join(sorted(unknown))}")
        self.knots, self.knot_times = knots, knot_times
        self.coefficients = {name: float(coefficients.get(name, 0.0)) for name in self.FEATURES}
        self._weights = tuple(self.coefficients.values())
        self.info = info  # what was profiled, where, and how well the fit matches
        self._token_time: dict[int, float] = {}

    @staticmethod
    def features(batch: ScheduledBatch) -> tuple[int, tuple[int, ...]]:
        """The step's token count and its ``FEATURES`` in order: what the fit sees."""
        work = attention_work(batch)
        return len(batch.token_ids), (
            len(batch.requests),
            work.decode_context,
            work.prefills,
            work.prefill_context,
            work.prefill_pairs,
            len(batch.sample_indices),
        )

    def token_time(self, tokens: int) -> float:
        """``f(tokens)``: linear interpolation between the knots, linear extrapolation beyond."""
        t = self._token_time.get(tokens)
        if t is None:
            t = self._token_time[tokens] = interpolate(self.knots, self.knot_times, tokens)
        return t

    def step_time(self, batch: ScheduledBatch) -> float:
        return self.predict(*self.features(batch))

    def predict(self, tokens: int, features: tuple[int, ...]) -> float:
        """The step time from ``features(batch)``'s two parts."""
        return max(0.0, self.token_time(tokens) + sum(map(operator.mul, self._weights, features)))

    def scaled(self, factor: float) -> CalibratedCostModel:
        """The same model with every step ``factor`` times as long (a slower machine)."""
        return CalibratedCostModel(
            self.knots,
            [factor * t for t in self.knot_times],
            {name: factor * c for name, c in self.coefficients.items()},
            self.info,
        )

    def to_json(self) -> dict:
        return {
            "format": COST_MODEL_FORMAT,
            "version": 1,
            "knots": self.knots,
            "knot_times_s": self.knot_times,
            "coefficients_s": self.coefficients,
            **self.info,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CalibratedCostModel:
        """Read a ``yaie profile`` JSON file; a wrong or damaged file is one clear error."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"cost model file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a JSON file ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != COST_MODEL_FORMAT:
            raise ValueError(f"{path} is not a cost model written by `yaie profile`")
        try:
            info = {
                k: v
                for k, v in data.items()
                if k not in ("format", "version", "knots", "knot_times_s", "coefficients_s")
            }
            return cls(
                [int(k) for k in data["knots"]],
                [float(t) for t in data["knot_times_s"]],
                dict(data["coefficients_s"]),
                info,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: damaged cost model ({exc})") from None


def interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through the points, continued linearly past either end."""
    i, u = interpolation_weight(xs, x)
    return ys[i] + (ys[i + 1] - ys[i]) * u


def interpolation_weight(xs: list[int], x: float) -> tuple[int, float]:
    """``(i, u)`` with ``y(x) = (1 - u) * ys[i] + u * ys[i + 1]``; ``u`` leaves [0, 1] outside
    the points (linear extrapolation). The fit in ``profile.py`` builds its basis from this."""
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


def with_dtype(model: ModelSpec, dtype_bytes: int) -> ModelSpec:
    """The same model served at another precision (fp32 on CPU, bf16 on GPUs)."""
    return model if model.dtype_bytes == dtype_bytes else replace(model, dtype_bytes=dtype_bytes)
