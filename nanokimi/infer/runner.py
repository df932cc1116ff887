"""Runs the model over one engine step: packs the scheduled pieces, builds the paged batch, returns logits.

Decode-only steps on CUDA replay a CUDA graph captured per (batch bucket, block-table bucket): the
rows are padded up to the bucket with rows that write to the reserved block 0 and the spare state slot.
"""
import operator
import time
import warnings
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate, chain, compress, repeat

import torch
from torch import nn

from nanokimi.model.kda import KimiDeltaAttention
from nanokimi.model.paged import (PagedBatch, PrefillPiece, check_kda_slot_kernel, new_paged_cache, packed_context,
                                  short_pieces, short_segment_step)
from nanokimi.model.rope import Rotary
from nanokimi.runtime.graphs import capture, graph_pool
from nanokimi.runtime.host import host_tensor

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 896, 1024)
ROUNDS = (1, 2, 3, 5, 9, 17, 33)  # KDA chain-length buckets of graphs with verify rows (drafts of 1, 2, 4, 8, ..)


@dataclass
class Row:
    """One sequence's share of a step: `tokens` at positions start .. start+len-1."""
    tokens: list[int]
    start: int
    block_table: list[int]
    state_slot: int | None
    wants_logits: bool
    snapshots: list[tuple[int, int]] = field(default_factory=list)  # KDA: (tokens into the row, snapshot slot)
    num_logits: int = 1  # logits of the last num_logits tokens (a speculative draft's verification wants all)
    saved_states: list | None = None  # a list: KDA layers keep their state after every token (PrefillPiece's)
    # set by the runner when a KDA model's verify row ran in the graph step: the state slot holding the state
    # (and conv tail) after each of its tokens (the row's own slot first, then scratch slots)
    token_slots: list[int] | None = None


class StaticReplay:
    """Stands in for a CUDA graph (use_cuda_graph="static"): replay() runs the captured function eagerly
    on the same static buffers, so the padding and bucketing around graphs are tested on any device."""

    def __init__(self, fn):
        self.fn, self.output = fn, None

    def replay(self) -> None:
        self.output = self.fn()


def _verify_as_decode_rows(rows: list[Row]) -> list[Row]:
    """Verify rows (tokens t_0..t_d at positions p..p+d, logits at each) as d+1 one-token rows at p..p+d
    sharing the row's block table. In the decode step every row writes its key/value (latent) to its slot
    before any row attends, and row p+i attends to keys 0..p+i only: the draft's causal mask comes for free.
    The readable reference of `ModelRunner._run_graphed_groups`, which builds the same graph inputs without
    these rows."""
    return [Row([token], row.start + i, row.block_table, row.state_slot, True)
            for row in rows for i, token in enumerate(row.tokens)]


@dataclass
class _TableRuns:
    """A graph's block-table buffer recorded by runs: its first counts[0] rows hold tables[0], the next
    counts[1] rows tables[1], and so on (a verify row's d+1 graph rows share its table); rows past them: block 0."""
    tables: list[list[int]]
    counts: list[int]

    def rows(self) -> list[list[int]]:
        return list(chain.from_iterable(map(repeat, self.tables, self.counts)))


_TOKENS, _START, _BLOCK_TABLE, _NUM_LOGITS = map(operator.attrgetter, ("tokens", "start", "block_table", "num_logits"))


def _bucket(value: int, sizes) -> int | None:
    return next((s for s in sizes if s >= value), None)


