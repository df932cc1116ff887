"""KV cache tiers below GPU memory (Mooncake Store, in one process): a pinned CPU pool, then files on disk.

`KVTierStore` keeps blocks by their prefix-chain hash. Each entry is one flat byte buffer holding the block's
cache contents in every attention layer (a KDA state snapshot is stored the same way under its own key);
`offload(h, tensors)` / `fetch(h)` copy one entry in and out as a dict of tensors, `offload_rows` takes many
entries at once as packed rows (possibly on the GPU, copied asynchronously), `contains(h)` answers without
copying. The hash is the key in every tier, so a chain can continue GPU -> CPU -> disk. `TieredCache` connects
a store to the engine's paged cache.

CPU buffers are carved from pinned chunks (pinned only where CUDA exists); buffers freed by eviction are reused
for entries of the same size, so once the pool is full nothing is allocated. Entries evicted from the CPU pool
are written to `disk_dir/<namespace>/<hash>.safetensors` when a disk tier is configured; a disk hit is promoted
back into the CPU pool.

With a CUDA cache, copies do not stall the engine thread: a GPU->CPU copy is queued on a side stream and each
buffer remembers the CUDA event of the last copy that touched it (down into it, or up out of it). Whoever reads
or rewrites a buffer on the host waits for that event first; the GPU side of a load waits for it on the compute
stream, so nothing blocks the host. On the CPU every copy is a plain synchronous copy.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_ALIGN = 64
CHUNK_BYTES = 256 * 2**20


class _Entry:
    __slots__ = ("buffer", "layout", "event", "hits", "gone")

    def __init__(self, buffer: torch.Tensor, layout: list[tuple[str, torch.dtype, tuple[int, ...], int]],
                 event=None):
        self.buffer, self.layout = buffer, layout  # layout: (name, dtype, shape, byte offset)
        self.event = event  # CUDA event of the last copy into or out of buffer (None: no copy in flight)
        self.hits = 0
        self.gone = False  # evicted from the CPU pool: its buffer belongs to another entry now

    def tensors(self) -> dict[str, torch.Tensor]:
        return unpack(self.buffer, self.layout)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def layout_of(tensors: dict[str, torch.Tensor]) -> tuple[list, int]:
    """Where each tensor lives in an entry's byte buffer (names sorted, 64-byte aligned) and the entry's size."""
    layout, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        layout.append((name, t.dtype, tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return layout, offset


def unpack(buffer: torch.Tensor, layout: list) -> dict[str, torch.Tensor]:
    """Views of an entry's tensors in its flat uint8 buffer [nbytes] (or of n entries in rows [n, nbytes])."""
    lead = tuple(buffer.shape[:-1])
    out = {}
    for name, dtype, shape, offset in layout:
        nbytes = _numel(shape) * dtype.itemsize
        out[name] = buffer[..., offset:offset + nbytes].view(dtype).view(lead + tuple(shape))
    return out


def _wait(event) -> None:
    if event is not None:
        event.synchronize()


def _next_to(a: torch.Tensor, count: int, b: torch.Tensor) -> bool:
    """Whether buffer b starts right after `count` buffers of b's size starting at buffer a (same pinned chunk)."""
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + count * b.numel())


def _span(first: torch.Tensor, count: int) -> torch.Tensor:
    """[count, nbytes] view over `count` neighbouring buffers of first's size, starting at first."""
    return first.as_strided((count, first.numel()), (first.numel(), 1))


class _Run:
    """Rows rows[start:start + len(entries)] going into neighbouring buffers: copied down in one call."""

    def __init__(self, rows: torch.Tensor, stream):
        self.rows, self.stream = rows, stream
        self.start, self.entries = 0, []

    def extend(self, i: int, entry: _Entry) -> bool:
        if not self.entries:
            self.start, self.entries = i, [entry]
            return True
        if i == self.start + len(self.entries) and _next_to(self.entries[0].buffer, len(self.entries), entry.buffer):
            self.entries.append(entry)
            return True
        return False

    def issue(self) -> int:
        """Queue (or, without a stream, do) the run's copy; returns the number of copy calls (0 or 1)."""
        if not self.entries:
            return 0
        n = len(self.entries)
        _span(self.entries[0].buffer, n).copy_(self.rows[self.start:self.start + n],
                                               non_blocking=self.stream is not None)
        if self.stream is not None:
            done = self.stream.record_event()
            for entry in self.entries:
                entry.event = done
        self.entries = []
        return 1


