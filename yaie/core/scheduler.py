"""Iteration-level (continuous) batching.

Every step the scheduler packs one ragged batch under a token budget: running decodes first
(one token each: they are latency-critical and cheap), then the next chunks of prompts still
being prefilled, then new requests in arrival order. A long prompt is split across steps
(chunked prefill) so it never stalls the decodes. When the KV pool runs dry, the most recently
admitted request is preempted: its blocks are released (full ones stay in the radix tree) and
it is recomputed later, usually from that very cache.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass

from yaie.core.batch import ScheduledBatch, ScheduledRequest
from yaie.core.kv_manager import KVCacheManager
from yaie.core.request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # or "priority": lower Request.priority runs first

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the tail is preempted first
        self._step_id = 0
        self.num_preemptions = 0
        # Chained hashes of full prompt blocks that a running request has yet to compute, so
        # a newcomer with the same prefix waits for them instead of computing them again.
        self._pending_blocks: dict[int, Request] = {}
        self._pending_keys: dict[str, list[int]] = {}
        self._prompt_hashes: dict[str, list[int]] = {}  # request id → _prompt_block_hashes

    # ------------------------------------------------------------ queue

    def add(self, req: Request) -> None:
        if self.config.policy == "priority":
            keys = [(r.priority, r.arrival_time) for r in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, (req.priority, req.arrival_time)), req)
        else:
            self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues and release its blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._forget_pending(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._prompt_hashes.pop(req.request_id, None)
        self.kv.release(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------ scheduling

    def schedule(self, now: float) -> tuple[ScheduledBatch, list[Request]]:
        """Decide this step. Returns the batch and, aligned with ``batch.requests``, the
        ``Request`` objects (the engine needs them; executors only see the batch)."""
        budget = self.config.max_num_batched_tokens
        chosen: dict[Request, int] = {}

        decodes, prefills = [], []
        for r in self.running:
            left = len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens
            if left == 1:
                decodes.append(r)
            else:
                prefills.append((r, left))
        preempted = False
        bs = self.kv.block_size
        running = RequestStatus.RUNNING
        for req, left in itertools.chain(zip(decodes, itertools.repeat(1)), prefills):
            if budget == 0:
                break
            if req.status is not running:  # preempted earlier in this loop
                continue
            n = min(budget, left)
            # Most steps fit in the blocks a request already has: skip the allocator then.
            if req.num_computed_tokens + n > len(req.block_ids) * bs:
                while not self.kv.allocate(req, n):
                    victim = self._pick_victim(req)
                    if victim is None:  # cannot happen for requests that passed admission
                        raise RuntimeError(f"KV cache cannot hold request {req.request_id} alone")
                    budget += chosen.pop(victim, 0)
                    self._preempt(victim)
                    preempted = True
            chosen[req] = n
            budget -= n

        # Admitting while preempting would only evict the newcomers' blocks again.
        if not preempted and self.waiting:
            self._admit(now, budget, chosen)
        return self._build_batch(chosen), list(chosen)

    def _admit(self, now: float, budget: int, chosen: dict[Request, int]) -> None:
        cfg = self.config
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            self.kv.admit(req, now)
            if self._prefix_is_pending(req):
                self.kv.release(req)
                deferred.append(self.waiting.popleft())
                continue
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining > budget and not cfg.enable_chunked_prefill:
                self.kv.release(req)
                break
            n = min(remaining, budget)
            if not self.kv.allocate(req, n):
                self.kv.release(req)
                break
            self.waiting.popleft()
            req.set_status(RequestStatus.RUNNING)
            if req.times.first_scheduled is None:
                req.times.first_scheduled = now
                req.num_cached_tokens = req.num_computed_tokens
                stats = self.kv.radix.stats
                stats.queried_tokens += req.num_prompt_tokens
                stats.hit_tokens += req.num_computed_tokens
            self.running.append(req)
            self._register_pending(req)
            chosen[req] = n
            budget -= n
        self.waiting.extendleft(reversed(deferred))

    def _pick_victim(self, serving: Request) -> Request | None:
        """The request to preempt: lowest priority, most recently admitted; never ``serving``."""
        candidates = [r for r in self.running if r is not serving]
        if not candidates:
            return None
        if self.config.policy == "priority":
            return max(reversed(candidates), key=lambda r: r.priority)
        return candidates[-1]

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._forget_pending(req)
        self.kv.release(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.set_status(RequestStatus.PREEMPTED)
        if self.config.policy == "priority":
            self.add(req)
        else:
            self.waiting.appendleft(req)

    # ------------------------------------------------------------ in-flight prefixes

    def _prompt_block_hashes(self, req: Request) -> list[int]:
        """Chained hashes of the prompt's full blocks. Computed once per request: a request
        waiting for room is checked again every step, and long prompts have thousands of blocks."""
        hashes = self._prompt_hashes.get(req.request_id)
        if hashes is None:
            hashes, h = [], 0
            # zip of bs references to one iterator: the full blocks as tuples, built in C
            for block in zip(*[iter(req.prompt_token_ids)] * self.kv.block_size):
                h = hash((h, block))
                hashes.append(h)
            self._prompt_hashes[req.request_id] = hashes
        return hashes

    def _register_pending(self, req: Request) -> None:
        if not self.kv.enable_prefix_caching:
            return
        bs = self.kv.block_size
        first = req.num_computed_tokens // bs
        full = req.num_prompt_tokens // bs
        if full > first:
            pending = self._pending_blocks
            keys = [h for h in self._prompt_block_hashes(req)[first:] if h not in pending]
            for h in keys:
                self._pending_blocks[h] = req
            self._pending_keys[req.request_id] = keys

    def _forget_pending(self, req: Request) -> None:
        for h in self._pending_keys.pop(req.request_id, ()):
            del self._pending_blocks[h]

    def _prefix_is_pending(self, req: Request) -> bool:
        """Is the first block this request would compute being computed by a running request?"""
        if not self._pending_blocks:
            return False
        bs = self.kv.block_size
        nxt = req.num_computed_tokens // bs
        if (nxt + 1) * bs > req.num_prompt_tokens:
            return False
        owner = self._pending_blocks.get(self._prompt_block_hashes(req)[nxt])
        return owner is not None and owner is not req and owner.num_computed_tokens < (nxt + 1) * bs

    def on_step_done(self, req: Request) -> None:
        """Called after ``req`` advanced: stop advertising blocks it has now computed."""
        if req.request_id in self._pending_keys and req.num_computed_tokens >= req.num_prompt_tokens:
            self._forget_pending(req)

    # ------------------------------------------------------------ batch

    def _build_batch(self, chosen: dict[Request, int]) -> ScheduledBatch:
        self._step_id += 1
        bs = self.kv.block_size
        # All fields positionally, fresh lists: cheaper than the default factories, every step.
        batch = ScheduledBatch(self._step_id, bs, [], [], [], [], [0], [], [], [])
        # Bound methods and a running count: this loop runs once per request per step.
        token_ids, positions, slots = batch.token_ids, batch.positions, batch.slot_mapping
        add_token, add_position, add_slot = token_ids.append, positions.append, slots.append
        add_qsl, add_seq_len = batch.query_start_loc.append, batch.seq_lens.append
        add_table, add_sample = batch.block_tables.append, batch.sample_indices.append
        add_request = batch.requests.append
        num_tokens = num_decode = 0
        for req, n in chosen.items():
            start = req.num_computed_tokens
            end = start + n
            prompt, out = req.prompt_token_ids, req.output_token_ids
            num_prompt = len(prompt)
            table = req.block_ids
            if n == 1:
                add_token(out[start - num_prompt] if start >= num_prompt else prompt[start])
                add_position(start)
                add_slot(table[start // bs] * bs + start % bs)
                num_decode += 1
            else:
                token_ids.extend(req.token_slice(start, end))
                positions.extend(range(start, end))
                # one run of consecutive slots per block: the first and last may be partial
                first, offset = divmod(start, bs)
                last = (end - 1) // bs
                base = table[first] * bs
                if first == last:
                    slots.extend(range(base + offset, base + offset + n))
                else:
                    slots.extend(range(base + offset, base + bs))
                    for block in table[first + 1 : last]:
                        slots.extend(range(block * bs, block * bs + bs))
                    base = table[last] * bs
                    slots.extend(range(base, base + (end - 1) % bs + 1))
            num_tokens += n
            add_qsl(num_tokens)
            add_seq_len(end)
            add_table(table)
            samples = end == num_prompt + len(out)
            if samples:
                add_sample(num_tokens - 1)
            add_request(
                ScheduledRequest(
                    req.request_id, start, n, samples, req.sampling_params, prompt, out
                )
            )
        batch.num_decode_tokens = num_decode
        batch.num_prefill_tokens = num_tokens - num_decode
        return batch