def uses_graphs(model: nn.Module, use_cuda_graph: bool | str) -> bool:
    """Whether the runner runs decode steps through (CUDA or "static") graphs: not for MoBA models."""
    here = use_cuda_graph == "static" or (model.embed.weight.device.type == "cuda" and use_cuda_graph is not False)
    return here and not any(getattr(b.mixer, "moba", False) for b in model.layers)


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, num_state_slots: int,
                 max_model_len: int, use_cuda_graph: bool | str = "auto", compile: bool | str = "auto",
                 compile_budget_s: float = 120.0, num_scratch_slots: int = 0):
        """num_scratch_slots: KDA state slots (after the engine's num_state_slots) for the states after the
        draft tokens of verify rows in the graph step, one per draft token of a step; 0: KDA verify rows run
        eagerly."""
        self.model, self.block_size, self.max_model_len = model, block_size, max_model_len
        self.device = model.embed.weight.device
        self.cache = new_paged_cache(model, num_blocks, block_size, num_state_slots + num_scratch_slots + 1)
        self.scratch_slots = range(num_state_slots, num_state_slots + num_scratch_slots)
        self.dummy_slot = num_state_slots + num_scratch_slots
        for module in model.modules():
            if isinstance(module, Rotary):
                module.ensure_length(max_model_len, self.device)
        if use_cuda_graph not in (True, False, "auto", "static"):
            raise ValueError(f"use_cuda_graph must be True, False, 'auto' or 'static', got {use_cuda_graph!r}.")
        if use_cuda_graph is True and self.device.type != "cuda":
            raise ValueError("use_cuda_graph=True needs the model on a CUDA device; pass 'auto', 'static' or False.")
        # "static": the padded, fixed-shape step a graph captures, run eagerly on its static buffers (any device)
        self.static_only = use_cuda_graph == "static"
        self.use_graphs = uses_graphs(model, use_cuda_graph)
        self.graph_required = use_cuda_graph is True
        self.graphs: dict[tuple[int, int, int], tuple] = {}  # (batch bucket, table-width bucket, KDA rounds)
        self.graph_tables: dict[tuple[int, int, int], list | _TableRuns] = {}  # the tables in each graph's inputs
        self.graph_pool = None
        self.max_blocks = -(-max_model_len // block_size)
        # speculative verify rows run as one-token rows of the graphed step. Attention (GQA, MLA) over the paged
        # cache needs nothing more; a KDA state goes through a draft's tokens one after another: the draft's
        # rows form a chain (`PagedBatch.depths`), each row's state lands in a scratch slot
        self.kda = any(isinstance(b.mixer, KimiDeltaAttention) for b in model.layers)
        self.graph_verify = not self.kda or num_scratch_slots > 0
        self.verify_rows = {"graphed": 0, "eager": 0}  # verify rows (drafts) run by each path so far
        if self.kda and self.device.type == "cuda":
            check_kda_slot_kernel(self.device)  # before any capture: decode rows take the kernel only if it passed
            short_segment_step(self.device)  # and the prefill's short segments (checked over shared-slot chains)
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}.")
        self.capturing_compiled = False
        # "auto": torch.compile inside the CUDA graphs on CUDA (not for the "static" stand-in on the CPU)
        self.compiled = self.use_graphs and (compile is True or (compile == "auto" and not self.static_only))
        self.compile_budget_s, self.compile_seconds, self.compiled_buckets = compile_budget_s, 0.0, []
        if self.compiled:
            from nanokimi.runtime import compile_fn  # raises the recompile limits: one graph per batch bucket,
            self.compiled_fn = compile_fn(self._logits, dynamic=False)  # plus breaks around the Triton/fla kernels

    def _logits(self, ids: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """The decode-only step that CUDA graphs capture: ids [B] -> logits [B, V]."""
        return self.model.lm_head(self.model.hidden_states(ids[None], cache=self.cache, batch=batch)[0])

    @torch.no_grad()
    def run(self, rows: list[Row]) -> torch.Tensor:
        """Logits [R, V] of the last token (the last num_logits tokens) of each row that wants them, in order.
        Rows of one token must come first (the engine orders them so). With CUDA graphs, the one-token
        rows replay a graph, and so do speculative verify rows (as one graph row per token, `_run_graphed_groups`;
        a KDA model's need scratch slots for their draft tokens); the other longer rows (prefill chunks, verify rows
        beyond the scratch slots) run eagerly after it."""
        lengths = list(map(len, map(_TOKENS, rows)))
        num_decode = lengths.count(1)
        if lengths[:num_decode].count(1) != num_decode:
            raise ValueError("rows of one token must come before longer rows")
        decode, longer = rows[:num_decode], rows[num_decode:]
        num_logits = list(map(_NUM_LOGITS, longer))
        as_decode = [r.wants_logits and wanted == length for r, wanted, length in
                     zip(longer, num_logits, lengths[num_decode:])] if self.graph_verify else [False] * len(longer)
        verifying = list(compress(longer, as_decode))
        if self.kda and sum(map(len, map(_TOKENS, verifying))) - len(verifying) > len(self.scratch_slots):
            as_decode, verifying = [False] * len(longer), []  # more draft tokens than scratch slots: eager
        verify_rows, graphed_verify = len(num_logits) - num_logits.count(1) - num_logits.count(0), sum(as_decode)
        graphed = None
        if self.use_graphs and verifying:
            graphed = self._run_graphed_groups(decode + verifying)
        elif self.use_graphs and decode:
            graphed = self._run_graphed(decode)
        if graphed is None:
            self.verify_rows["eager"] += verify_rows
            return self._run_eager(rows, num_decode)
        self.verify_rows["graphed"] += graphed_verify
        self.verify_rows["eager"] += verify_rows - graphed_verify
        # each wanted logit in row order: graphed rows index the graph's output, the eager rows' follow it
        order = [i for i, r in enumerate(decode) if r.wants_logits]
        next_graphed = len(decode)
        next_eager = next_graphed + sum(map(len, map(_TOKENS, verifying)))
        eager = []
        if graphed_verify == len(longer):  # no eager rows: the verify rows' logits follow the one-token rows'
            order += range(next_graphed, next_eager)
            next_graphed, longer = next_eager, []
        for r, yes in zip(longer, as_decode):
            if yes:
                order.extend(range(next_graphed, next_graphed + len(r.tokens)))
                next_graphed += len(r.tokens)
                continue
            eager.append(r)
            if r.wants_logits:
                order.extend(range(next_eager, next_eager + r.num_logits))
                next_eager += r.num_logits
        logits = graphed[:next_graphed]
        if not eager and len(order) == next_graphed:  # every graphed row's logits (order: increasing)
            return logits.clone()  # a copy: the next replay rewrites the graph's output
        if eager:
            logits = torch.cat([logits, self._run_eager(eager, 0)])
        if eager and order == list(range(logits.shape[0])):  # the cat above copied the graph's output
            return logits
        return logits.index_select(0, torch.tensor(order, device=logits.device))

    def _run_graphed_chunks(self, rows: list[Row]) -> torch.Tensor | None:
        """`_run_graphed` in chunks of at most the largest graph bucket (expanded verify rows can outnumber
        it); every chunk's logits are copied before the next replay. Attention-only models alone come here:
        a later chunk that cannot be graphed sends the whole step to the eager path, which rewrites the
        same keys and values (a KDA state would advance twice). With `_verify_as_decode_rows`, the readable
        reference of `_run_graphed_groups`."""
        largest = GRAPH_BATCH_SIZES[-1]
        if len(rows) <= largest:
            return self._run_graphed(rows)
        parts = []
        for i in range(0, len(rows), largest):
            chunk = self._run_graphed(rows[i:i + largest])
            if chunk is None:
                return None
            parts.append(chunk[:min(largest, len(rows) - i)].clone())
        return torch.cat(parts)

    def _run_eager(self, rows: list[Row], num_decode: int) -> torch.Tensor:
        batch, ids, last = self._build(rows, num_decode)
        hidden = self.model.hidden_states(ids[None], cache=self.cache, batch=batch)[0]  # [N, D]
        wanted = [j for i, r in enumerate(rows) if r.wants_logits
                  for j in range(last[i] - r.num_logits + 1, last[i] + 1)]
        return self.model.lm_head(hidden[torch.tensor(wanted, device=self.device, dtype=torch.long)])

    def _decode_tensors(self, rows: list[Row], width: int, size: int | None = None, tables: bool = True):
        """Host tensors of the one-token rows: block tables [size, width] (padded with block 0; None unless
        `tables`), and lists of positions, cache slots and state slots."""
        positions = [r.start for r in rows]
        bs = self.block_size
        slots = [r.block_table[p // bs] * bs + p % bs for r, p in zip(rows, positions)]
        state = [self.dummy_slot if r.state_slot is None else r.state_slot for r in rows]
        table = self._decode_tables([r.block_table for r in rows], width, size) if tables else None
        return table, positions, slots, state

    def _changed_tables(self, key: tuple[int, int, int], tables: list[list[int]]) -> list[int]:
        """The rows of graph `key`'s block-table buffer that differ from these rows' tables (a row past the
        last one is padding: all block 0); the record of the buffer's contents is updated to these tables.
        A row's table changes every block_size steps, and rows move up when a sequence before them ends."""
        held = self.graph_tables.setdefault(key, [])
        if isinstance(held, _TableRuns):
            held = self.graph_tables[key] = held.rows()
        if held == tables:
            return []
        changed = list(compress(range(len(tables)), map(operator.ne, held, tables)))
        changed += range(min(len(held), len(tables)), max(len(held), len(tables)))  # new rows, or rows now padding
        del held[len(tables):]
        held.extend([] for _ in range(len(tables) - len(held)))
        for i in changed:
            if i < len(tables):
                held[i] = list(tables[i])
        return changed

    @staticmethod
    def _decode_tables(tables: list[list[int]], width: int, size: int | None = None) -> torch.Tensor:
        """Block tables [size or len(tables), width], padded with block 0 (rows past the last table: all block 0).
        One flat list and one array conversion: about 25 ns a block entry, cheaper than tensors kept per row."""
        flat = []
        for table in tables:
            flat += table
            flat += [0] * (width - len(table))
        flat += [0] * (((size or len(tables)) - len(tables)) * width)
        return host_tensor(flat).view(-1, width)

    def _build(self, rows: list[Row], num_decode: int):
        device = self.device
        decode = rows[:num_decode]
        width = max((len(r.block_table) for r in decode), default=1)
        tables, positions, slots, state = self._decode_tensors(decode, width)
        pieces, offset, last = [], num_decode, list(range(num_decode))
        bs = self.block_size
        prefill = rows[num_decode:]
        flat = torch.tensor([b for r in prefill for b in r.block_table], dtype=torch.long)  # every piece's table
        table_lengths = torch.tensor([len(r.block_table) for r in prefill], dtype=torch.long)
        lengths = torch.tensor([len(r.tokens) for r in prefill], dtype=torch.long)
        # each prefill token's position and cache slot, over all pieces at once: p and table[p // bs] * bs + p % bs
        token_starts = (lengths.cumsum(0) - lengths).repeat_interleave(lengths)
        prefill_positions = torch.tensor([r.start for r in prefill], dtype=torch.long).repeat_interleave(lengths) + \
            torch.arange(int(lengths.sum())) - token_starts
        table_starts = (table_lengths.cumsum(0) - table_lengths).repeat_interleave(lengths)
        prefill_slots = flat[table_starts + prefill_positions // bs] * bs + prefill_positions % bs
        ids = torch.tensor([t for r in rows for t in r.tokens], dtype=torch.long)
        host = torch.cat([torch.tensor([positions, slots, state], dtype=torch.long).view(-1), prefill_positions,
                          prefill_slots, ids, flat]).to(device)  # one host-to-device copy
        n, m = len(decode), len(prefill_positions)
        (decode_positions, decode_slots, decode_state, prefill_positions, prefill_slots, ids,
         flat) = host.split([n, n, n, m, m, len(ids), len(flat)])
        for r, table in zip(prefill, flat.split(table_lengths.tolist())):
            pieces.append(PrefillPiece(offset, len(r.tokens), r.start, table,
                                       self.dummy_slot if r.state_slot is None else r.state_slot, r.snapshots,
                                       saved_states=r.saved_states))
            offset += len(r.tokens)
            last.append(offset - 1)
        host_tables = [r.block_table for r in prefill]
        short = short_pieces(pieces, host_tables, num_decode, device)
        packed = packed_context(pieces, host_tables, short.members if short else [], num_decode, bs, device)
        batch = PagedBatch(self.block_size, num_decode, decode_positions, tables.to(device), decode_slots, decode_state,
                           pieces, prefill_positions, prefill_slots, short, packed)
        return batch, ids, last

    def _graph(self, num_rows: int, longest: int, rounds: int = 1) -> tuple[int, int, int] | None:
        """The key (batch bucket, table-width bucket, KDA rounds bucket) of the graph for num_rows rows whose
        longest block table has `longest` blocks and whose KDA chains are at most `rounds` rows long, captured
        now if new; None where no graph fits or capture failed."""
        size = _bucket(num_rows, GRAPH_BATCH_SIZES)
        width = min(_bucket(longest, [2 ** i for i in range(32)]), self.max_blocks)
        if size is None or width < longest:
            return None
        depth = _bucket(rounds, ROUNDS)  # extra rounds step no row
        if depth is None:
            return None
        key = (size, width, depth)
        while key not in self.graphs:
            try:
                if self.compiled and not self.graphs:  # can the step be captured at all? (a model with a host
                    self._capture(*key, probe=True)  # sync inside must not pay for a compile first)
                self.graphs[key] = self._capture(*key)
            except Exception as error:  # noqa: BLE001 - the eager step computes the same thing
                if self.graph_required and not self.capturing_compiled:
                    raise
                if self.capturing_compiled:  # try again without torch.compile before giving up on graphs
                    warnings.warn(f"torch.compile of the engine's decode step failed ({type(error).__name__}: "
                                  f"{error}); capturing it uncompiled.")
                    self.compiled, self.graph_pool = False, None  # a fresh pool: the failure may have broken it
                    continue
                warnings.warn(f"CUDA graph capture of the engine's decode step failed ({type(error).__name__}: "
                              f"{error}); decoding eagerly.")
                self.use_graphs = False
                return None
        return key

    def _replay(self, key: tuple[int, int, int], host: torch.Tensor, changed: list[int],
                new: torch.Tensor | None) -> torch.Tensor:
        """Replay graph `key` on the host inputs [5 * size] (ids, positions, cache slots, state slots, KDA depths) and
        the block-table rows `changed`, rewritten whole to `new` [len(changed), width] (changed None: every row, new
        [size, width]); its logits [size, V]."""
        graph, inputs, batch, logits = self.graphs[key]
        if isinstance(graph, StaticReplay):
            logits = graph
        if changed is None:
            inputs.copy_(torch.cat([host, new.flatten()]), non_blocking=True)
        elif not changed:
            inputs[:host.shape[0]].copy_(host, non_blocking=True)
        else:  # the rows whose tables changed, rewritten whole (zero-padded) on the device after one copy
            staged = torch.cat([host, host_tensor(changed), new.flatten()]).to(self.device, non_blocking=True)
            inputs[:host.shape[0]].copy_(staged[:host.shape[0]])
            index, values = staged[host.shape[0]:].split([len(changed), new.numel()])
            batch.block_tables.index_copy_(0, index, values.view(len(changed), -1))
        graph.replay()
        return logits.output if isinstance(logits, StaticReplay) else logits

    def _run_graphed(self, rows: list[Row]) -> torch.Tensor | None:
        row_tables = [r.block_table for r in rows]
        key = self._graph(len(rows), max(map(len, row_tables)))
        if key is None:
            return None
        size, width, _ = key
        pad = size - len(rows)
        _, positions, slots, state = self._decode_tensors(rows, width, size, tables=False)
        zeros = [0] * pad
        host = host_tensor([r.tokens[0] for r in rows] + zeros + positions + zeros + slots + zeros + state +
                           [self.dummy_slot] * pad + [0] * size)  # depths: none of them continues another
        changed = self._changed_tables(key, row_tables)  # rows past the last row (now padding) come last: block 0
        new = self._decode_tables([row_tables[i] for i in changed if i < len(rows)], width, len(changed)) \
            if changed else None
        return self._replay(key, host, changed, new)

    def _changed_runs(self, key: tuple[int, int, int], tables: list[list[int]], counts: list[int]) -> list[int] | None:
        """`_changed_tables` for rows given by runs (counts[i] rows of tables[i]), compared once a run, not once a
        row; None where the record holds other runs (its buffer is then rewritten whole: the chunks of one step
        share a graph, and each holds other sequences)."""
        held = self.graph_tables.get(key)
        if not isinstance(held, _TableRuns) or held.counts != counts:
            self.graph_tables[key] = _TableRuns(list(map(list, tables)), list(counts))
            return None
        runs = list(compress(range(len(tables)), map(operator.ne, held.tables, tables)))
        if not runs:
            return []
        first = list(accumulate(counts, initial=0))
        for i in runs:
            held.tables[i] = list(tables[i])
        return list(chain.from_iterable(range(first[i], first[i + 1]) for i in runs))

    def _run_graphed_groups(self, rows: list[Row]) -> torch.Tensor | None:
        """`_run_graphed_chunks(_verify_as_decode_rows(rows))` without building a row per token: one-token rows
        and verify rows (tokens t_0..t_d at p..p+d) become graph rows (a token each) by arithmetic over all the
        tokens at once, and the graphs' block tables are compared once a row, not once a token. In a KDA model
        a verify row's graph rows form a chain (depths 0..d): the row at depth j writes the state after t_j to
        a scratch slot (depth 0: the sequence's slot), recorded in `Row.token_slots` for the engine's rollback;
        its chain is never split between replays, and every graph is captured before the first replay (a step
        that falls back to the eager path must not have advanced a state)."""
        tokens = list(map(_TOKENS, rows))
        counts = list(map(len, tokens))
        tables = list(map(_BLOCK_TABLE, rows))
        table_lengths = list(map(len, tables))
        first = list(accumulate(counts, initial=0))  # each row's first graph row
        n, bs = first[-1], self.block_size
        dummy = self.dummy_slot
        per_row = host_tensor(counts + list(map(_START, rows)) + table_lengths +
                              [dummy if r.state_slot is None else r.state_slot for r in rows])
        lengths, starts, table_lengths_t, state = per_row.view(4, -1)  # [rows] each
        table_starts = table_lengths_t.cumsum(0) - table_lengths_t  # where each row's table starts in `flat`
        owner = torch.repeat_interleave(lengths)  # [n] the row of each graph row
        depths = torch.arange(n) - (lengths.cumsum(0) - lengths)[owner]  # [n] 0, 1, .., d within each row
        positions = starts[owner] + depths  # each row's start + 0, 1, .., d
        flat = host_tensor(list(chain.from_iterable(tables)))  # every table, end to end
        slots = flat[table_starts[owner] + positions // bs] * bs + positions % bs
        state = state[owner]
        if self.kda and n > len(rows):  # the states after draft tokens go to scratch slots, one each
            drafted = depths > 0
            state[drafted] = torch.arange(self.scratch_slots.start, self.scratch_slots.start + int(drafted.sum()))
        inputs = torch.stack([host_tensor(list(chain.from_iterable(tokens))), positions, slots, state,
                              depths if self.kda else torch.zeros_like(depths)])  # [5, n]
        largest, chunks = GRAPH_BATCH_SIZES[-1], []
        lo = 0
        while lo < n:  # chunks of at most the largest bucket; an attention model's draft may be split between two
            hi = min(n, lo + largest)
            if self.kda and hi < n:  # a KDA chain is not: it ends where a row ends
                hi = first[bisect_right(first, hi) - 1]
                if hi == lo:
                    return None
            a, b = bisect_right(first, lo) - 1, bisect_right(first, hi - 1)  # rows a..b-1 have graph rows here
            key = self._graph(hi - lo, max(table_lengths[a:b]), max(counts[a:b]) if self.kda else 1)
            if key is None:
                return None
            chunks.append((lo, hi, a, b, key))
            lo = hi
        expanded = None  # built when a graph's tables are written
        parts = []
        for lo, hi, a, b, key in chunks:
            runs = counts[a:b]
            runs[0] -= lo - first[a]  # a row split between two replays
            runs[-1] -= first[b] - hi
            size, width, _ = key
            if size == hi - lo:
                host = inputs[:, lo:hi].flatten()
            else:
                host = torch.zeros(5, size, dtype=torch.long)
                host[:, :hi - lo] = inputs[:, lo:hi]
                host[3, hi - lo:] = self.dummy_slot
                host = host.view(-1)
            changed = self._changed_runs(key, tables[a:b], runs)
            new = None
            if changed is None or changed:
                if expanded is None:  # every graph row's table [n, longest], zero-padded
                    entry_rows = torch.repeat_interleave(table_lengths_t)  # [len(flat)]
                    padded = torch.zeros(len(rows), max(table_lengths), dtype=torch.long)
                    padded[entry_rows, torch.arange(len(flat)) - table_starts[entry_rows]] = flat
                    expanded = padded[owner]
                if changed is None:  # every row of the buffer, padding included
                    new, count = expanded[lo:hi], size
                else:  # rows now padding come last in `changed`: block 0
                    new, count = expanded[lo + host_tensor([i for i in changed if i < hi - lo])], len(changed)
                if new.shape != (count, width):  # zeros: the padding rows below, the columns up to width
                    new = new[:, :width]  # (the entries past width are zeros: no table here is longer)
                    new = torch.nn.functional.pad(new, (0, width - new.shape[1], 0, count - new.shape[0]))
            logits = self._replay(key, host, changed, new)
            if len(chunks) == 1:
                parts = [logits]
                break
            parts.append(logits[:hi - lo].clone())
        if self.kda and n > len(rows):
            written = state.tolist()
            for row, count, start in zip(rows, counts, first):
                if count > 1:
                    row.token_slots = written[start:start + count]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _capture(self, size: int, width: int, rounds: int = 1, probe: bool = False):
        """Capture the decode step of `size` rows and block tables `width` wide (rounds > 1: KDA chains of verify
        rows, at most `rounds` rows long, `PagedBatch.depths`). Compiled (one compilation
        per bucket) while the compile time so far is under compile_budget_s; later buckets are captured
        uncompiled, so a long tail of rare batch sizes never stalls serving for minutes. probe=True:
        uncompiled whatever the setting, in a memory pool of its own (the probe before the first compilation: it
        is thrown away, and a graph that dies leaves a shared pool unusable for later captures: PyTorch asserts
        `use_count > 0` in its caching allocator, seen on an H100)."""
        device = self.device
        self.capturing_compiled = not probe and self.compiled and self.compile_seconds < self.compile_budget_s
        step_fn = self.compiled_fn if self.capturing_compiled else self._logits
        inputs = torch.zeros(size * (5 + width), dtype=torch.long, device=device)  # every input, filled in one copy
        ids, positions, slot_mapping, state_slots, depths = inputs[:5 * size].view(5, size)
        state_slots.fill_(self.dummy_slot)
        batch = PagedBatch(self.block_size, size, positions, inputs[5 * size:].view(size, width), slot_mapping,
                           state_slots, depths=depths if rounds > 1 else None, rounds=rounds)

        if self.capturing_compiled:  # the table width reaches only the kernels: no recompile per width
            torch._dynamo.maybe_mark_dynamic(batch.block_tables, 1)

        def step():
            return step_fn(ids, batch)

        if self.static_only:
            if self.capturing_compiled:  # compile now (on the padding's buffers), as a CUDA warm-up would
                started = time.perf_counter()
                step()
                self.compile_seconds += time.perf_counter() - started
                self.compiled_buckets.append((size, width))
            return StaticReplay(step), inputs, batch, torch.empty(0)
        if self.graph_pool is None:
            self.graph_pool = graph_pool()
        started = time.perf_counter()
        pool = None if probe else self.graph_pool  # the warm-up calls compile a compiled step
        graph = capture(step, warmup=2, pool=pool)
        if self.capturing_compiled:
            torch.cuda.synchronize(device)
            self.compile_seconds += time.perf_counter() - started
            self.compiled_buckets.append((size, width))
        return graph, inputs, batch, graph.output
