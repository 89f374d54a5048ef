"""A deterministic stand-in for a model that really reads the paged KV cache.

Each token's "K/V" is a rolling hash of the whole context up to it, written into its slot. A step
reads the hash of the previous position *through the block table*, and the sampled token mixes
in the hash stored at one more, pseudo-randomly chosen earlier position — so, like attention, it
looks back over the whole context. The output is a pure function of the context, and any block
shared, freed or overwritten by mistake, early or late in the sequence, changes the text. Tests use it to prove the core exact; ``yaie bench
core`` uses it because it costs almost nothing, leaving the engine's own overhead to measure.
"""

from __future__ import annotations

from yaie.core.batch import ScheduledBatch, StepResult

_MASK = (1 << 61) - 1
_SEED = 0x9E3779B97F4A7C15 & _MASK


class HashExecutor:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = 32000) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.slots = [-1] * (num_blocks * block_size)

    def execute(self, batch: ScheduledBatch) -> StepResult:
        bs = self.block_size
        slots = self.slots
        tokens, positions, slot_mapping = batch.token_ids, batch.positions, batch.slot_mapping
        qsl = batch.query_start_loc
        sampled = []
        for i, sreq in enumerate(batch.requests):
            pos = sreq.start_pos
            if pos == 0:
                h = _SEED
            else:
                table = batch.block_tables[i]
                h = slots[table[(pos - 1) // bs] * bs + (pos - 1) % bs]
                if h < 0:
                    raise RuntimeError(f"{sreq.request_id}: reading KV of position {pos - 1} never written")
            for t in range(qsl[i], qsl[i + 1]):
                h = ((h * 0x100000001B3) ^ (tokens[t] * 31 + positions[t] + 1)) & _MASK
                slots[slot_mapping[t]] = h
            if sreq.samples:
                table = batch.block_tables[i]
                q = (h >> 5) % sreq.seq_len  # a position in the context, chosen by the context
                probe = slots[table[q // bs] * bs + q % bs]
                sampled.append((((h * 0x9E3779B1 + probe) & _MASK) >> 17) % self.vocab_size)
        return StepResult(sampled)
