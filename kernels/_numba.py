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
  rounds to nearest-even (``f32_to_bf16_bits``), as torch does: on the GPU one ``cvt.rn.bf16.f32``
  instruction, emitted as inline PTX since numba has no bfloat16 conversion of its own.
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
libdevice's functions are stubs, so the bit conversions below have numpy twins there.
The simulator also swaps a fake ``cuda`` module into the globals of each function it calls,
racily across threads when the callee lives in another module, so the device functions here
never read ``cuda.*`` through this module's globals: most need no thread index or barrier,
and ``xor_shuffle``'s simulator twin asks the simulator for the running launch's module.
"""

from __future__ import annotations

import functools
import math
import os
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

NEG_SCORE = np.float32(-1.0e30)
"""Masked attention scores and running-maximum starts: finite, so ``2^(m - m')`` of two empty
softmax states is 1, not NaN."""

F32, BF16, F16 = 0, 1, 2
"""Compile-time storage kinds: how a kernel decodes the bits of one value."""

KINDS: dict[torch.dtype, int] = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}


KERNELS_ENV = "YAIE_KERNELS"
"""``YAIE_KERNELS=torch`` turns the numba kernels off: every dispatch function then runs its torch
reference, on CUDA tensors too (to compare the two paths end to end, or to rule the kernels out
when chasing a bug). Read once per process, by ``gpu_available``."""


@functools.cache
def gpu_available() -> bool:
    """Whether numba kernels launch on a real GPU in this process (see ``KERNELS_ENV``)."""
    if SIMULATOR or os.environ.get(KERNELS_ENV, "numba") == "torch":
        return False
    return bool(cuda.is_available())


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


def flat_words(t: torch.Tensor) -> tuple[object, tuple[int, ...]]:
    """``t`` (``words_fit`` must hold) as one flat array of 8-byte words running from its first
    element to its last, and the strides (in words) of its leading dims.

    Element ``(i, j, .., w)`` is word ``i * strides[0] + j * strides[1] + .. + w``: a kernel
    that indexes a flat contiguous array pays one add per access, where a strided view costs a
    multiply per index and dim (numba cannot know that the last stride is one word).
    """
    ratio = 8 // t.element_size()
    span = 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return words(t.as_strided((span,), (1,))), tuple(s // ratio for s in t.stride()[:-1])


def elements(t: torch.Tensor):
    """``t`` as one unsigned integer per value: uint16 for bf16/fp16, uint32 for fp32."""
    wide = t.element_size() == 4
    view = t.view(torch.int32 if wide else torch.int16)
    if t.is_cuda:
        return cuda.as_cuda_array(view)
    return _simulated(view.numpy().view(np.uint32 if wide else np.uint16))


def array_view(t: torch.Tensor):
    """Any tensor (float32 scratch, int32 tables) as a numba array of its own dtype, no copy:
    a device array view, or in the simulator the tensor's numpy view."""
    return cuda.as_cuda_array(t) if t.is_cuda else t.numpy()


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


_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters for kernels whose last-arriving block merges the others' results
    (split-KV decode, the argmax), kept per device. The merging block leaves its counter at
    zero again, so one buffer serves every launch of every such kernel. It is made (or grown)
    on the first launches, the eager warm-up before any CUDA graph capture, never inside one.
    Launches share it, so they must be ordered: the engine runs them on one stream."""
    counters = _ARRIVALS.get(device)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _ARRIVALS[device] = counters
    return counters


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

    @cuda.jit(device=True)
    def f32_to_bf16_bits(value):
        """``value`` rounded to bfloat16 (nearest, ties to even), as bits in a uint32.

        Adding ``0x7FFF`` plus the lowest kept bit before dropping the low 16 bits rounds to
        nearest-even; NaN is returned as a quiet NaN instead, since the carry could turn a
        NaN with low payload bits into infinity (or the GPU's canonical NaN ``0x7FFFFFFF``
        into -0). The GPU does all of this in one instruction (below).
        """
        bits = f32_to_bits(value)
        rounded = np.uint32(
            (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
            >> np.uint32(16)
        )
        is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        return np.uint32(0x7FC0) if is_nan else rounded

    @cuda.jit(device=True)
    def load_word(array, i):
        """Word ``i`` of a flat word array (the GPU version's twin: a plain load here)."""
        return array[i]

    from numba.cuda.simulator.kernel import _get_kernel_context

    @cuda.jit(device=True)
    def xor_shuffle(value, offset):
        """``value`` of lane ``lane ^ offset``, through shared memory: the simulator has no
        shuffles (every thread of the block must call it). The simulated ``cuda`` module is
        the running launch's, fetched here rather than read from this module's globals,
        which the simulator swaps racily (see the module docstring)."""
        sim = _get_kernel_context()
        scratch = sim.shared.array(1024, np.float32)
        tid = sim.threadIdx.x
        scratch[tid] = value
        sim.syncthreads()
        other = scratch[tid ^ offset]
        sim.syncthreads()
        return np.float32(other)

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import libdevice

    try:  # numba-cuda
        from numba.cuda.extending import intrinsic
    except ImportError:  # numba's built-in CUDA target
        from numba.core.extending import intrinsic

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

    @intrinsic
    def _cvt_rn_bf16(typingctx, value):
        """PTX ``cvt.rn.bf16.f32``: float32 to bfloat16 bits, nearest-even, NaN kept NaN."""

        def codegen(context, builder, signature, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.IntType(16), [ir.FloatType()]),
                               "cvt.rn.bf16.f32 $0, $1;", "=h,f")
            return builder.call(asm, args)

        return types.uint16(types.float32), codegen

    @cuda.jit(device=True)
    def f32_to_bf16_bits(value):
        """``value`` rounded to bfloat16 (nearest, ties to even), as bits in a uint32: one
        hardware conversion (sm_80 and later), where the bit arithmetic of the simulator's
        twin takes six instructions, a cost every bf16 output value of every kernel pays."""
        return np.uint32(_cvt_rn_bf16(np.float32(value)))

    @intrinsic
    def load_word(typingctx, array, index):
        """Word ``index`` of a flat (1-D, contiguous) word array, as a load the compilers
        must issue where the source puts it (``ld.volatile``).

        Compilers sink a load towards its first use, and drop it from paths that don't use
        it: past a branch whose condition needs another load, the two round trips to memory
        then run one after the other. A volatile load is neither moved nor dropped, so it is
        in flight together with the loads before it.
        """

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            ptr = builder.gep(data, [args[1]])
            asm = ir.InlineAsm(ir.FunctionType(ir.IntType(64), [ptr.type]),
                               "ld.volatile.global.b64 $0, [$1];", "=l,l", side_effect=True)
            return builder.call(asm, [ptr])

        return types.uint64(array, index), codegen

    @cuda.jit(device=True)
    def xor_shuffle(value, offset):
        """``value`` of lane ``lane ^ offset`` (a butterfly step over the full warp)."""
        return cuda.shfl_xor_sync(0xFFFFFFFF, value, offset)


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
def rounded(value, kind):
    """float32 ``value`` rounded to ``kind`` and back: what storing and reloading it would give
    (fused kernels round where the unfused ops store, so both compute the same function)."""
    return unpack(pack(value, 0, kind), 0, kind)


@cuda.jit(device=True)
def load_element(bits, kind):
    """One value read through ``elements`` (uint16 or uint32 bits) as float32."""
    if kind == F32:
        return bits_to_f32(np.uint32(bits))
    if kind == BF16:
        return bits_to_f32(np.uint32(np.uint16(bits)) << np.uint32(16))
    return f16_bits_to_f32(np.uint16(bits))
