"""The inference engine: continuous batching over a paged hybrid cache with exact prefix caching.

    engine = Engine(model, tokenizer)
    engine.add_request("a", prompt_ids, SamplingParams(max_tokens=64, temperature=0.8, seed=1))
    while engine.has_unfinished():
        for out in engine.step(): ...

Each step: the scheduler picks tokens under a budget (decodes first, then chunked prefill), the runner
runs one forward over all of them, each finished row samples with its own parameters and random stream,
and the engine appends tokens, applies stop rules and detokenizes. Not thread-safe: drive it from one thread.
"""
import hashlib
import secrets
import time

import torch
from torch import nn

from nanokimi.infer.block_manager import BlockPool, StateSlots, block_hash
from nanokimi.infer.params import CompletionOutput, RequestOutput, SamplingParams
from nanokimi.infer.runner import ModelRunner, Row, uses_graphs
from nanokimi.infer.sampling import apply_penalties, sample_rows, sample_step, top_logprobs
from nanokimi.infer.scheduler import FINISHED, POLICIES, Request, Scheduler, Sequence
from nanokimi.infer.speculative import accept_matching, make_drafter, take_emitted, verify_uniforms
from nanokimi.model.kda import KimiDeltaAttention
from nanokimi.model.paged import apply_state_slot_ops, paged_cache_bytes, rollback_recurrent_state
from nanokimi.runtime.host import freeze_startup_objects, host_tensor

CPU_DEFAULT_CACHE_TOKENS = 65536


