"""YAIE's compute ops: one module per op, each with a torch reference and one dispatch function.

The model calls only the dispatch functions re-exported here. Each reference is plain torch and
is also the CPU path wherever the numba CPU kernels below don't apply; CUDA kernels
(numba.cuda) slot in behind the same dispatch functions and are tested against the references.
Ops: ``rms_norm`` / ``fused_add_rms_norm``, ``layer_norm`` / ``fused_add_layer_norm`` (GPT-2),
``apply_rotary`` (with ``build_cos_sin_cache``), ``silu_and_mul``, ``gelu_tanh`` (GPT-2),
``write_kv``, ``rotary_write_kv`` (q/k norm + rotary + ``write_kv`` in one kernel),
``paged_attention``, ``rotary_paged_attention`` (the two, the Llama family's path: one decode
kernel for decode-only CUDA steps), ``copy_blocks`` (copy-on-write), ``argmax`` (greedy
sampling over the vocabulary), ``greedy_argmax`` (with ``bf16_screen``: greedy tokens from the
LM head without its fp32 logits, on the CPU), and ``linear`` (GEMMs
stay on torch: cuBLAS on CUDA, oneDNN on packed weights on the CPU, except decodes: up to 64
rows on weights from a Q4_1 or Q8_0 GGUF take the quantized kernel of
``yaie.kernels.grid_linear``, 1-2 rows on other fp32 weights the numba GEMV of
``yaie.kernels.linear``) with ``linear_partials``, its split-K
form for CUDA projections of a few rows whose sum the residual add takes in
(``fused_add_rms_norm`` accepts ``[S, T, H]`` partial sums). On fp32 CPU tensors the elementwise ops
(RMSNorm alone and fused, rotary, ``rotary_write_kv``, SiLU-and-mul) run numba CPU kernels
(``yaie.kernels.elementwise_cpu``), and decodes attend in one
(``yaie.kernels.decode_attention_cpu``); greedy rows get their token from a bf16 screen of the
LM head confirmed in fp32 (``yaie.kernels.greedy_head``, on CPUs with AVX512-BF16).
``yaie.kernels.cpu`` holds what the CPU path needs of
the process: heap reuse (``keep_freed_memory``) and how numba kernels launch (``run_parallel``).
On CUDA the numba kernels run wherever they support the operands; ``YAIE_KERNELS=torch`` makes
every op run its torch reference instead (``yaie.kernels._numba.KERNELS_ENV``).

KV cache layout (shared by ``write_kv``, ``paged_attention`` and whoever allocates the cache):
per layer, ``k_cache`` and ``v_cache`` are each ``[num_blocks, block_size, num_kv_heads,
head_dim]``. Token ``offset`` of block ``b`` lives in slot ``b * block_size + offset``, which is
row ``slot`` of the ``[num_blocks * block_size, num_kv_heads, head_dim]`` view: a write is a row
scatter by slot (``index_copy_``) and gathering a request's context is a row gather by its slot
list (``index_select``), whose rows come out in ``[tokens, heads, head_dim]`` order, ready for
attention as a strided ``[heads, tokens, head_dim]`` view. Cache memory must hold finite values
(allocate with zeros): padded attention reads slot 0 and masks it, and a NaN there would leak.
"""

from yaie.kernels.activation import gelu_tanh, silu_and_mul
from yaie.kernels.argmax import argmax
from yaie.kernels.attention import (
    DecodeGroup,
    PrefillSegment,
    paged_attention,
    rotary_paged_attention,
)
from yaie.kernels.block_copy import copy_blocks
from yaie.kernels.greedy_head import bf16_screen, greedy_argmax
from yaie.kernels.kv_cache import write_kv
from yaie.kernels.layer_norm import fused_add_layer_norm, layer_norm
from yaie.kernels.linear import linear, linear_partials, pack_weight
from yaie.kernels.rms_norm import fused_add_rms_norm, rms_norm
from yaie.kernels.rotary import apply_rotary, build_cos_sin_cache
from yaie.kernels.rotary_kv import rotary_write_kv

__all__ = [
    "DecodeGroup",
    "PrefillSegment",
    "apply_rotary",
    "argmax",
    "bf16_screen",
    "build_cos_sin_cache",
    "copy_blocks",
    "fused_add_layer_norm",
    "fused_add_rms_norm",
    "gelu_tanh",
    "greedy_argmax",
    "layer_norm",
    "linear",
    "linear_partials",
    "pack_weight",
    "paged_attention",
    "rms_norm",
    "rotary_paged_attention",
    "rotary_write_kv",
    "silu_and_mul",
    "write_kv",
]
