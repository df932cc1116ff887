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
A prefill chunk that does not finish the prompt ends on a block boundary (when that leaves it a token), and
a sequence preempted at a block boundary keeps its state there as a snapshot, so it resumes where it stopped
while its blocks are still cached (on the GPU or, its tail usually, in a lower KV tier).

Seer options (off by default; docs/seer.md):
- speculative decoding (`drafter`): a decoding sequence with a draft of k tokens is scheduled for 1 + k
  tokens (its last token and the draft, verified in one forward); draft blocks come from free blocks only.
- policy "context_aware": waiting sequences are admitted by priority instead of arrival: first any that
  waited more than `max_wait_steps` steps (bounded wait), then each group's probe (its first sequence, while
  no sibling has finished), then the longest expected remaining output (the group's longest finished
  output so far, else max_tokens), then arrival.
- divided rollout (`chunk_tokens`, with context_aware): after generating chunk_tokens tokens, a running
  sequence goes back to the queue if a waiting one ranks above it; it keeps its blocks and KDA state slot
  (suspended, not preempted) and resumes where it stopped. Suspended sequences are preempted first when
  blocks run out.
"""
from collections import deque

from nanokimi.infer.block_manager import BlockPool, StateSlots, block_hash
from nanokimi.infer.params import CompletionOutput, SamplingParams
from nanokimi.infer.speculative import SampleStream, next_draft_length

WAITING, RUNNING, FINISHED, SUSPENDED = "waiting", "running", "finished", "suspended"
POLICIES = ("fcfs", "context_aware")
TAIL_FRACTION = 8  # with at most max_num_seqs / 8 sequences running, drafts may be twice num_speculative_tokens


class Request:
    """A request as the engine keeps it: its n sequences and its times (time.monotonic())."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float,
                 prompt: str | None = None):
        self.request_id, self.prompt_token_ids, self.params, self.prompt = request_id, prompt_token_ids, params, prompt
        self.metrics = {"arrival_time": arrival_time, "first_scheduled_time": None, "first_token_time": None,
                        "last_token_time": None, "finished_time": None}
        self.sequences: list[Sequence] = []
        self.num_cached_tokens = 0
        self.stop_ids: frozenset[int] = frozenset()  # tokens that end a sample (set by the engine)
        self.penalized = params.penalized  # read per row each step: the property's tests once, here
        self.distinct_prompt_ids = None  # repetition_penalty: its prompt's distinct ids, a CPU tensor (the engine's)

    @property
    def finished(self) -> bool:
        for seq in self.sequences:  # a loop, not all(generator): it runs for every request in every step
            if seq.status != FINISHED:
                return False
        return True