def sample_seed(seed: int | None, index: int) -> int:
    """The seed of sample `index` of a request: the request's seed for sample 0, a hash of both after it."""
    if seed is None:
        return secrets.randbits(62)
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class Engine:
    """See the module docstring. max_cache_tokens=None takes gpu_memory_fraction of the free GPU memory
    (on the CPU: 65536 tokens, or max_model_len if more); a given max_cache_tokens is rounded up to whole blocks.
    snapshot_interval: KDA state snapshots every so many tokens of a sequence
    (rounded to blocks; prompt and output) besides its prompt's last full block (every point splits the delta rule
    of a prefill: benchmarks/snapshot_interval.py); num_state_snapshots: how many are kept (LRU).
    use_cuda_graph: "auto" graphs decode-only steps on CUDA (True: a failed capture raises); compile ("auto":
    wherever CUDA graphs are captured) torch.compiles the step inside them, once per batch bucket, until the
    compilations took compile_budget_s seconds (later buckets are captured uncompiled).
    Seer options (docs/seer.md; all off by default): speculative None | "ngram" | "suffix" (or a drafter
    object) with drafts of num_speculative_tokens at most (twice in the tail); scheduling "fcfs" | "context_aware" with
    max_wait_steps (bounded wait); chunk_tokens > 0 (with context_aware): divided rollout.
    num_verify_slots: with KDA layers, speculation and graphs, the scratch KDA state slots (one per draft token of a
    step) that let verify rows run in the graphed step (None: max_num_seqs x num_speculative_tokens, at most
    max_step_tokens - 1, the most a step can draft; 0: they run eagerly; a step with more draft tokens than
    slots verifies eagerly)."""

    def __init__(self, model: nn.Module, tokenizer=None, max_cache_tokens: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_step_tokens: int = 2048, enable_prefix_caching: bool = True,
                 max_model_len: int | None = None, use_cuda_graph: bool | str = "auto",
                 gpu_memory_fraction: float = 0.75, num_state_snapshots: int | None = None,
                 snapshot_interval: int = 2048, compile: bool | str = "auto", compile_budget_s: float = 120.0,
                 kv_tiers=None, verbose: bool = False,
                 speculative=None, num_speculative_tokens: int = 4, scheduling: str = "fcfs",
                 max_wait_steps: int = 64, chunk_tokens: int = 0, num_verify_slots: int | None = None):
        checks = [(scheduling in POLICIES, f"scheduling must be one of {', '.join(POLICIES)}, got {scheduling!r}"),
                  (isinstance(num_speculative_tokens, int) and num_speculative_tokens >= 1,
                   f"num_speculative_tokens must be an int >= 1, got {num_speculative_tokens!r}"),
                  (max_wait_steps >= 1, f"max_wait_steps must be >= 1, got {max_wait_steps}"),
                  (chunk_tokens >= 0, f"chunk_tokens must be >= 0 (0 = off), got {chunk_tokens}"),
                  (num_verify_slots is None or (isinstance(num_verify_slots, int) and num_verify_slots >= 0),
                   f"num_verify_slots must be None or an int >= 0 (0: verify KDA eagerly), got {num_verify_slots!r}"),
                  (block_size >= 1, f"block_size must be >= 1, got {block_size}"),
                  (max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {max_num_seqs}"),
                  (max_step_tokens >= 1, f"max_step_tokens must be >= 1, got {max_step_tokens}"),
                  (0 < gpu_memory_fraction <= 1, f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Engine: {message}.")
        self.model = model  # step() runs it in eval mode
        self.tokenizer = tokenizer
        self.device = model.embed.weight.device
        self.block_size = block_size
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.has_kda = any(isinstance(b.mixer, KimiDeltaAttention) for b in model.layers)
        self.prefix_caching = enable_prefix_caching
        num_snapshots = (max_num_seqs if num_state_snapshots is None else num_state_snapshots) if self.has_kda else 0
        num_slots = max_num_seqs + num_snapshots if self.has_kda else 0
        # KDA verify rows in the graph step: a scratch state slot per draft token of a step (drafts of twice
        # num_speculative_tokens only while at most max_num_seqs / 8 sequences run); a step's draft tokens and
        # the tokens they follow fit its budget, so never more than max_step_tokens - 1 draft tokens
        graphed_drafts = self.has_kda and speculative is not None and uses_graphs(model, use_cuda_graph)
        scratch = (min(max_num_seqs * num_speculative_tokens, max_step_tokens - 1) if num_verify_slots is None
                   else num_verify_slots)
        self.num_scratch_slots = scratch if graphed_drafts else 0
        self.num_blocks, self.budget_note = self._plan_blocks(max_cache_tokens, num_slots + self.num_scratch_slots,
                                                              gpu_memory_fraction)
        self.runner = ModelRunner(model, self.num_blocks, block_size, max(num_slots, 1), self.max_model_len,
                                  use_cuda_graph, compile, compile_budget_s, self.num_scratch_slots)
        self.pool = BlockPool(self.num_blocks)
        self.slots = StateSlots(num_slots) if self.has_kda else None
        interval = max(block_size, snapshot_interval // block_size * block_size)
        self.snapshot_interval = interval
        self.drafter = make_drafter(speculative)
        self.num_speculative_tokens = num_speculative_tokens
        self.scheduler = Scheduler(self.pool, self.slots, block_size, max_num_seqs, max_step_tokens,
                                   enable_prefix_caching, self.has_kda, self.drafter, num_speculative_tokens,
                                   self.max_model_len, scheduling, max_wait_steps, chunk_tokens)
        self.tiers = None
        if kv_tiers is not None and enable_prefix_caching:
            from nanokimi.infer.tiers import TieredCache
            self.tiers = TieredCache(kv_tiers, self.runner.cache)
            self.pool.on_evict = self.tiers.evict_block
            if self.slots is not None:
                self.slots.on_evict = self.tiers.evict_state
            self.scheduler.tiers = self.tiers
        self.stream_outputs = True  # False: step() returns finished requests only, and text is decoded once at the end
        # False: outputs hold the samples' own token and logprob lists, which the engine goes on appending to (the
        # server takes TokenPrefix views of them in the engine's thread instead of copying whole outputs each step)
        self.copy_outputs = True
        self.requests: dict[str, Request] = {}
        self.aborted: list[Request] = []
        self._finishing: list[Request] = []  # requests whose last sample finished in this step
        self._verify_logits: dict[int, torch.Tensor] = {}  # logits of verified drafts, kept for logprobs
        self.eos_ids = set()
        if tokenizer is not None:
            self.eos_ids = set(getattr(tokenizer, "stop_ids", None) or {tokenizer.eot_id})
        self.counters = dict(requests=0, requests_finished=0, requests_aborted=0, prefill_tokens=0, decode_tokens=0,
                             generated_tokens=0, steps=0, spec_verify_rows=0, spec_draft_tokens=0,
                             spec_accepted_tokens=0)
        self.timing = dict(prefill_tokens_per_s=None, decode_step_s=None)
        self.report = self._report()
        freeze_startup_objects()  # the first engine of a process: full GC passes stop walking torch and the model
        if verbose:
            print(self.report)

    def _plan_blocks(self, max_cache_tokens, num_slots: int, fraction: float) -> tuple[int, str]:
        per_block, per_slot = paged_cache_bytes(self.model, self.block_size)
        slot_bytes = (num_slots + 1) * per_slot
        if max_cache_tokens is not None:  # rounded up to whole blocks: a short request gets at least one
            if max_cache_tokens < 1:
                raise ValueError(f"Engine: max_cache_tokens must be >= 1, got {max_cache_tokens}.")
            return -(-max_cache_tokens // self.block_size) + 1, f"max_cache_tokens={max_cache_tokens}"
        if self.device.type != "cuda" or per_block == 0:  # enough for one request of the whole context at least
            tokens = max(CPU_DEFAULT_CACHE_TOKENS, self.max_model_len)
            return -(-tokens // self.block_size) + 1, f"default {tokens} tokens"
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = int(free * fraction) - slot_bytes
        if budget < 2 * per_block:
            raise ValueError(f"Engine: {free / 2**30:.1f} GiB free GPU memory leave no room for the cache after "
                             f"{slot_bytes / 2**30:.2f} GiB of KDA state slots; lower max_num_seqs or pass "
                             "max_cache_tokens.")
        return budget // per_block + 1, f"{fraction:.0%} of {free / 2**30:.1f} GiB free"

    def _report(self) -> str:
        from nanokimi.ops.kda import kda_backend

        per_block, per_slot = paged_cache_bytes(self.model, self.block_size)
        tokens = (self.num_blocks - 1) * self.block_size
        parts = [f"cache {tokens:,} tokens in {self.num_blocks - 1:,} blocks of {self.block_size} "
                 f"({(self.num_blocks * per_block) / 2**30:.2f} GiB; {self.budget_note})",
                 f"~{tokens // self.max_model_len:,} sequences at max_model_len {self.max_model_len:,}"]
        if self.has_kda:
            fla = kda_backend(self.device)[0] == "fla"
            from nanokimi.model.paged import SHORT_SEGMENT, short_segment_step, use_kda_slot_kernel, use_varlen_kda
            decode = "Triton in-place slot kernel" if use_kda_slot_kernel(self.device) else (
                "fused_recurrent_kda" if fla else "recurrence")
            kernels = f"{'fla chunk_kda' if fla else 'torch chunkwise'} / {decode}"
            if use_varlen_kda(self.device) and short_segment_step(self.device) is not None:
                kernels += f"; prefill segments of <= {SHORT_SEGMENT} tokens through the slot kernel"
            parts.append(f"KDA state slots {self.slots.num_slots} x {per_slot / 2**20:.1f} MiB ({kernels})")
        from nanokimi.model.paged import use_paged_kernel
        mla = "Triton paged kernel" if use_paged_kernel(self.device, self.block_size) else "gathered blocks"
        attention = f"absorbed MLA ({mla}), masked GQA over gathered blocks"
        graphs = "eager"
        if self.runner.use_graphs:
            graphs = "static buffers, no graph" if self.runner.static_only else "CUDA graphs at bucketed batch sizes"
        if self.runner.compiled:
            graphs += f" + torch.compile (per batch bucket, budget {self.runner.compile_budget_s:.0f} s)"
        from nanokimi.model.paged import BATCHED_PREFILL
        prefill = "pieces batched, mixing per piece" if BATCHED_PREFILL else "each piece alone"
        caching = f"on (KDA snapshots every {self.snapshot_interval} tokens)" if self.has_kda else "on"
        parts += [f"decode: {attention}, {graphs}",
                  f"prefill: chunked, {prefill}, max_step_tokens {self.scheduler.max_step_tokens}",
                  f"prefix caching {caching if self.prefix_caching else 'off'}"]
        if self.drafter is not None:
            kind = {"sequence": "ngram", "group": "suffix"}.get(getattr(self.drafter, "scope", None), "custom")
            scratch = ""
            if self.num_scratch_slots:
                scratch = (f"; KDA verify in the graph step: {self.num_scratch_slots} scratch state slots, "
                           f"{self.num_scratch_slots * per_slot / 2**30:.2f} GiB")
            parts.append(f"speculative {kind} (drafts of <= {self.num_speculative_tokens} tokens{scratch})")
        scheduler = self.scheduler
        if scheduler.policy != "fcfs":
            chunks = f", divided rollout every {scheduler.chunk_tokens} tokens" if scheduler.chunk_tokens else ""
            parts.append(f"scheduling {scheduler.policy} (wait <= {scheduler.max_wait_steps} steps{chunks})")
        return "engine: " + "; ".join(parts)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, prompt: str | None = None) -> None:
        params = params or SamplingParams()
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        vocab = self.model.config.vocab_size
        total = len(prompt_token_ids) + params.max_tokens
        capacity = (self.num_blocks - 1) * self.block_size
        checks = [
            (request_id not in self.requests, f"request_id {request_id!r} is already in use"),
            (len(prompt_token_ids) > 0, "the prompt is empty; give at least one token"),
            (all(0 <= t < vocab for t in prompt_token_ids), f"prompt token ids must be in [0, {vocab})"),
            (len(prompt_token_ids) < self.max_model_len,
             f"the prompt has {len(prompt_token_ids)} tokens; the model's context is {self.max_model_len}"),
            (total <= self.max_model_len, f"prompt ({len(prompt_token_ids)} tokens) + max_tokens "
             f"({params.max_tokens}) = {total} exceeds the model's context of {self.max_model_len}; lower max_tokens"),
            (total <= capacity, f"prompt + max_tokens = {total} tokens exceed the whole cache ({capacity} tokens); "
             "raise max_cache_tokens"),
            (not params.stop or self.tokenizer is not None, "stop strings need an engine with a tokenizer"),
            (params.nbce_window is None, "nbce_window requests are decoded by LLM.generate (nanokimi.infer.nbce), "
             "not by the engine"),
            (all(t < vocab for t in params.logit_bias or ()), f"logit_bias token ids must be in [0, {vocab})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"add_request: {message}.")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        request = Request(request_id, prompt_token_ids, params, arrival, prompt)
        request.stop_ids = frozenset(params.stop_token_ids or ()) | (frozenset() if params.ignore_eos else
                                                                      frozenset(self.eos_ids))
        if params.repetition_penalty != 1:
            request.distinct_prompt_ids = host_tensor(sorted(set(prompt_token_ids)))
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        for i in range(params.n):
            seq = Sequence(request, i, sample_seed(seed, i), self.block_size, self.snapshot_interval)
            seq.max_output = min(params.max_tokens, self.max_model_len - seq.num_prompt)
            request.sequences.append(seq)
            self.scheduler.add(seq)
            if self.drafter is not None:
                self.drafter.track(seq)
        self.requests[request_id] = request
        self.counters["requests"] += 1

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.sequences:
            if seq.status != FINISHED:
                seq.output.finish_reason = "abort"
                self.scheduler.finish(seq)
        request.metrics["finished_time"] = time.monotonic()
        self.counters["requests_aborted"] += 1
        self.aborted.append(request)

    def prompt_hashes(self, prompt_token_ids: list[int]) -> list[bytes]:
        """The chain hashes of the prompt's full blocks that a request could reuse (its last token never)."""
        bs, hashes = self.block_size, []
        for i in range((len(prompt_token_ids) - 1) // bs):
            hashes.append(block_hash(hashes[-1] if hashes else None, prompt_token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def num_cached_tokens(self, prompt_token_ids: list[int], hashes: list[bytes] | None = None) -> int:
        """Prompt tokens a request would reuse from the cache (any tier) if added now; changes nothing.
        hashes: prompt_hashes(prompt_token_ids), when the caller asks repeatedly."""
        if not self.prefix_caching:
            return 0
        hashes = self.prompt_hashes(prompt_token_ids) if hashes is None else hashes
        return len(self.scheduler.prefix_of(hashes)) * self.block_size
    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix and KDA snapshot. Call it after changing the model's weights in place
        (RL): cached blocks hold the old weights' keys. Running requests keep their own blocks."""
        self.pool.forget_hashes()
        if self.slots is not None:
            self.slots.drop_snapshots()
        if self.tiers is not None:
            self.tiers.clear()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def num_waiting_prefill_tokens(self) -> int:
        """Prompt tokens still to compute over waiting and prefilling sequences, cached prefixes taken off."""
        total = 0
        for seq in self.scheduler.waiting:
            total += len(seq.tokens) - len(self.scheduler.cached_prefix(seq)) * self.block_size
        for seq in self.scheduler.running:
            if seq.remaining > 1:
                total += seq.remaining
        return total

    def step(self) -> list[RequestOutput]:
        """One scheduling step; the outputs of the requests that changed (finished ones only when
        stream_outputs is False). The model runs in eval mode and is put back in train mode if it was
        (RL trains the same model between rollouts; MoE load counting is off while the engine runs)."""
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            return self._step()
        finally:
            if was_training:
                self.model.train()

    @torch.no_grad()
    def _step(self) -> list[RequestOutput]:
        changed: dict[str, Request] = {r.request_id: r for r in self.aborted}
        self.aborted = []
        self._finishing = []
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return [self._output(r) for r in changed.values()]
        one_token = [item for item in scheduled if item[1] == 1]  # one-token rows first (the runner batches them)
        if len(one_token) < len(scheduled):
            scheduled = one_token + [item for item in scheduled if item[1] != 1]
        started = time.perf_counter()
        self._apply_slot_ops()
        now = time.monotonic()
        rows, decode = [], 0
        for seq, n in scheduled:
            metrics = seq.request.metrics
            if metrics["first_scheduled_time"] is None:
                metrics["first_scheduled_time"] = now
            c = seq.num_computed
            if n == 1:  # a decode, or a prompt's last token
                rows.append(Row(seq.tokens[c:c + 1], c, seq.block_table, seq.state_slot, c + 1 == len(seq.tokens)))
                decode += c >= seq.num_prompt
                continue
            if seq.draft and seq.remaining == 1:  # the last token and a draft to verify: logits at each
                rows.append(Row(seq.tokens[c:] + seq.draft, c, seq.block_table, seq.state_slot, True, num_logits=n,
                                saved_states=[] if self.has_kda else None))
                continue
            rows.append(Row(seq.tokens[c:c + n], c, seq.block_table, seq.state_slot, c + n == len(seq.tokens),
                            snapshots=self.scheduler.interior_snapshots(seq, n)))
        if self.tiers is not None:
            self.tiers.flush()  # snapshots evicted for this step's interior ones go down before the step writes them
        logits = self.runner.run(rows)
        plain, plain_rows, verified, offset = [], [], [], 0
        if self.drafter is None:  # no draft to verify: one logits row per row that wants one, in order
            plain = [seq for (seq, _), row in zip(scheduled, rows) if row.wants_logits]
            scheduled_rows = ()
        else:
            scheduled_rows = zip(scheduled, rows)
        for (seq, n), row in scheduled_rows:
            if not row.wants_logits:
                continue
            if row.num_logits == 1:  # no per-row slice: the sampled rows are taken together below
                plain.append(seq)
                plain_rows.append(offset)
            else:
                verified.append((seq, row, offset))
            offset += row.num_logits
        verified = [(seq, emitted) for (seq, _, _), emitted in zip(verified, self._accept(verified, logits))]
        computed = {id(seq): len(emitted) for seq, emitted in verified}
        self.scheduler.after_step([(seq, computed.get(id(seq), n)) for seq, n in scheduled] if verified else scheduled)
        for seq, _ in verified:
            self.scheduler.shrink(seq)
        self._apply_slot_ops()
        if plain:
            self._sample(plain, logits if not verified else logits[torch.tensor(plain_rows, device=logits.device)])
        for seq, emitted in verified:
            self._emit_verified(seq, emitted, self._verify_logits.pop(id(seq), None))
        self._account(scheduled, time.perf_counter() - started, decode,
                      sum(len(r.tokens) for r in rows if r.num_logits > 1) if verified else 0,
                      sum(len(e) for _, e in verified))
        if self.stream_outputs:
            for seq, _ in scheduled:
                changed[seq.request.request_id] = seq.request
        else:  # only requests that finished report; a request finishes when its last sample does, in _check_finish
            for request in self._finishing:
                changed[request.request_id] = request
        outputs = []
        for request in changed.values():
            finished = request.finished
            if finished and request.request_id in self.requests:
                request.metrics["finished_time"] = time.monotonic()
                del self.requests[request.request_id]
                self.counters["requests_finished"] += 1
            if self.stream_outputs or finished:
                outputs.append(self._output(request, finished))
        return outputs

    def _accept(self, verified: list[tuple[Sequence, Row, int]], logits: torch.Tensor) -> list[list[int]]:
        """The emitted tokens of each verified draft (verified: sequence, row, offset of the row's logits). At every
        position of every row, the token plain decoding would draw there (the argmax, or the plain sampler with the
        numbers the sequence's stream holds next), all drawn in one batched call and brought to the host in one
        transfer."""
        if not verified:
            return []
        first, (_, last_row, last) = verified[0][2], verified[-1]
        count = sum(row.num_logits for _, row, _ in verified)
        if last + last_row.num_logits - first == count:  # one run of rows (no prompt chunk among them): a view
            logits = logits[first:first + count]
        else:
            index = [offset + i for _, row, offset in verified for i in range(row.num_logits)]
            logits = logits[torch.tensor(index, device=logits.device)]  # [sum of 1 + draft, V]
        temperature, top_k, top_p, uniforms = [], [], [], []
        for seq, row, _ in verified:
            p, positions = seq.request.params, row.num_logits
            temperature += [p.temperature] * positions
            top_k += [p.top_k] * positions
            top_p += [p.top_p] * positions
            uniforms += verify_uniforms(seq.rng, p.temperature, positions)
        draws = sample_rows(logits, temperature, top_k, top_p, uniforms).tolist()
        emitted, start = [], 0
        for seq, row, _ in verified:
            emitted.append(self._verify(seq, row, draws[start:start + row.num_logits]))
            if seq.request.params.logprobs is not None:
                self._verify_logits[id(seq)] = logits[start:start + len(emitted[-1])]
            start += row.num_logits
        return emitted

    def _verify(self, seq: Sequence, row: Row, draws: list[int]) -> list[int]:
        """Accept a verified draft by the rule (nanokimi/infer/speculative.py; draws: plain decoding's token at
        each position); advance a sampled sequence's stream by the tokens emitted; roll the KDA state back to
        the last emitted-and-computed token; return the emitted tokens (accepted drafts and one new token),
        which are appended to seq.tokens so that after_step hashes the computed blocks."""
        params = seq.request.params
        draft, seq.draft = seq.draft, []
        emitted = accept_matching(draws, draft)
        take_emitted(seq.rng, params.temperature, emitted)
        # the state after the last token + accepted drafts (the new token is not computed)
        if row.token_slots and len(emitted) > 1:  # graph step: copied after the step, before any snapshot of it
            self.scheduler.slot_ops.append(("copy", row.token_slots[len(emitted) - 1], seq.state_slot))
        elif row.saved_states:
            rollback_recurrent_state(row.saved_states, seq.state_slot, len(emitted))
        accepted = len(emitted) - 1
        seq.accepted_ema = accepted if seq.accepted_ema is None else 0.7 * seq.accepted_ema + 0.3 * accepted
        self.counters["spec_verify_rows"] += 1
        self.counters["spec_draft_tokens"] += len(draft)
        self.counters["spec_accepted_tokens"] += accepted
        seq.tokens.extend(emitted)
        return emitted

    def _emit_verified(self, seq: Sequence, emitted: list[int], logits: torch.Tensor | None) -> None:
        """Output the emitted tokens one by one through the stop rules (a stop ends the sample mid-draft); logits:
        the emitted positions' rows where the request asked for logprobs."""
        params = seq.request.params
        entries = []
        if logits is not None:
            chosen = torch.tensor(emitted, device=logits.device)
            entries = top_logprobs(logits, chosen, [params.logprobs] * len(emitted))
        now = time.monotonic()
        metrics = seq.request.metrics
        metrics["first_token_time"] = metrics["first_token_time"] or now
        metrics["last_token_time"] = now
        for i, token in enumerate(emitted):
            self.counters["generated_tokens"] += 1
            seq.run_tokens += 1
            if entries:
                seq.output.logprobs.append(entries[i])
            self._check_finish(seq, token)
            if seq.status == FINISHED:
                break
        if self.drafter is not None and seq.status != FINISHED:
            self.drafter.observe(seq)

    def _apply_slot_ops(self) -> None:
        if self.tiers is not None:
            self.tiers.flush()  # evicted blocks and snapshots go down before anything overwrites them
        ops, self.scheduler.slot_ops = self.scheduler.slot_ops, []
        layers, run = self.runner.cache.recurrent_layers(), []
        for op in ops:  # zeros and copies batched (a few operators per layer), loads in their place among them
            if op[0] == "load":
                apply_state_slot_ops(layers, run)
                run = []
                self.tiers.load_state(op[1], op[2])
            else:
                run.append(op)
        apply_state_slot_ops(layers, run)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """All rows drawn in one batched call, their tokens (and logprobs) brought back in one copy."""
        params = [s.request.params for s in seqs]
        penalized = [i for i, s in enumerate(seqs) if s.request.penalized]
        if penalized:
            logits = apply_penalties(logits, penalized, [params[i] for i in penalized],
                                     [seqs[i].output.token_ids for i in penalized],
                                     [seqs[i].request.distinct_prompt_ids for i in penalized],
                                     [seqs[i].request.stop_ids if len(seqs[i].output.token_ids) < params[i].min_tokens
                                      else frozenset() for i in penalized])
        temperature = [p.temperature for p in params]
        if any(temperature):
            uniforms = [s.rng.random() if t > 0 else 0.0 for s, t in zip(seqs, temperature)]
            top_k, top_p = [p.top_k for p in params], [p.top_p for p in params]
        else:  # all greedy: no draw, no filter
            uniforms = top_k = top_p = temperature
        tokens, logprobs = sample_step(logits, temperature, top_k, top_p, uniforms, [p.logprobs for p in params])
        now = time.monotonic()
        self.counters["generated_tokens"] += len(seqs)
        drafter = self.drafter
        detokenize = self.tokenizer is not None and self.stream_outputs
        stop_strings = self.tokenizer is not None
        for seq, token, entry in zip(seqs, tokens, logprobs):
            seq.tokens.append(token)
            seq.run_tokens += 1
            output, request = seq.output, seq.request
            if entry is not None:
                output.logprobs.append(entry)
            metrics = request.metrics
            if metrics["first_token_time"] is None:
                metrics["first_token_time"] = now
            metrics["last_token_time"] = now
            output.token_ids.append(token)  # _check_finish inlined: most tokens end nothing and need no text
            if (token in request.stop_ids or len(output.token_ids) >= seq.max_output or detokenize
                    or (stop_strings and request.params.stop)):
                self._apply_stop_rules(seq, token)
            if drafter is not None and seq.status != FINISHED:
                drafter.observe(seq)

    def _check_finish(self, seq: Sequence, token: int) -> None:
        """Output the token and end the sample if it stops it (stop token, stop string, length)."""
        seq.output.token_ids.append(token)
        self._apply_stop_rules(seq, token)

    def _apply_stop_rules(self, seq: Sequence, token: int) -> None:
        """The stop rules for the output's last token (`token`); detokenizes when text is wanted."""
        request = seq.request
        output = seq.output
        params = request.params
        stopped_by_token = token in request.stop_ids
        reason = "stop" if stopped_by_token else None
        if self.tokenizer is not None and not stopped_by_token and (self.stream_outputs or params.stop):
            grown_from = len(output.text)
            self._detokenize(seq, output.token_ids)
            if params.stop and self._cut_at_stop(output, params.stop, grown_from):
                reason = "stop"
        emitted = len(output.token_ids)  # = seq.num_output, except after a verified draft (its tokens are all in)
        if reason is None and emitted >= seq.max_output:
            reason = "length"
        if reason is not None:
            if self.tokenizer is not None:  # the final text: one decode of everything (incremental pieces may differ)
                output.text = self.tokenizer.decode(output.token_ids[:-1] if stopped_by_token else output.token_ids)
                if params.stop:
                    self._cut_at_stop(output, params.stop, 0)
            output.finish_reason = reason
            self.scheduler.finish(seq)
            if request.finished:
                self._finishing.append(request)

    def _detokenize(self, seq: Sequence, ids: list[int]) -> None:
        """Append the text of the new tokens, decoding only the tokens since the last complete piece (so a
        step costs the same however long the output is). Text that ends in an incomplete character waits."""
        prefix, read = seq.detok_offsets
        before = self.tokenizer.decode(ids[prefix:read])
        after = self.tokenizer.decode(ids[prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            seq.output.text += after[len(before):]
            seq.detok_offsets = (read, len(ids))

    @staticmethod
    def _cut_at_stop(output: CompletionOutput, stops: list[str], grown_from: int) -> bool:
        """Cut the text before the earliest stop string that ends after grown_from; whether one was found."""
        hits = [i for i in (output.text.find(s, max(0, grown_from - len(s) + 1)) for s in stops) if i >= 0]
        if hits:
            output.text = output.text[:min(hits)]
        return bool(hits)

    def _account(self, scheduled, seconds: float, decode: int, verified_rows: int = 0, verified_tokens: int = 0) -> None:
        """decode: one-token rows past their prompts; verified_rows: tokens run to verify drafts; verified_tokens:
        tokens they emitted (counted as decode)."""
        prefill = sum(n for _, n in scheduled) - decode - verified_rows
        decode += verified_tokens
        self.counters["prefill_tokens"] += prefill
        self.counters["decode_tokens"] += decode
        self.counters["steps"] += 1
        if prefill >= 64:
            rate = prefill / max(seconds, 1e-9)
            old = self.timing["prefill_tokens_per_s"]
            self.timing["prefill_tokens_per_s"] = rate if old is None else 0.8 * old + 0.2 * rate
        elif decode:
            old = self.timing["decode_step_s"]
            self.timing["decode_step_s"] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def _output(self, request: Request, finished: bool | None = None) -> RequestOutput:
        copy = list if self.copy_outputs else (lambda items: items)
        outputs = [CompletionOutput(s.output.index, copy(s.output.token_ids), s.output.text, s.output.finish_reason,
                                    None if s.output.logprobs is None else copy(s.output.logprobs))
                   for s in request.sequences]
        return RequestOutput(request.request_id, request.prompt_token_ids, outputs,
                             request.finished if finished is None else finished, request.num_cached_tokens,
                             dict(request.metrics), request.prompt)

    def stats(self) -> dict:
        scheduler = self.scheduler
        usable = self.pool.num_usable
        free = self.pool.num_free
        return {
            **self.counters, **scheduler.counters, **self.timing,
            "requests_running": len({s.request.request_id for s in scheduler.running}),
            "requests_waiting": len({s.request.request_id for s in scheduler.waiting} -
                                    {s.request.request_id for s in scheduler.running}),
            "sequences_running": len(scheduler.running), "sequences_waiting": len(scheduler.waiting),
            "sequences_suspended": len(scheduler.suspended),
            "spec_mean_accepted": self.counters["spec_accepted_tokens"] / max(self.counters["spec_verify_rows"], 1),
            "num_waiting_prefill_tokens": self.num_waiting_prefill_tokens(),
            "cache_blocks_total": usable, "cache_blocks_free": free,
            "cache_blocks_cached": len(self.pool.cached),
            "cache_usage": 0.0 if usable == 0 else 1 - free / usable,
            "cache_tokens_total": usable * self.block_size, "block_size": self.block_size,
            "kda_snapshots_held": 0 if self.slots is None else len(self.slots.snapshots),
            **({"kv_tiers": self.tiers.store.stats()} if self.tiers is not None else {}),
            "max_model_len": self.max_model_len, "cuda_graphs": len(self.runner.graphs),
            "cuda_graphs_compiled": len(self.runner.compiled_buckets),
            "compile_seconds": round(self.runner.compile_seconds, 1),
        }

