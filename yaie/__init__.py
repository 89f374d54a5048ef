"""YAIE — Yet Another Inference Engine."""

__version__ = "0.1.0"