class KVTierStore:
    """cpu_bytes: size of the pinned CPU pool; disk_dir (optional) with at most disk_bytes of files;
    block_size: tokens per block (for the hit-token counters); namespace keeps different models' files apart."""

    def __init__(self, cpu_bytes: int, disk_dir: str | os.PathLike | None = None, disk_bytes: int = 64 * 2**30,
                 block_size: int = 16, namespace: str = "default", pin: bool | None = None):
        if cpu_bytes < 0 or disk_bytes < 0:
            raise ValueError(f"tier sizes must be >= 0, got cpu_bytes={cpu_bytes}, disk_bytes={disk_bytes}.")
        self.cpu_bytes, self.disk_bytes, self.block_size = cpu_bytes, disk_bytes, block_size
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.cpu: OrderedDict[str, _Entry] = OrderedDict()
        self._free: dict[int, list[tuple[torch.Tensor, object]]] = {}  # nbytes -> spare (buffer, last event)
        self._reserved = 0  # bytes of the pool handed out as buffers (in use or spare)
        self._chunk, self._chunk_used = None, 0
        self._ready: list[torch.Tensor] = []  # chunks allocated by reserve(), not carved yet
        self._held = 0  # bytes of the entries in the CPU pool (stats() is read every engine step)
        self._entry_bytes = 0
        self._run: _Run | None = None  # copies down being gathered by offload_rows
        self.disk_dir = None if disk_dir is None else Path(disk_dir) / namespace
        self.disk: OrderedDict[str, int] = OrderedDict()  # hash -> file bytes, LRU order
        self._disk_used = 0
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            for file in sorted(self.disk_dir.glob("*.safetensors"), key=lambda f: f.stat().st_mtime):
                size = file.stat().st_size
                self.disk[file.stem] = size
                self._disk_used += size
        # offloads: entries copied down; offloads_hit: of those, entries hit at least once later (what the
        # copies saved); bytes_down / bytes_up: bytes copied into / out of the CPU pool; copies_down / copies_up:
        # the copy calls that moved them (runs of neighbouring buffers go in one)
        self.counters = {"cpu_hits": 0, "disk_hits": 0, "misses": 0, "offloads": 0, "offloads_hit": 0,
                         "disk_writes": 0, "bytes_down": 0, "bytes_up": 0, "copies_down": 0, "copies_up": 0}

    @staticmethod
    def _key(h: bytes | int | str) -> str:
        """The block hash as the hex name used in every tier (the engine's hashes are bytes)."""
        if isinstance(h, str):
            return h
        return h.hex() if isinstance(h, bytes) else f"{h & (2**64 - 1):016x}"

    def contains(self, h: bytes | int) -> bool:
        h = self._key(h)
        return h in self.cpu or h in self.disk

    def offload(self, h: bytes | int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy one evicted block (and its KDA snapshot, if any) into the CPU pool (spilling LRU entries to disk)."""
        h = self._key(h)
        self.counters["offloads"] += 1
        if h in self.cpu:
            self.cpu.move_to_end(h)
        elif not self._insert_cpu(h, tensors) and h not in self.disk:  # larger than the whole pool
            self._write_disk(h, tensors)

    def offload_rows(self, keys: list, rows: torch.Tensor, layout: list, stream=None) -> None:
        """Copy entries packed as rows [n, nbytes] uint8 (`layout` says where each tensor sits) into the CPU
        pool: one copy per run of entries whose buffers lie next to each other (the pool hands out neighbouring
        buffers when it carves or recycles in order). With `stream` (rows on CUDA) the copies are queued on that
        stream and return at once; the caller keeps `rows` alive until they are done (`rows.record_stream`)."""
        nbytes = rows.shape[1]
        self._run = _Run(rows, stream)
        for i, key in enumerate(keys):
            key = self._key(key)
            self.counters["offloads"] += 1
            if key in self.cpu:
                self.cpu.move_to_end(key)
                continue
            got = self._alloc(nbytes)
            if got is None:  # larger than the whole pool: straight to disk
                if self.disk_dir is not None and key not in self.disk:
                    self._write_disk(key, unpack(rows[i].cpu(), layout))
                continue
            buffer, event = got
            if event is not None and stream is not None:
                stream.wait_event(event)  # a load may still be reading the buffer's old content
            elif event is not None:
                event.synchronize()
            self.counters["bytes_down"] += nbytes
            self.cpu[key] = entry = _Entry(buffer, layout)
            self._held += nbytes
            if not self._run.extend(i, entry):
                self.counters["copies_down"] += self._run.issue()
                self._run.extend(i, entry)
        self.counters["copies_down"] += self._run.issue()
        self._run = None
        self._entry_bytes = nbytes

    def _insert_cpu(self, h: str, tensors: dict[str, torch.Tensor]) -> _Entry | None:
        layout, nbytes = layout_of(tensors)
        self._entry_bytes = nbytes
        got = self._alloc(nbytes)
        if got is None:
            return None
        buffer, event = got
        _wait(event)
        entry = _Entry(buffer, layout)
        for name, view in entry.tensors().items():
            view.copy_(tensors[name])
        self.counters["bytes_down"] += nbytes
        self.cpu[h] = entry
        self._held += nbytes
        return entry

    def entry(self, h: bytes | int, count: bool = True) -> _Entry | None:
        """The CPU entry of block h (a disk hit is promoted into the CPU pool first), marked recently used, or
        None when no tier holds it. Its buffer may still be in flight: see `_Entry.event`. count=False leaves
        the hit counters alone (for entries that are not token blocks)."""
        h = self._key(h)
        entry = self.cpu.get(h)
        if entry is not None:
            self.cpu.move_to_end(h)
            self.counters["cpu_hits"] += count
        elif h in self.disk:
            tensors = load_file(str(self._file(h)))
            self.disk.move_to_end(h)
            self.counters["disk_hits"] += count
            entry = self._insert_cpu(h, tensors)  # promoted: the next hit is a CPU hit
            if entry is None:  # larger than the whole CPU pool: a buffer of its own, not kept
                layout, nbytes = layout_of(tensors)
                entry = _Entry(torch.empty(nbytes, dtype=torch.uint8), layout)
                for name, view in entry.tensors().items():
                    view.copy_(tensors[name])
        else:
            self.counters["misses"] += count
            return None
        self.counters["offloads_hit"] += entry.hits == 0
        entry.hits += 1
        return entry

    def fetch(self, h: bytes | int, count: bool = True) -> dict[str, torch.Tensor] | None:
        """The block's tensors (CPU views; valid until the next offload) or None when no tier holds it."""
        entry = self.entry(h, count)
        if entry is None:
            return None
        _wait(entry.event)
        return entry.tensors()

    def clear(self) -> None:
        """Forget every entry (CPU and disk), e.g. after the model's weights changed."""
        for entry in self.cpu.values():
            entry.gone = True
            self._free.setdefault(entry.buffer.numel(), []).append((entry.buffer, entry.event))
        self.cpu.clear()
        self._held = 0
        for key in self.disk:
            self._file(key).unlink(missing_ok=True)
        self.disk.clear()
        self._disk_used = 0

    def _alloc(self, nbytes: int) -> tuple[torch.Tensor, object] | None:
        """A buffer of nbytes and the event of its last copy: a spare one of that size, else carved from the
        pinned chunks while the budget lasts, else the least recently used entries are evicted (to disk, if
        any) until one of that size frees."""
        if nbytes > self.cpu_bytes:
            return None
        spare = self._free.get(nbytes)
        if spare:
            return spare.pop()
        if self._reserved + nbytes <= self.cpu_bytes:
            return self._carve(nbytes), None
        while self.cpu:
            old_hash, old = self.cpu.popitem(last=False)
            self._held -= old.buffer.numel()
            old.gone = True
            if self._run is not None and old in self._run.entries:  # its copy down is not queued yet
                self.counters["copies_down"] += self._run.issue()
            if self.disk_dir is not None and old_hash not in self.disk:
                _wait(old.event)
                self._write_disk(old_hash, old.tensors())
            if old.buffer.numel() == nbytes:
                return old.buffer, old.event
            self._free.setdefault(old.buffer.numel(), []).append((old.buffer, old.event))
        return None

    def reserve(self) -> None:
        """Allocate (and pin) the whole CPU pool now instead of as it fills: pinning locks every page, which a
        server should pay for at start, not in the middle of an engine step."""
        allocated = sum(c.numel() for c in self._ready) + (0 if self._chunk is None else self._chunk.numel())
        while allocated < self.cpu_bytes:
            size = min(CHUNK_BYTES, self.cpu_bytes - allocated)
            self._ready.append(torch.empty(size, dtype=torch.uint8, pin_memory=self.pin))
            allocated += size

    def _carve(self, nbytes: int) -> torch.Tensor:
        """nbytes from the current pinned chunk (chunks of up to 256 MiB: reserved ones first, else allocated as
        the pool fills)."""
        if self._chunk is None or self._chunk_used + nbytes > self._chunk.numel():
            while self._ready and self._ready[0].numel() < nbytes:
                self._ready.pop(0)
            if self._ready:
                self._chunk = self._ready.pop(0)
            else:
                size = max(nbytes, min(CHUNK_BYTES, self.cpu_bytes - self._reserved))
                self._chunk = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self._chunk_used = 0
        buffer = self._chunk[self._chunk_used:self._chunk_used + nbytes]
        self._chunk_used += -(-nbytes // _ALIGN) * _ALIGN
        self._reserved += -(-nbytes // _ALIGN) * _ALIGN
        return buffer

    def _file(self, key: str) -> Path:
        return self.disk_dir / f"{key}.safetensors"

    def _write_disk(self, h: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.disk_dir is None:
            return
        file, tmp = self._file(h), self.disk_dir / f"{h}.tmp"
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(tmp))
        os.replace(tmp, file)
        size = file.stat().st_size
        self.disk[h] = size
        self._disk_used += size
        self.counters["disk_writes"] += 1
        while self._disk_used > self.disk_bytes and self.disk:
            old, old_size = self.disk.popitem(last=False)
            self._file(old).unlink(missing_ok=True)
            self._disk_used -= old_size

    def stats(self) -> dict:
        """Per tier: blocks_total (capacity estimate), blocks_cached, blocks_free (no request holds a tier
        block: copies go up on a hit, so every block is free), usage (bytes held / capacity), hit_tokens."""
        per_block = max(self._entry_bytes, 1)
        cpu_total = self.cpu_bytes // per_block if self._entry_bytes else 0
        cpu_held = self._held
        out = {"cpu": {"blocks_total": cpu_total, "blocks_cached": len(self.cpu), "blocks_free": cpu_total,
                       "usage": cpu_held / self.cpu_bytes if self.cpu_bytes else 0.0,
                       "hit_tokens": self.counters["cpu_hits"] * self.block_size, **self.counters}}
        if self.disk_dir is not None:
            disk_total = self.disk_bytes // per_block if self._entry_bytes else 0
            out["disk"] = {"blocks_total": disk_total, "blocks_cached": len(self.disk), "blocks_free": disk_total,
                           "usage": self._disk_used / self.disk_bytes if self.disk_bytes else 0.0,
                           "hit_tokens": self.counters["disk_hits"] * self.block_size}
        return out


STATE_KEY = b"kda-state:"  # a KDA snapshot is stored under STATE_KEY + its block's hash


class TieredCache:
    """Connects a KVTierStore to the engine's paged cache. The block manager reports evictions (queued, then
    copied down by `flush` before anything overwrites them); the scheduler asks `has_block` / `has_state` while
    looking up a prefix and `load_blocks` / `fetch_state` when it takes one.

    Down: `flush` packs the evicted blocks into rows [n, nbytes] on the cache's device (one gather per cache
    tensor, queued on the compute stream, so it reads them before any later kernel overwrites them), then
    queues one copy per row into the store's pinned buffers on a side stream. Up: `load_blocks` queues one
    host->device copy per entry into a staging tensor on the compute stream, after waiting (on that stream) for
    entries still being copied down, then scatters the staging rows into the fresh blocks."""

    def __init__(self, store: KVTierStore, cache):
        self.store, self.cache = store, cache
        self.pending_blocks: list[tuple[int, bytes]] = []
        self.pending_states: list[tuple[int, bytes]] = []
        first = next((t for layer in cache.layers for t in vars(layer).values()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.block_layout, self.block_bytes = layout_of({name: t[0] for name, t in self._block_tensors()})
        self.state_layout, self.state_bytes = layout_of({name: t[0] for name, t in self._state_tensors()})

    def _block_tensors(self):
        """(name, tensor [num_blocks, block_size, ...]) of every attention layer's pool."""
        for i, layer in enumerate(self.cache.layers):
            if hasattr(layer, "state"):
                continue
            for name, t in vars(layer).items():
                yield f"{i}.{name}", t

    def _state_tensors(self):
        """(name, tensor [num_slots, ...]) of every KDA layer's state slots."""
        for i, layer in enumerate(self.cache.layers):
            if hasattr(layer, "state"):
                for name, t in vars(layer).items():
                    yield f"{i}.{name}", t

    def evict_block(self, block: int, h: bytes) -> None:
        self.pending_blocks.append((block, h))

    def evict_state(self, slot: int, h: bytes) -> None:
        self.pending_states.append((slot, h))

    def clear(self) -> None:
        """Forget queued evictions and every stored entry."""
        self.pending_blocks.clear()
        self.pending_states.clear()
        self.store.clear()

    def _pack(self, tensors: dict[str, torch.Tensor], layout: list, nbytes: int, index: list[int]) -> torch.Tensor:
        """Rows [n, nbytes] uint8 on the cache's device: entry i holds every tensor's row index[i]."""
        at = torch.tensor(index, device=self.device)
        rows = torch.empty(len(index), nbytes, dtype=torch.uint8, device=self.device)
        for name, view in unpack(rows, layout).items():
            view.copy_(tensors[name].index_select(0, at))
        return rows

    def flush(self) -> None:
        """Copy the queued evictions down to the store (asynchronously on CUDA)."""
        for pending, tensors, layout, nbytes, prefix in (
                (self.pending_blocks, self._block_tensors, self.block_layout, self.block_bytes, b""),
                (self.pending_states, self._state_tensors, self.state_layout, self.state_bytes, STATE_KEY)):
            if not pending:
                continue
            rows = self._pack(dict(tensors()), layout, nbytes, [i for i, _ in pending])
            keys = [prefix + h for _, h in pending]
            pending.clear()
            if self.side is None:
                self.store.offload_rows(keys, rows, layout)
                continue
            self.side.wait_stream(torch.cuda.current_stream(self.device))  # the gather above, first
            with torch.cuda.stream(self.side):
                self.store.offload_rows(keys, rows, layout, stream=self.side)
            rows.record_stream(self.side)  # its memory is not reused before the side stream is done with it

    def has_block(self, h: bytes) -> bool:
        self.flush()  # a block evicted earlier in this schedule (a preempted sequence's) is found down there
        return self.store.contains(h)

    def has_state(self, h: bytes) -> bool:
        self.flush()
        return self.store.contains(STATE_KEY + h)

    def _upload(self, entries: list[_Entry]) -> torch.Tensor:
        """Rows [n, nbytes] on the cache's device with the entries' bytes: one copy per run of neighbouring
        buffers, queued on the compute stream (after waiting there for entries still being copied down)."""
        nbytes = entries[0].buffer.numel()
        rows = torch.empty(len(entries), nbytes, dtype=torch.uint8, device=self.device)
        compute = torch.cuda.current_stream(self.device) if self.side is not None else None
        waited = set()
        start = 0
        for i, entry in enumerate(entries):
            if compute is not None and entry.event is not None and id(entry.event) not in waited:
                compute.wait_event(entry.event)
                waited.add(id(entry.event))
            last = i + 1 == len(entries)
            if last or not _next_to(entries[start].buffer, i + 1 - start, entries[i + 1].buffer):
                rows[start:i + 1].copy_(_span(entries[start].buffer, i + 1 - start), non_blocking=compute is not None)
                self.store.counters["copies_up"] += 1
                start = i + 1
        if compute is not None:
            done = compute.record_event()
            for entry in entries:
                entry.event = done  # the buffer is not rewritten before this copy has read it
        self.store.counters["bytes_up"] += rows.numel()
        return rows

    def load_blocks(self, hashes: list[bytes], blocks: list[int]) -> int:
        """Copy the stored blocks `hashes` into GPU blocks `blocks`; returns how many leading ones were found."""
        self.flush()  # the fresh blocks may hold evicted content not yet copied down
        found = []
        for h in hashes:
            entry = self.store.entry(h)
            if entry is None or entry.layout != self.block_layout:
                break
            found.append(entry)
        # promoting a disk hit into a small CPU pool may have evicted an entry found before it
        found = found[:next((i for i, entry in enumerate(found) if entry.gone), len(found))]
        if found:
            rows = unpack(self._upload(found), self.block_layout)
            at = torch.tensor(blocks[:len(found)], device=self.device)
            for name, t in self._block_tensors():
                t.index_copy_(0, at, rows[name])
        return len(found)

    def fetch_state(self, h: bytes) -> dict[str, torch.Tensor] | None:
        """The KDA state snapshot after block h, already on the cache's device (for `load_state`), or None."""
        entry = self.store.entry(STATE_KEY + h, count=False)
        if entry is None or entry.layout != self.state_layout:
            return None
        return {name: t[0] for name, t in unpack(self._upload([entry]), self.state_layout).items()}

    def load_state(self, tensors: dict[str, torch.Tensor], slot: int) -> None:
        for name, t in self._state_tensors():
            t[slot].copy_(tensors[name])
