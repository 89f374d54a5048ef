"""Decode steps as CUDA graphs: one launch per step instead of a few hundred.

A decode step of a small model is a few hundred small kernels (about a dozen per layer), each
worth microseconds of GPU work; launching them costs more than running them (a numba launch takes
~63 µs of host time, a torch op ~21 µs: ``DESIGN.md``). A CUDA graph records the step's launches
once and replays them all with one call, so the GPU runs them back to back and the host is free.

A graph replays the very same kernels with the very same arguments: every pointer, shape and grid
is frozen at capture. So:

- **static inputs.** Token ids, positions, KV slots, context lengths and block tables live in
  fixed device buffers (``StagedInputs``) that every replay reads. Each step writes the batch into
  a pinned host twin of those buffers; the copy from it is the graph's first node, so a step
  costs the host one call, not two (the separate copy took ~30 µs of host time, during which
  the GPU, done with the previous step, had nothing to run).
- **a ladder of sizes.** One graph per batch size in ``graph_batch_sizes`` (1, 2, 4, 8, then
  every 16 up to ``max_num_seqs``); a batch of ``n`` replays the smallest graph that holds it,
  with the extra rows padded: context length 0 (attention skips them), KV slot -1 (not
  written). Rows never mix, so padding changes no real row's result.
- **fixed shapes inside.** The block table is ``[size, max_blocks]`` whatever the step's longest
  context, and attention is told the longest context the table can hold: the decode kernel's grid
  (and its split-KV plan) then depends on the batch size alone. Partitions past a request's
  length exit at once.
- **warm before capture.** Every kernel runs once eagerly at each size before its capture, so
  numba compiles and loads it and cuBLAS picks its algorithm outside the capture (neither may
  happen inside one).

Graphs share one memory pool, captured largest first so the smaller ones reuse its memory; each
writes its final hidden states into one shared buffer. Steps with a prefill chunk run eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from yaie.core.batch import ScheduledBatch
from yaie.model.attention import AttentionMetadata
from yaie.model.causal_lm import CausalLM

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The captured batch sizes: 1, 2, 4, 8, every multiple of 16 below ``max_num_seqs``, and
    ``max_num_seqs`` itself; padding a batch up to the next size wastes at most 15 rows."""
    sizes = {s for s in (1, 2, 4, 8) if s < max_num_seqs}
    sizes.update(range(16, max_num_seqs, 16))
    sizes.add(max_num_seqs)
    return sorted(sizes)


