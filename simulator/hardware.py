"""Hardware specs for the roofline cost model: the few numbers that bound a step's time.

Peak figures are the vendors' dense (no sparsity) matrix throughput at the serving dtype and the
memory bandwidth; a real engine reaches a fraction of them, which is what a calibrated cost model
corrects. ``step_overhead`` is the host's fixed cost per step (scheduling, input preparation,
kernel launches or a CUDA-graph replay), the floor under every step however small.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(slots=True, frozen=True)
class HardwareSpec:
    name: str
    peak_flops: float  # dense matrix FLOP/s at dtype_bytes (bf16 on GPUs, fp32 on the CPU)
    mem_bandwidth: float  # bytes/s
    memory_bytes: float  # device memory (weights + KV cache + activations)
    step_overhead: float  # seconds per step
    dtype_bytes: int = 2  # what a real engine serves in on this device
    memory_utilization: float = 0.9  # share of memory the engine may take (vLLM's default)
    kv_cache_bytes: float | None = None  # a fixed KV budget (the CPU engine's --kv-cache-memory)

    def kv_budget(self, weight_bytes: float) -> float:
        """Bytes left for the KV cache once the weights are loaded (never more than a fixed
        budget, when the device has one)."""
        left = self.memory_bytes * self.memory_utilization - weight_bytes
        return left if self.kv_cache_bytes is None else min(left, self.kv_cache_bytes)


HARDWARE: dict[str, HardwareSpec] = {
    "h100": HardwareSpec("NVIDIA H100 SXM 80GB", 989.4e12, 3.35e12, 80 * GiB, 0.5e-3),
    "h200": HardwareSpec("NVIDIA H200 SXM 141GB", 989.4e12, 4.8e12, 141e9, 0.5e-3),
    "a100": HardwareSpec("NVIDIA A100 SXM 80GB", 312e12, 2.039e12, 80 * GiB, 0.5e-3),
    "l4": HardwareSpec("NVIDIA L4 24GB", 121e12, 300e9, 24e9, 0.6e-3),
    # This project's 2-core development machine, measured: fp32 GEMM ~92 GFLOP/s through torch,
    # ~24 GB/s streaming reads. YAIE runs fp32 on CPU with a fixed 1 GiB KV budget by default.
    # The overhead is a rough figure for eager torch dispatch per step; `yaie profile` fits it.
    "cpu": HardwareSpec(
        "CPU (2 cores, AVX-512)", 90e9, 24e9, 24 * GiB, 5e-3, dtype_bytes=4, kv_cache_bytes=1 * GiB
    ),
}


def get_hardware(name: str) -> HardwareSpec:
    try:
        return HARDWARE[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE)}"
        ) from None
