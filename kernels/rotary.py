"""Rotary position embedding (RoPE), including Llama-3 frequency scaling.

The cache is one table per model, indexed by position (see ``build_cos_sin_cache``); a step looks
rows up by position, so a ragged batch (prefill chunks and decodes mixed) needs no special
casing.

Two layouts pair the channels that rotate together: NeoX / Hugging Face Llama ("rotate halves":
channel ``i`` with ``i + D/2``) and GPT-J (interleaved: ``2i`` with ``2i + 1``).
"""

from __future__ import annotations

import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _inv_freq(head_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    """Per-pair rotation frequencies, computed in fp32 exactly as Hugging Face does.

    Matching HF's fp32 arithmetic keeps our angles bit-identical to the reference models.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise ValueError(
        f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: slow down low frequencies by ``factor``, keep high ones, blend between.

    Wavelengths longer than the original context divided by ``low_freq_factor`` were never seen
    whole in pre-training, so they are stretched; those shorter than the original context divided
    by ``high_freq_factor`` carry local order and stay; the band between is interpolated.
    """
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_cos_sin_cache(
    head_dim: int,
    max_pos: int,
    base: float,
    rope_scaling: dict | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``[max_pos, 2, head_dim]`` table: per position, ``cos`` and signed ``sin`` at full width.

    Row ``p`` is ``[[cos a, cos a], [-sin a, sin a]]`` for the ``head_dim / 2`` angles
    ``a = p * f``, laid out for NeoX (rotate-halves) pairing; GPT-J pairing reads the same row
    through a strided view. Storing both halves pre-expanded and pre-signed costs 2x the memory
    of a plain cos/sin table but turns a rotation into ``x * cos + partner(x) * sin``: three
    tensor ops instead of five, which matters at one op per layer per step.

    ``rope_scaling`` is a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict (``rope_type``
    or legacy ``type`` key) or ``None``; an unknown type raises ``ValueError``. Built in fp32 and
    cast to ``dtype`` at the end, as HF casts cos/sin to the activation dtype.
    """
    inv_freq = _inv_freq(head_dim, base, rope_scaling)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    table = torch.stack((torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)), dim=1)
    return table.to(dtype)


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> None:
    """``x [T, H, D] = x * cos + partner(x) * sin`` in place, ``partner`` swapping each pair.

    NeoX pairs channel ``i`` with ``i + D/2``, so the partner is ``x`` with its halves swapped
    and ``cos``/``sin`` (``[T, 1, D]``) apply as stored. GPT-J pairs ``2i`` with ``2i + 1``:
    both ``x`` and the tables are viewed as ``[.., D/2, 2]`` (the tables transposed from
    halves to pairs) and the partner swaps within each pair.
    """
    half = x.shape[-1] // 2
    if is_neox:
        partner = x.roll(half, dims=-1)
    else:
        x = x.unflatten(-1, (half, 2))
        partner = x.flip(-1)
        cos = cos.unflatten(-1, (2, half)).transpose(-1, -2)
        sin = sin.unflatten(-1, (2, half)).transpose(-1, -2)
    x.mul_(cos).addcmul_(partner, sin)


def apply_rotary_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` in place by the angles of ``positions [T]``.

    ``q`` and ``k`` may be strided views (e.g. slices of a fused QKV projection) as long as
    their last dim is contiguous.
    """
    cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(-2).unbind(1)
    _rotate_(q, cos, sin, is_neox)
    _rotate_(k, cos, sin, is_neox)


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """The model's entry point; every device runs the torch reference for now."""
    apply_rotary_reference(positions, q, k, cos_sin_cache, is_neox)
