"""Which tokens of which sequences the next step computes, and where their cache lives.

Each step has a token budget. Running sequences that need one token (decoding) go first, oldest first;
then running sequences still prefilling continue; then waiting sequences are admitted in arrival order,
taking the longest cached prefix they can (prefix caching) and a chunk of their prompt. When a decode
needs a block and none is free, the newest running sequence is preempted: its blocks and state slot are
dropped and it waits at the front of the queue to be recomputed (its tokens so far are kept).

Hybrid models (KDA layers): a cached prefix is usable only up to a block boundary where a snapshot of
the KDA state exists. Each sequence has snapshot points (every `snapshot_interval` tokens, the prompt's
last full block, the resend point). A prefill chunk that crosses points runs its delta rule in pieces that
end on them and copies the state (and conv tail) at each into a snapshot slot keyed by that block's hash;
a chunk or decode step that ends on a point is snapshotted after the step from the sequence's own slot.
"""
import random
from collections import deque

import torch


from nanokimi.infer.block_manager import BlockPool, StateSlots, block_hash
from nanokimi.infer.params import CompletionOutput, SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Request:
    """A request as the engine keeps it: its n sequences and its times (time.monotonic())."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float,
                 prompt: str | None = None):
        self.request_id, self.prompt_token_ids, self.params, self.prompt = request_id, prompt_token_ids, params, prompt
        self.metrics = {"arrival_time": arrival_time, "first_scheduled_time": None, "first_token_time": None,
                        "last_token_time": None, "finished_time": None}
        self.sequences: list[Sequence] = []
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return all(s.status == FINISHED for s in self.sequences)


class Sequence:
    """One sample of a request: its tokens (prompt, then output), how many have their cache computed,
    its blocks, its KDA state slot, and its private random stream."""

    def __init__(self, request: Request, index: int, seed: int, block_size: int, snapshot_interval: int):
        self.request, self.index, self.block_size = request, index, block_size
        self.tokens = list(request.prompt_token_ids)
        self.num_prompt = len(self.tokens)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.state_slot: int | None = None
        self.hashes: list[bytes] = []
        self.rng = random.Random(seed)  # this sample's own stream: one uniform per sampled token
        self.output = CompletionOutput(index, logprobs=[] if request.params.logprobs is not None else None)
        self.status = WAITING
        self._table = (torch.zeros(0, dtype=torch.long), None)  # (tensor copy of block_table, the list it copies)
        self.detok_offsets = (0, 0)  # incremental detokenization: output tokens [prefix, read) give the text's tail
        # KDA snapshots: every snapshot_interval tokens (prompt and output: a next chat turn reuses the
        # conversation so far), the prompt's last full block (for longer prompts that extend it), and the
        # deepest block a resend of this very prompt can reuse (its last token is always recomputed)
        self.snapshot_interval = snapshot_interval
        last_full = self.num_prompt // block_size * block_size
        resend = (self.num_prompt - 1) // block_size * block_size
        self.prompt_points = {p for p in (last_full, resend) if p > 0}

    def is_snapshot_point(self, position: int) -> bool:
        return position > 0 and (position % self.snapshot_interval == 0 or position in self.prompt_points)

    def next_snapshot_point(self, after: int) -> int:
        """The first snapshot point after `after`."""
        step = (after // self.snapshot_interval + 1) * self.snapshot_interval
        return min([step] + [p for p in self.prompt_points if p > after])

    def table_tensor(self) -> torch.Tensor:
        """block_table as a CPU long tensor, extended by the new entries only (long contexts have long tables)."""
        cached, source = self._table
        if source is not self.block_table or len(cached) > len(self.block_table):  # replaced after a preemption
            cached = torch.tensor(self.block_table, dtype=torch.long)
        elif len(cached) < len(self.block_table):
            cached = torch.cat([cached, torch.tensor(self.block_table[len(cached):], dtype=torch.long)])
        self._table = (cached, self.block_table)
        return cached

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    def ensure_hashes(self, num_blocks: int) -> None:
        bs = self.block_size
        while len(self.hashes) < num_blocks and (len(self.hashes) + 1) * bs <= len(self.tokens):
            i = len(self.hashes)
            self.hashes.append(block_hash(self.hashes[-1] if i else None, self.tokens[i * bs:(i + 1) * bs]))


class Scheduler:
    def __init__(self, pool: BlockPool, slots: StateSlots | None, block_size: int, max_num_seqs: int,
                 max_step_tokens: int, prefix_caching: bool, has_kda: bool):
        self.pool, self.slots, self.block_size = pool, slots, block_size
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        self.prefix_caching, self.has_kda = prefix_caching, has_kda
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.slot_ops: list[tuple] = []  # ("copy", src, dst) / ("zero", slot), applied in order by the engine
        self.counters = dict(preemptions=0, prefix_cache_queries=0, prefix_cache_hit_tokens=0, kda_snapshots=0)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of tokens to compute) for the next step; decodes first."""
        while True:
            scheduled = self._schedule_once()
            if scheduled or not self.running:
                return scheduled
            self._preempt(self.running[-1])  # nothing fits: make room by the rule, then try again

    def _schedule_once(self) -> list[tuple[Sequence, int]]:
        budget = self.max_step_tokens
        scheduled = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != RUNNING or seq.remaining != 1:
                continue
            while not self._grow(seq, seq.num_computed + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status == RUNNING:
                scheduled.append((seq, 1))
                budget -= 1
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != RUNNING or seq.remaining <= 1:
                continue
            n = self._fit(seq, self._chunk(seq, budget))
            if n:
                scheduled.append((seq, n))
                budget -= n
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = next((s for s in self.waiting if self._admissible(s)), None)
            if seq is None or not self._admit(seq):
                break
            n = self._fit(seq, self._chunk(seq, budget))
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _admissible(self, seq: Sequence) -> bool:
        """Samples 1.. of a request wait until sample 0 has prefilled the prompt, to reuse it from the cache."""
        if seq.index == 0 or not self.prefix_caching:
            return True
        first = seq.request.sequences[0]
        return first.status == FINISHED or first.num_computed >= first.num_prompt

    def _chunk(self, seq: Sequence, budget: int) -> int:
        return min(seq.remaining, budget)

    def interior_snapshots(self, seq: Sequence, n: int) -> list[tuple[int, int]]:
        """KDA snapshots to take inside a prefill chunk of n tokens: (tokens into the chunk, slot) for each
        snapshot point strictly inside it (the point at its end is snapshotted after the step)."""
        if not (self.has_kda and self.prefix_caching) or n <= 1:
            return []
        out = []
        point = seq.next_snapshot_point(seq.num_computed)
        while point < seq.num_computed + n:
            seq.ensure_hashes(point // self.block_size)
            slot = self.slots.new_snapshot(seq.hashes[point // self.block_size - 1])
            if slot is not None:
                out.append((point - seq.num_computed, slot))
                self.counters["kda_snapshots"] += 1
            point = seq.next_snapshot_point(point)
        return out

    def _fit(self, seq: Sequence, n: int) -> int:
        """Shrink n to what the free blocks can hold, and allocate them."""
        room = (len(seq.block_table) + self.pool.num_free) * self.block_size - seq.num_computed
        n = max(0, min(n, room))
        if n:
            self._grow(seq, seq.num_computed + n)
        return n

    def _grow(self, seq: Sequence, length: int) -> bool:
        need = -(-length // self.block_size) - len(seq.block_table)
        if need > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate() for _ in range(max(need, 0)))
        return True

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the longest usable cached prefix (always leaving the last token to compute)."""
        if not self.prefix_caching:
            return []
        max_blocks = (len(seq.tokens) - 1) // self.block_size
        seq.ensure_hashes(max_blocks)
        blocks = []
        for h in seq.hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            blocks.append(block)
        if self.has_kda:  # a hit needs the KDA state at its end
            while blocks and self.slots.snapshots.get(seq.hashes[len(blocks) - 1]) is None:
                blocks.pop()
        return blocks

    def _admit(self, seq: Sequence) -> bool:
        hit = self.cached_prefix(seq)
        for block in hit:
            self.pool.take(block)
        start = len(hit) * self.block_size
        first = min(seq.remaining - start, self.block_size)  # room for at least one block of new tokens
        if -(-(start + first) // self.block_size) - len(hit) > self.pool.num_free:
            self.pool.release(hit)
            return False
        if self.prefix_caching:
            self.counters["prefix_cache_queries"] += len(seq.tokens)
            self.counters["prefix_cache_hit_tokens"] += start
        self.waiting.remove(seq)
        seq.block_table = hit
        seq.num_computed = start
        if seq.request.metrics["first_scheduled_time"] is None:
            seq.request.num_cached_tokens = max(seq.request.num_cached_tokens, start)
        if self.has_kda:
            source = self.slots.snapshot_slot(seq.hashes[len(hit) - 1]) if hit else None
            seq.state_slot = self.slots.allocate()  # may evict that very snapshot: then its slot already holds it
            if source is None:
                self.slot_ops.append(("zero", seq.state_slot))
            elif source != seq.state_slot:
                self.slot_ops.append(("copy", source, seq.state_slot))
        seq.status = RUNNING
        self.running.append(seq)
        return True

    def after_step(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """Advance the computed counts; register newly full blocks; snapshot KDA states at their points."""
        for seq, n in scheduled:
            before = seq.num_computed // self.block_size
            seq.num_computed += n
            full = seq.num_computed // self.block_size
            if not self.prefix_caching or full == before:  # no block completed (snapshot points end blocks)
                continue
            seq.ensure_hashes(full)
            for i in range(before, full):
                self.pool.register(seq.block_table[i], seq.hashes[i])
            if self.has_kda and seq.is_snapshot_point(seq.num_computed):
                slot = self.slots.new_snapshot(seq.hashes[full - 1])
                if slot is not None:
                    self.slot_ops.append(("copy", seq.state_slot, slot))
                    self.counters["kda_snapshots"] += 1

    def _free(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)
        seq.block_table = []
        if seq.state_slot is not None:
            self.slots.release(seq.state_slot)
            seq.state_slot = None

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.num_computed = 0
        seq.status = WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.counters["preemptions"] += 1

    def finish(self, seq: Sequence) -> None:
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = FINISHED
