"""numba.cuda support shared by every kernel: the numpy shim, availability, views, streams, codecs.

Import this module before anything else from numba: numba-cuda 0.30 uses ``numpy.row_stack``,
which numpy 2.5 removed, so the alias below must exist before numba compiles a kernel.

**How a kernel sees a torch tensor.** Kernels never see dtypes they cannot type: numba has no
bfloat16, so every activation reaches a kernel as raw bits. ``words(t)`` views the tensor's last
dim as 8-byte words (``int64`` to torch and numba, reinterpreted as ``uint64`` inside the
kernel): one load moves 4 bf16/fp16 values or 2 fp32 values, which is how these kernels get
wide, coalesced memory accesses out of numba, which cannot emit vector loads itself.
``elements(t)`` views it as one integer per value (``uint16``/``uint32``). Kernels turn bits
into float32 with ``unpack``/``load_element`` and back with ``pack``; all arithmetic is fp32.

- fp32: the bits are an IEEE float32 (``int_as_float``).
- bf16: a bfloat16 is the top half of a float32, so ``bits << 16`` *is* the float32; the way back
  rounds to nearest-even on the dropped 16 bits (``f32_to_bf16_bits``), as torch does.
- fp16: converted by libdevice's ``half2float`` / ``float2half_rn``.

Which conversion applies is the kernel's compile-time ``kind`` (``F32``, ``BF16``, ``F16``):
each op has one thin ``@cuda.jit`` kernel per dtype that calls a shared body with its ``kind``
constant. After inlining, the branches on ``kind`` fold away and the loops over a word's values
unroll, so each dtype gets straight-line code; numba's on-disk cache (``cache=True``) works for
such kernels, unlike for kernels built by a factory closure.

**Where kernels run.** On a CUDA tensor, a kernel launches on torch's current stream (through
``cuda.external_stream``), so it orders with torch's work and is captured by
``torch.cuda.graph``. Under ``NUMBA_ENABLE_CUDASIM=1`` there is no GPU: the same launch code
runs on CPU tensors, whose memory the simulated kernel reads and writes through numpy views,
so CI tests the kernels' logic against the torch references. The simulator runs kernels as Python, where
libdevice's functions are stubs, so the four bit conversions below have numpy twins there.
The simulator also swaps a fake ``cuda`` module into the globals of each function it calls,
racily across threads when the callee lives in another module, so the device functions here
never touch ``cuda.*``: thread-index and barrier code lives beside the kernels that use it.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np

if not hasattr(np, "row_stack"):  # numpy >= 2.5 removed it; numba-cuda 0.30 still calls it
    np.row_stack = np.vstack

import torch
from numba import cuda

try:  # numba-cuda keeps its own config; numba's built-in CUDA target reads numba's
    from numba.cuda.core import config as _cuda_config
except ImportError:
    from numba import config as _cuda_config

SIMULATOR: bool = bool(_cuda_config.ENABLE_CUDASIM)
"""True when ``NUMBA_ENABLE_CUDASIM=1`` was set before numba was first imported."""

# numba warns when a launch has fewer blocks than it deems enough to fill the GPU: every decode
# step of a small batch does, by design. Only that message is silenced.
warnings.filterwarnings("ignore", message=r".*Grid size \d+ will likely result in GPU under")

F32, BF16, F16 = 0, 1, 2
"""Compile-time storage kinds: how a kernel decodes the bits of one value."""

KINDS: dict[torch.dtype, int] = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}


@functools.cache
def gpu_available() -> bool:
    """Whether numba can launch kernels on a real GPU in this process."""
    return not SIMULATOR and bool(cuda.is_available())


def runs_here(t: torch.Tensor) -> bool:
    """Whether numba kernels can process ``t`` where it lives.

    CUDA tensors need a usable numba-cuda; CPU tensors qualify only in the simulator (tests).
    """
    return gpu_available() if t.is_cuda else SIMULATOR


def words_fit(t: torch.Tensor) -> bool:
    """Whether ``t`` can be viewed as 8-byte words along its last dim (see ``words``).

    Needs a contiguous last dim whose byte size, byte offset and every other stride are
    multiples of 8; model dims (hidden sizes, head dims) are multiples of 4 in practice.
    """
    if t.dim() == 0 or t.stride(-1) != 1 or t.dtype not in KINDS:
        return False
    ratio = 8 // t.element_size()
    return t.shape[-1] % ratio == 0 and all(
        s % ratio == 0 for s in (t.storage_offset(), *t.stride()[:-1])
    )


def _simulated(a: np.ndarray):
    """Simulator: wrap a numpy view of a CPU tensor as a "device" array without copying it.

    The kernel then reads and writes the tensor's own memory, strided views included (the
    simulator copies plain numpy arguments and refuses non-contiguous ones).
    """
    return cuda.devicearray.FakeCUDAArray(a)


def words(t: torch.Tensor):
    """``t [..., n]`` as ``[..., n * itemsize / 8]`` 8-byte words (``words_fit`` must hold)."""
    view = t.view(torch.int64)
    if t.is_cuda:
        return cuda.as_cuda_array(view)
    return _simulated(view.numpy().view(np.uint64))  # numpy's unsigned semantics, as on the GPU


def elements(t: torch.Tensor):
    """``t`` as one unsigned integer per value: uint16 for bf16/fp16, uint32 for fp32."""
    wide = t.element_size() == 4
    view = t.view(torch.int32 if wide else torch.int16)
    if t.is_cuda:
        return cuda.as_cuda_array(view)
    return _simulated(view.numpy().view(np.uint32 if wide else np.uint16))


def integers(t: torch.Tensor):
    """An integer tensor (positions, slot mapping) as a numba array, no copy."""
    return cuda.as_cuda_array(t) if t.is_cuda else _simulated(t.numpy())


@functools.lru_cache(maxsize=8)
def _external_stream(handle: int):
    return cuda.external_stream(handle)


def stream_for(t: torch.Tensor):
    """The stream to launch on: torch's current stream for CUDA tensors, 0 in the simulator.

    Launching on torch's stream keeps kernels ordered with torch ops without synchronizing,
    and makes them part of a ``torch.cuda.graph`` capture. Stream objects are cached per
    handle: building one costs host time on every launch otherwise.
    """
    if not t.is_cuda:
        return 0
    return _external_stream(torch.cuda.current_stream(t.device).cuda_stream)


def pow2_threads(work: int, lo: int = 32, hi: int = 256) -> int:
    """A power-of-two block size in ``[lo, hi]`` that covers ``work`` items where it can.

    Powers of two keep the shared-memory tree reduction simple, and 32 is one warp.
    """
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(work, 1))))))


# --- bit conversions ----------------------------------------------------------------------------

if SIMULATOR:

    @cuda.jit(device=True)
    def bits_to_f32(bits):
        """The float32 whose IEEE bits are ``bits`` (uint32)."""
        return np.uint32(bits).view(np.float32)

    @cuda.jit(device=True)
    def f32_to_bits(value):
        """The IEEE bits of float32 ``value`` as uint32."""
        return np.float32(value).view(np.uint32)

    @cuda.jit(device=True)
    def f16_bits_to_f32(bits):
        """The float32 value of the fp16 whose bits are ``bits``."""
        return np.float32(np.uint16(bits).view(np.float16))

    @cuda.jit(device=True)
    def f32_to_f16_bits(value):
        """``value`` rounded to fp16 (nearest-even), as uint16 bits."""
        return np.float16(value).view(np.uint16)

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def bits_to_f32(bits):
        """The float32 whose IEEE bits are ``bits`` (uint32)."""
        return libdevice.int_as_float(np.int32(bits))

    @cuda.jit(device=True)
    def f32_to_bits(value):
        """The IEEE bits of float32 ``value`` as uint32."""
        return np.uint32(libdevice.float_as_int(value))

    @cuda.jit(device=True)
    def f16_bits_to_f32(bits):
        """The float32 value of the fp16 whose bits are ``bits``."""
        return libdevice.half2float(np.int16(bits))

    @cuda.jit(device=True)
    def f32_to_f16_bits(value):
        """``value`` rounded to fp16 (nearest-even), as uint16 bits."""
        return np.uint16(libdevice.float2half_rn(value))


@cuda.jit(device=True)
def f32_to_bf16_bits(value):
    """``value`` rounded to bfloat16 (nearest, ties to even), as bits in a uint32.

    Adding ``0x7FFF`` plus the lowest kept bit before dropping the low 16 bits rounds to
    nearest-even; NaN is returned as a quiet NaN instead, since the carry could turn a NaN
    with low payload bits into infinity. Both are computed and one selected, without a branch.
    """
    bits = f32_to_bits(value)
    rounded = np.uint32(
        (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    )
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.uint32(0x7FC0) if is_nan else rounded


@cuda.jit(device=True)
def per_word(kind):
    """How many values one 8-byte word holds."""
    return 2 if kind == F32 else 4


@cuda.jit(device=True)
def unpack(word, j, kind):
    """Value ``j`` of a uint64 ``word`` as float32 (value 0 in the low bits: little-endian)."""
    if kind == F32:
        return bits_to_f32(np.uint32((word >> np.uint64(32 * j)) & np.uint64(0xFFFFFFFF)))
    bits = np.uint32((word >> np.uint64(16 * j)) & np.uint64(0xFFFF))
    if kind == BF16:
        return bits_to_f32(bits << np.uint32(16))
    return f16_bits_to_f32(np.uint16(bits))


@cuda.jit(device=True)
def pack(value, j, kind):
    """float32 ``value`` rounded to ``kind`` and shifted into slot ``j`` of a uint64 word.

    A word is built by or-ing ``pack`` of each of its values into zero.
    """
    if kind == F32:
        return np.uint64(f32_to_bits(value)) << np.uint64(32 * j)
    if kind == BF16:
        return np.uint64(f32_to_bf16_bits(value)) << np.uint64(16 * j)
    return np.uint64(f32_to_f16_bits(value)) << np.uint64(16 * j)


@cuda.jit(device=True)
def load_element(bits, kind):
    """One value read through ``elements`` (uint16 or uint32 bits) as float32."""
    if kind == F32:
        return bits_to_f32(np.uint32(bits))
    if kind == BF16:
        return bits_to_f32(np.uint32(np.uint16(bits)) << np.uint32(16))
    return f16_bits_to_f32(np.uint16(bits))