class StagedInputs:
    """A decode step's inputs in one pinned host buffer and its twin on the device.

    Fields, in byte order, each padded to 8 bytes: ``token_ids``, ``positions``, ``slot_mapping``
    (int64, one per row), ``seq_lens`` (int32), ``block_tables`` (int32, ``[rows, max_blocks]``)
    last, so a step of ``size`` rows copies one prefix of the buffer, up to its last table row
    (``nbytes``). ``fill`` writes the host side; ``upload`` enqueues the copy, which a graph
    captures as its first node, to run at every replay. The host buffer is rewritten only after
    the previous step's sampled tokens were read, which waits for that copy.
    """

    _FIELDS = (
        ("token_ids", torch.int64, np.int64),
        ("positions", torch.int64, np.int64),
        ("slot_mapping", torch.int64, np.int64),
        ("seq_lens", torch.int32, np.int32),
        ("block_tables", torch.int32, np.int32),
    )

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device) -> None:
        self.max_rows, self.max_blocks = max_rows, max_blocks
        offsets, end = {}, 0
        for name, dtype, _ in self._FIELDS:
            width = max_blocks if name == "block_tables" else 1
            offsets[name] = end
            end += -(-max_rows * width * dtype.itemsize // 8) * 8
        self._offsets = offsets
        self._host = torch.zeros(end, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self._device = torch.zeros(end, dtype=torch.uint8, device=device)
        host_bytes = self._host.numpy()
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, torch.Tensor] = {}
        for name, dtype, np_dtype in self._FIELDS:
            start = offsets[name]
            count = max_rows * (max_blocks if name == "block_tables" else 1)
            stop = start + count * dtype.itemsize
            self.host[name] = host_bytes[start:stop].view(np_dtype)
            self.device[name] = self._device[start:stop].view(dtype)
        self.host["block_tables"] = self.host["block_tables"].reshape(max_rows, max_blocks)
        self.device["block_tables"] = self.device["block_tables"].view(max_rows, max_blocks)

    def fill(self, batch: ScheduledBatch, size: int) -> None:
        """Write a decode-only ``batch`` padded to ``size`` rows."""
        n, host = len(batch.requests), self.host
        host["token_ids"][:n] = batch.token_ids
        host["positions"][:n] = batch.positions
        host["slot_mapping"][:n] = batch.slot_mapping
        host["seq_lens"][:n] = batch.seq_lens
        tables, block_size = host["block_tables"], batch.block_size
        for row, (table, seq_len) in enumerate(zip(batch.block_tables, batch.seq_lens)):
            used = -(-seq_len // block_size)
            tables[row, :used] = table[:used]
        if n < size:
            self.pad(n, size)

    def nbytes(self, size: int) -> int:
        """The prefix of the buffer a step of ``size`` rows reads: up to its last table row."""
        return self._offsets["block_tables"] + size * self.max_blocks * 4

    def pad(self, start: int, stop: int) -> None:
        """Make rows ``start:stop`` padding: no KV write, no context, token and position 0.

        Their block-table rows keep stale block ids, which nothing reads at context length 0.
        """
        for name, value in (("token_ids", 0), ("positions", 0), ("slot_mapping", -1), ("seq_lens", 0)):
            self.host[name][start:stop] = value

    def upload(self, num_bytes: int | None = None) -> None:
        """Copy the first ``num_bytes`` (default: all) to the device, asynchronously."""
        num_bytes = self._device.numel() if num_bytes is None else num_bytes
        self._device[:num_bytes].copy_(self._host[:num_bytes], non_blocking=True)


class DecodeGraphs:
    """The model's forward for decode-only steps, captured once per size of the ladder.

    ``fits(batch)`` says whether a step can replay a graph; ``run(batch)`` replays one and returns
    the final hidden states of the batch's rows (every row of a decode step samples).
    """

    def __init__(
        self, model: CausalLM, max_num_seqs: int, max_model_len: int, block_size: int
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        weight = model.lm_head.weight
        device = weight.device
        self.inputs = StagedInputs(self.sizes[-1], self.max_blocks, device)
        self.hidden = torch.zeros(
            self.sizes[-1], model.config.hidden_size, dtype=weight.dtype, device=device
        )
        self._arange = torch.arange(self.sizes[-1] + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def fits(self, batch: ScheduledBatch) -> bool:
        """One new token per request, all sampling, within the largest graph and the table."""
        n = len(batch.requests)
        return (
            0 < n <= self.sizes[-1]
            and batch.num_tokens == n
            and len(batch.sample_indices) == n
            and max(batch.seq_lens) <= self.max_blocks * self.block_size
        )

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Stage the inputs, replay the graph of the smallest size that holds the batch (it
        copies them over first), and return ``[n, hidden]`` (a view of the shared output buffer:
        read it before the next step)."""
        n = len(batch.requests)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.inputs.fill(batch, size)
        self._graphs[size].replay()
        return self.hidden[:n]

    def _metadata(self, size: int) -> AttentionMetadata:
        """Attention metadata over the static buffers: every row a decode, the table's whole
        width as the longest context (so the kernel's grid depends on ``size`` alone)."""
        device = self.inputs.device
        return AttentionMetadata(
            slot_mapping=device["slot_mapping"][:size],
            query_start_loc=self._arange[: size + 1],
            seq_lens=device["seq_lens"][:size],
            block_tables=device["block_tables"][:size],
            block_size=self.block_size,
            max_seq_len=self.max_blocks * self.block_size,
            decode_ids=self._arange[:size],
            prefill_ids=self._arange[:0],
            max_query_len=1,
            prefills=[],
            decodes=[],
        )

    def _forward(self, size: int) -> None:
        device = self.inputs.device
        hidden = self.model(device["token_ids"][:size], device["positions"][:size],
                            self._metadata(size))
        self.hidden[:size].copy_(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        self.inputs.pad(0, self.sizes[-1])
        self.inputs.upload()
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # warm: compile and load every kernel, pick GEMM algorithms
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.inputs.upload(self.inputs.nbytes(size))
                self._forward(size)
            pool = graph.pool()
            self._graphs[size] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d, contexts up to %d tokens) in "
            "%.1f s", len(self.sizes), self.sizes[0], self.sizes[-1],
            self.max_blocks * self.block_size, time.perf_counter() - start,
        )
