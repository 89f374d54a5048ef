"""``yaie.LLM``: the offline API — load a model, generate from prompts or chats.

It wires the parts together: model resolution and loading, the tokenizer (text ↔ ids, chat
template, stop ids), a ``ModelExecutor``, and an ``LLMEngine`` on the real clock. Servers and
the chat app build on the same object.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from yaie.args import EngineArgs
from yaie.core.engine import LLMEngine, RequestOutput
from yaie.core.metrics import RequestMetrics
from yaie.core.request import FinishReason, Request
from yaie.core.sampling import SamplingParams
from yaie.detokenizer import IncrementalDetokenizer
from yaie.executor.model_executor import ModelExecutor
from yaie.hub import resolve_model
from yaie.model.loader import load_generation_config
from yaie.tokenizer import (
    apply_chat_template,
    eos_token_ids,
    load_tokenizer,
    read_chat_template,
    use_chat_template,
)

logger = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, Any]]
Prompt = Union[str, list[int], Messages]


@dataclass(slots=True)
class Completion:
    """One finished choice of one prompt."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[tuple[float, dict[int, float]] | None] = field(default_factory=list)
    metrics: RequestMetrics | None = None


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.args = EngineArgs(model=model, **engine_args)
        args = self.args
        chat_template = read_chat_template(args.chat_template) if args.chat_template else None
        self.resolved = resolve_model(args.model, allow_pickle=args.allow_pickle)
        self.tokenizer = load_tokenizer(self.resolved)
        self.executor = ModelExecutor.load(self.resolved, args)
        hf_config = self.executor.hf_config
        mc = self.executor.model_config
        use_chat_template(self.tokenizer, mc.architecture, chat_template)
        self.max_model_len = args.context_limit(mc.max_position_embeddings)
        eos = eos_token_ids(self.tokenizer, hf_config, load_generation_config(self.resolved))
        config = args.engine_config(
            mc.max_position_embeddings, self.executor.plan.num_blocks, frozenset(eos)
        )
        self.engine = LLMEngine(config, self.executor, time.monotonic, self._text_stream)
        self._ids = itertools.count()

    @property
    def model_name(self) -> str:
        return self.resolved.name

    def _text_stream(self, req: Request) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, stop=req.sampling_params.stop)

    def encode(self, prompt: Prompt) -> list[int]:
        """Text → ids (with the tokenizer's BOS), chat messages → ids via the chat template."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and isinstance(prompt[0], Mapping):
            return apply_chat_template(self.tokenizer, prompt)
        return list(prompt)

    def add(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one prompt; returns its request id (use ``engine.step()`` or ``stream``)."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        self.engine.add_request(rid, self.encode(prompt), params or SamplingParams())
        return rid

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        progress: bool = False,
    ) -> list[Completion]:
        """Run every prompt (batched by the engine) to completion; one ``Completion`` per
        choice, in prompt order. A single prompt may be given without a list."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, Mapping))):
            prompts = [prompts]
        params = params or SamplingParams()
        results: dict[tuple[str, int], Completion] = {}
        order = []
        for prompt in prompts:
            ids = self.encode(prompt)
            rid = f"req-{next(self._ids)}"
            self.engine.add_request(rid, ids, params)
            for i in range(params.n):
                results[(rid, i)] = Completion(rid, i, ids)
                order.append((rid, i))
        bar = _progress(len(order)) if progress else None
        while self.engine.has_unfinished:
            for out in self.engine.step():
                done = self._absorb(results[(out.parent_id, out.index)], out)
                if done and bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [results[key] for key in order]

    def chat(self, messages: Messages, params: SamplingParams | None = None) -> Completion:
        return self.generate([messages], params)[0]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield this request's outputs (text deltas) as they come; the engine is driven here,
        so other queued requests advance too. Closing the iterator aborts the request."""
        rid = self.add(prompt, params)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.parent_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(rid)

    @staticmethod
    def _absorb(completion: Completion, out: RequestOutput) -> bool:
        completion.token_ids += out.new_token_ids
        completion.text += out.text
        if out.logprobs:
            completion.logprobs += out.logprobs
        if out.finished:
            completion.finish_reason = out.finish_reason.value if out.finish_reason else None
            completion.error = out.error
            completion.metrics = out.metrics
            if out.finish_reason is FinishReason.ERROR:
                logger.error("request %s failed: %s", out.request_id, out.error)
        return out.finished


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")
