"""YAIE — Yet Another Inference Engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from yaie.core.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]

if TYPE_CHECKING:
    from yaie.llm import LLM


def __getattr__(name: str):
    # Lazy: `import yaie` stays light (no torch) for the simulator and the core.
    if name == "LLM":
        from yaie.llm import LLM

        return LLM
    raise AttributeError(name)