class Sequence:
    """One sample of a request: its tokens (prompt, then output), how many have their cache computed,
    its blocks, its KDA state slot, and its private random stream."""

    def __init__(self, request: Request, index: int, seed: int, block_size: int, snapshot_interval: int):
        self.request, self.index, self.block_size = request, index, block_size
        self.tokens = list(request.prompt_token_ids)
        self.num_prompt = len(self.tokens)
        self.num_computed = 0
        self.leads_prefix = None  # (group_id, first block hash) while the first of its group to prefill the prompt
        self.block_table: list[int] = []
        self.state_slot: int | None = None
        self.hashes: list[bytes] = []
        self.rng = SampleStream(seed)  # this sample's own stream: one uniform per sampled token
        self.output = CompletionOutput(index, logprobs=[] if request.params.logprobs is not None else None)
        self.status = WAITING
        self.detok_offsets = (0, 0)  # incremental detokenization: output tokens [prefix, read) give the text's tail
        # KDA snapshots: every snapshot_interval tokens (prompt and output: a next chat turn reuses the
        # conversation so far), the prompt's last full block (for longer prompts that extend it), and the
        # deepest block a resend of this very prompt can reuse (its last token is always recomputed)
        self.snapshot_interval = snapshot_interval
        self.draft: list[int] = []  # speculative tokens scheduled with this step's decode
        self.accepted_ema: float | None = None  # moving average of accepted draft tokens (adaptive length)
        self.order = 0  # arrival rank; set by the scheduler
        self.queued_at = 0  # the scheduler step at which it (re)joined the queue
        self.run_tokens = 0  # tokens generated since it was last admitted or resumed (divided rollout)
        self.max_output = request.params.max_tokens  # output tokens at which it ends (the engine caps it by context)
        last_full = self.num_prompt // block_size * block_size
        resend = (self.num_prompt - 1) // block_size * block_size
        self.prompt_points = {p for p in (last_full, resend) if p > 0}

    def is_snapshot_point(self, position: int) -> bool:
        return position > 0 and (position % self.snapshot_interval == 0 or position in self.prompt_points)

    def next_snapshot_point(self, after: int) -> int:
        """The first snapshot point after `after`."""
        step = (after // self.snapshot_interval + 1) * self.snapshot_interval
        return min([step] + [p for p in self.prompt_points if p > after])

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


def group_key(seq: Sequence):
    """The group a sequence's length is estimated from: SamplingParams.group_id, else its request."""
    group = seq.request.params.group_id
    return ("request", seq.request.request_id) if group is None else ("group", group)


class Scheduler:
    def __init__(self, pool: BlockPool, slots: StateSlots | None, block_size: int, max_num_seqs: int,
                 max_step_tokens: int, prefix_caching: bool, has_kda: bool, drafter=None,
                 num_speculative_tokens: int = 0, max_model_len: int = 1 << 62, policy: str = "fcfs",
                 max_wait_steps: int = 64, chunk_tokens: int = 0):
        self.pool, self.slots, self.block_size = pool, slots, block_size
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        self.prefix_caching, self.has_kda = prefix_caching, has_kda
        self.drafter, self.num_speculative_tokens, self.max_model_len = drafter, num_speculative_tokens, max_model_len
        self.policy, self.max_wait_steps, self.chunk_tokens = policy, max_wait_steps, chunk_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.suspended: list[Sequence] = []
        self._prefilling_prefixes: set[tuple] = set()  # (group, first block) that a group member is prefilling
        self._ranked: deque[Sequence] | None = None
        self.groups: dict = {}  # group key -> {"probe": first sequence, "longest": longest finished output}
        self.num_added = 0
        self.steps = 0
        # ("copy", src, dst) / ("zero", slot) / ("load", tensors, slot), applied in order by the engine
        self.slot_ops: list[tuple] = []
        self.counters = dict(preemptions=0, prefix_cache_queries=0, prefix_cache_hit_tokens=0, kda_snapshots=0,
                             preemption_snapshots=0, suspensions=0)
        self.tiers = None  # a TieredCache (nanokimi.infer.tiers) when lower KV tiers are attached

    def add(self, seq: Sequence) -> None:
        seq.order, seq.queued_at = self.num_added, self.steps
        self.num_added += 1
        self.groups.setdefault(group_key(seq), {"probe": seq, "longest": None, "live": 0})["live"] += 1
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of tokens to compute) for the next step; decodes first."""
        self.steps += 1
        self._prefilling_prefixes = {seq.leads_prefix for seq in self.running if seq.leads_prefix
                                     and seq.status == RUNNING and seq.num_computed < seq.num_prompt}
        if self.chunk_tokens and self.policy == "context_aware":
            self._suspend_finished_chunks()
        while True:
            scheduled = self._schedule_once()
            if scheduled or not self.running:
                return scheduled
            self._preempt(self._victim())  # nothing fits: make room by the rule, then try again

    def _victim(self) -> Sequence:
        """Who is preempted when blocks run out: a suspended sequence first, else the newest running one."""
        return self.suspended[-1] if self.suspended else self.running[-1]

    def priority(self, seq: Sequence) -> tuple:
        """Context-aware order, smallest first: waited too long, group probe, longest expected rest, arrival."""
        group = self.groups[group_key(seq)]
        aged = self.steps - seq.queued_at > self.max_wait_steps
        probe = group["probe"] is seq and group["longest"] is None
        expected = seq.request.params.max_tokens if group["longest"] is None else group["longest"]
        return (not aged, not probe, -max(expected - seq.num_output, 1), seq.order)

    def _next_waiting(self) -> Sequence | None:
        if self.policy == "fcfs":
            return next((s for s in self.waiting if self._admissible(s)), None)
        if self.suspended and self.has_kda and not (self.slots.free or self.slots.snapshots):
            return min(self.suspended, key=self.priority)  # no state slot for a newcomer: resume (costs none)
        # the candidates ranked once per admission round (no priority changes within one: the step count,
        # the groups' lengths and the outputs stand still; a preemption starts a new ranking), then taken
        # in order: the minimum each time, without rescanning every waiting sequence per admission
        if self._ranked is None:
            self._ranked = deque(sorted([s for s in self.waiting if self._admissible(s)] + self.suspended,
                                        key=self.priority))
        while self._ranked and (self._ranked[0].status not in (WAITING, SUSPENDED)
                                or not self._admissible(self._ranked[0])):
            self._ranked.popleft()  # admitted or resumed since the ranking, or a sibling started prefilling
        return self._ranked[0] if self._ranked else None

    def _suspend_finished_chunks(self) -> None:
        """Divided rollout: running decodes that finished a chunk yield their place to better-ranked waiting work."""
        if not self.waiting:
            return
        best = min((self.priority(s) for s in self.waiting if self._admissible(s)), default=None)
        if best is None:
            return
        spare = len(self.running) if self.slots is None else len(self.slots.free) + len(self.slots.snapshots)
        for seq in list(self.running):  # each newcomer needs a KDA state slot: suspend no more than are spare
            if spare and seq.run_tokens >= self.chunk_tokens and seq.remaining == 1 and self.priority(seq) > best:
                spare -= 1
                self.running.remove(seq)
                seq.status, seq.queued_at = SUSPENDED, self.steps
                self.suspended.append(seq)
                self.counters["suspensions"] += 1

    def _schedule_once(self) -> list[tuple[Sequence, int]]:
        budget = self.max_step_tokens
        self._ranked = None  # context_aware's ranking of the waiting sequences (_next_waiting)
        scheduled = []
        bs, drafting = self.block_size, self.drafter is not None
        prefilling = []  # running sequences with more than one token to compute, in order
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != RUNNING or len(seq.tokens) - seq.num_computed != 1:
                if len(seq.tokens) - seq.num_computed > 1:
                    prefilling.append(seq)
                continue
            if seq.num_computed >= len(seq.block_table) * bs:  # its next token starts a block (else: no _grow)
                while not self._grow(seq, seq.num_computed + 1):
                    victim = self._victim()
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status != RUNNING:
                    continue
            if drafting:
                seq.draft = self._draft(seq, budget - 1)
                scheduled.append((seq, 1 + len(seq.draft)))
                budget -= 1 + len(seq.draft)
            else:
                scheduled.append((seq, 1))
                budget -= 1
        for seq in prefilling if budget else ():  # (a full budget stopped the loop above: nothing more fits)
            if budget == 0:
                break
            if seq.status != RUNNING:  # preempted above
                continue
            n = self._fit(seq, self._chunk(seq, budget))
            if n:
                scheduled.append((seq, n))
                budget -= n
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            if seq is not None and seq.status == SUSPENDED:
                self._resume(seq)
                if self._grow(seq, seq.num_computed + 1):  # its next token, this very step
                    scheduled.append((seq, 1))
                    budget -= 1
                continue
            if seq is None or not self._admit(seq):
                break
            n = self._fit(seq, self._chunk(seq, budget))
            scheduled.append((seq, n))
            budget -= n
            key = self._shared_prefix(seq)
            # the first of its group to compute this prompt's first block: its siblings wait for its prefill
            seq.leads_prefix = key if key and self.pool.lookup(key[1]) is None else None
            if seq.leads_prefix:
                self._prefilling_prefixes.add(key)
        return scheduled

    def _resume(self, seq: Sequence) -> None:
        """A suspended sequence runs again from where it stopped (its blocks and state slot were kept)."""
        self.suspended.remove(seq)
        seq.status, seq.run_tokens, seq.draft = RUNNING, 0, []
        self.running.append(seq)

    def _draft(self, seq: Sequence, budget: int) -> list[int]:
        """A draft for a decoding sequence: at most the adaptive length, the step's budget, what max_tokens and
        the context leave (the step emits one token more than it accepts), and what free blocks can hold. No draft
        for a request whose logits are adjusted (penalties, logit_bias, min_tokens: each position's adjustment
        depends on the tokens accepted before it)."""
        if seq.request.penalized:
            return []
        longest = self.num_speculative_tokens
        if len(self.running) * TAIL_FRACTION <= self.max_num_seqs:  # the tail: few rows, extra draft tokens are cheap
            longest *= 2
        limit = min(next_draft_length(seq.accepted_ema, longest), budget,
                    seq.request.params.max_tokens - seq.num_output - 1, self.max_model_len - len(seq.tokens) - 1)
        draft = self.drafter.propose(seq, limit) if limit > 0 else []
        draft = draft[:max(limit, 0)]
        need = -(-(seq.num_computed + 1 + len(draft)) // self.block_size) - len(seq.block_table)
        if draft and need > self.pool.num_free - len(self.running):  # drafts never cost another sequence a block
            return []
        if draft:
            self._grow(seq, seq.num_computed + 1 + len(draft))
        return draft

    def shrink(self, seq: Sequence) -> None:
        """Free the blocks past the sequence's computed tokens (those of rejected draft tokens)."""
        keep = -(-seq.num_computed // self.block_size)
        if len(seq.block_table) > keep:
            extra = seq.block_table[keep:]
            del seq.block_table[keep:]
            self.pool.release(extra)

    def _admissible(self, seq: Sequence) -> bool:
        """Samples 1.. of a request wait until sample 0 has prefilled the prompt, to reuse it from the cache;
        so does a request whose group (SamplingParams.group_id: RL's k samples of one prompt, sent as k requests)
        has a running member still prefilling a prompt with the same first block."""
        if not self.prefix_caching:
            return True
        if seq.index > 0:
            first = seq.request.sequences[0]
            if not (first.status == FINISHED or first.num_computed >= first.num_prompt):
                return False
        return seq.status != WAITING or self._shared_prefix(seq) not in self._prefilling_prefixes

    def _shared_prefix(self, seq: Sequence) -> tuple | None:
        """(group_id, hash of the prompt's first block): what a prefilling group member shares with its siblings;
        None without a group or a whole first block."""
        group = seq.request.params.group_id
        if group is None or seq.num_prompt < self.block_size:
            return None
        seq.ensure_hashes(1)
        return group, seq.hashes[0]

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
        """Shrink n to what the free blocks can hold, and allocate them. A hybrid's chunk that does not finish
        the prompt ends on a block boundary when that leaves it a token (so a preemption can snapshot there)."""
        room = (len(seq.block_table) + self.pool.num_free) * self.block_size - seq.num_computed
        n = max(0, min(n, room))
        if n < seq.remaining and self.has_kda and self.prefix_caching:
            end = (seq.num_computed + n) // self.block_size * self.block_size
            if end > seq.num_computed:
                n = end - seq.num_computed
        if n:
            self._grow(seq, seq.num_computed + n)
        return n

    def _grow(self, seq: Sequence, length: int) -> bool:
        need = -(-length // self.block_size) - len(seq.block_table)
        if need > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate() for _ in range(max(need, 0)))
        return True

    def cached_prefix(self, seq: Sequence) -> list[int | None]:
        """Blocks of the longest usable cached prefix (always leaving the last token to compute). None marks a
        block that a lower KV tier holds (copied up when the sequence is admitted)."""
        if not self.prefix_caching:
            return []
        max_blocks = (len(seq.tokens) - 1) // self.block_size
        seq.ensure_hashes(max_blocks)
        return self.prefix_of(seq.hashes[:max_blocks])

    def prefix_of(self, hashes: list[bytes]) -> list[int | None]:
        """The cached chain along `hashes` (read-only: no reference or LRU change)."""
        blocks = []
        for h in hashes:
            block = self.pool.lookup(h)
            if block is None and (self.tiers is None or not self.tiers.has_block(h)):
                break
            blocks.append(block)
        if self.has_kda:  # a hit needs the KDA state at its end
            while blocks and not self._has_snapshot(hashes[len(blocks) - 1]):
                blocks.pop()
        return blocks

    def _has_snapshot(self, h: bytes) -> bool:
        return self.slots.snapshots.get(h) is not None or (self.tiers is not None and self.tiers.has_state(h))

    def _admit(self, seq: Sequence) -> bool:
        if self.has_kda and not (self.slots.free or self.slots.snapshots):  # suspended sequences hold the slots
            if not self.suspended:
                return False
            self._preempt(self.suspended[-1])
        hit = self.cached_prefix(seq)
        state = None  # the KDA state at the hit's end, when only a lower tier holds it
        if self.has_kda and hit and self.slots.snapshots.get(seq.hashes[len(hit) - 1]) is None:
            state = self.tiers.fetch_state(seq.hashes[len(hit) - 1])
            if state is None:
                hit = []
        resident = [b for b in hit if b is not None]
        for block in resident:
            self.pool.take(block)
        start = len(hit) * self.block_size
        first = min(seq.remaining - start, self.block_size)  # room for at least one block of new tokens
        if -(-(start + first) // self.block_size) - len(resident) > self.pool.num_free:
            self.pool.release(resident)
            return False
        if len(resident) < len(hit):
            hit = self._load_from_tiers(seq, hit)
            if len(hit) * self.block_size < start:
                state, start = None, len(hit) * self.block_size
        if self.prefix_caching:
            self.counters["prefix_cache_queries"] += len(seq.tokens)
            self.counters["prefix_cache_hit_tokens"] += start
        self.waiting.remove(seq)
        seq.block_table = hit
        seq.num_computed = start
        if seq.request.metrics["first_scheduled_time"] is None:
            seq.request.num_cached_tokens = max(seq.request.num_cached_tokens, start)
        if self.has_kda:
            source = self.slots.snapshot_slot(seq.hashes[len(hit) - 1]) if hit and state is None else None
            seq.state_slot = self.slots.allocate()  # may evict that very snapshot: then its slot already holds it
            if state is not None:
                self.slot_ops.append(("load", state, seq.state_slot))
            elif source is None:
                self.slot_ops.append(("zero", seq.state_slot))
            elif source != seq.state_slot:
                self.slot_ops.append(("copy", source, seq.state_slot))
        seq.status, seq.run_tokens = RUNNING, 0
        self.running.append(seq)
        return True

    def _load_from_tiers(self, seq: Sequence, hit: list[int | None]) -> list[int]:
        """Give the tier-held blocks of `hit` fresh GPU blocks and copy them up; if an entry has vanished, keep
        the prefix before it (for KDA, only up to a block whose state snapshot is on the GPU)."""
        missing = [i for i, b in enumerate(hit) if b is None]
        fresh = [self.pool.allocate() for _ in missing]
        loaded = self.tiers.load_blocks([seq.hashes[i] for i in missing], fresh)
        for i, block in zip(missing[:loaded], fresh[:loaded]):
            hit[i] = block
            self.pool.register(block, seq.hashes[i])
        if loaded == len(missing):
            return hit
        cut = missing[loaded]
        self.pool.release(fresh[loaded:] + [b for b in hit[cut:] if b is not None])
        hit = hit[:cut]
        if self.has_kda:
            while hit and self.slots.snapshots.get(seq.hashes[len(hit) - 1]) is None:
                self.pool.release([hit.pop()])
        return hit

    def after_step(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """Advance the computed counts; register newly full blocks; snapshot KDA states at their points."""
        bs, caching = self.block_size, self.prefix_caching
        for seq, n in scheduled:
            before = seq.num_computed // bs
            seq.num_computed += n
            full = seq.num_computed // bs
            if full == before or not caching:  # no block completed (snapshot points end blocks)
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
        self._ranked = None  # a sequence joins the queue: rank again
        self._keep_state(seq)
        self._free(seq)
        seq.num_computed = 0
        (self.suspended if seq.status == SUSPENDED else self.running).remove(seq)
        seq.status, seq.queued_at = WAITING, self.steps
        self.waiting.appendleft(seq)
        self.counters["preemptions"] += 1

    def _keep_state(self, seq: Sequence) -> None:
        """A hybrid's state at the block boundary a preempted sequence reached becomes that block's snapshot,
        so its readmission resumes there. The copy is queued before its slot is freed: ops run in order, so
        it is read before anyone who takes the slot (or the snapshot's) writes it."""
        c, bs = seq.num_computed, self.block_size
        if not (self.has_kda and self.prefix_caching) or c == 0 or c % bs or len(seq.hashes) < c // bs:
            return
        slot = self.slots.new_snapshot(seq.hashes[c // bs - 1])
        if slot is not None:
            self.slot_ops.append(("copy", seq.state_slot, slot))
            self.counters["kda_snapshots"] += 1
            self.counters["preemption_snapshots"] += 1

    def finish(self, seq: Sequence) -> None:
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        elif seq.status == SUSPENDED:
            self.suspended.remove(seq)
        self._free(seq)
        seq.status = FINISHED
        group = self.groups.get(group_key(seq))
        if group is not None:
            if seq.output.finish_reason in ("stop", "length"):
                group["longest"] = max(group["longest"] or 0, len(seq.output.token_ids))
            group["live"] -= 1
            if group["live"] == 0:
                del self.groups[group_key(seq)]
        if self.drafter is not None:
            self.drafter.release(seq)
