"""KV cache tiers below GPU memory (Mooncake Store, in one process): a pinned CPU pool, then files on disk.

`KVTierStore` keeps blocks by their prefix-chain hash: `offload(h, tensors)` copies one evicted block in (its
cache contents in every attention layer; a KDA state snapshot is stored the same way under its own key),
`fetch(h)` returns CPU tensors or None, `contains(h)` answers without copying. The hash is the key in every
tier, so a chain can continue GPU -> CPU -> disk. `TieredCache` connects a store to the engine's paged cache.

CPU entries are packed into one flat buffer each, carved from pinned chunks (pinned only where CUDA exists);
buffers freed by eviction are reused for entries of the same size, so once the pool is full nothing is
allocated. Entries evicted from the CPU pool are written to `disk_dir/<namespace>/<hash>.safetensors` when a
disk tier is configured; a disk hit is promoted back into the CPU pool. Copies are synchronous.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_ALIGN = 64


class _Entry:
    __slots__ = ("buffer", "layout")

    def __init__(self, buffer: torch.Tensor, layout: list[tuple[str, torch.dtype, tuple[int, ...], int]]):
        self.buffer, self.layout = buffer, layout  # layout: (name, dtype, shape, byte offset)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, dtype, shape, offset in self.layout:
            nbytes = _numel(shape) * dtype.itemsize
            out[name] = self.buffer[offset:offset + nbytes].view(dtype).view(shape)
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layout(tensors: dict[str, torch.Tensor]) -> tuple[list, int]:
    layout, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        layout.append((name, t.dtype, tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return layout, offset


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
        self._free: dict[int, list[torch.Tensor]] = {}  # nbytes -> spare pinned buffers
        self._reserved = 0  # bytes of the pool handed out as buffers (in use or spare)
        self._chunk, self._chunk_used = None, 0
        self._entry_bytes = 0
        self.disk_dir = None if disk_dir is None else Path(disk_dir) / namespace
        self.disk: OrderedDict[str, int] = OrderedDict()  # hash -> file bytes, LRU order
        self._disk_used = 0
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            for file in sorted(self.disk_dir.glob("*.safetensors"), key=lambda f: f.stat().st_mtime):
                size = file.stat().st_size
                self.disk[file.stem] = size
                self._disk_used += size
        self.counters = {"cpu_hits": 0, "disk_hits": 0, "misses": 0, "offloads": 0, "disk_writes": 0}

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

    def _insert_cpu(self, h: str, tensors: dict[str, torch.Tensor]) -> bool:
        layout, nbytes = _layout(tensors)
        self._entry_bytes = nbytes
        buffer = self._alloc(nbytes)
        if buffer is None:
            return False
        entry = _Entry(buffer, layout)
        for name, view in entry.tensors().items():
            view.copy_(tensors[name])
        self.cpu[h] = entry
        return True

    def fetch(self, h: bytes | int, count: bool = True) -> dict[str, torch.Tensor] | None:
        """The block's tensors (CPU; valid until the next offload) or None when no tier holds it.
        count=False leaves the hit counters alone (for entries that are not token blocks)."""
        h = self._key(h)
        entry = self.cpu.get(h)
        if entry is not None:
            self.cpu.move_to_end(h)
            self.counters["cpu_hits"] += count
            return entry.tensors()
        if h in self.disk:
            tensors = load_file(str(self._file(h)))
            self.disk.move_to_end(h)
            self.counters["disk_hits"] += count
            self._insert_cpu(h, tensors)  # promoted: the next hit is a CPU hit
            return tensors
        self.counters["misses"] += count
        return None

    def clear(self) -> None:
        """Forget every entry (CPU and disk), e.g. after the model's weights changed."""
        for entry in self.cpu.values():
            self._free.setdefault(entry.buffer.numel(), []).append(entry.buffer)
        self.cpu.clear()
        for key in self.disk:
            self._file(key).unlink(missing_ok=True)
        self.disk.clear()
        self._disk_used = 0

    def _alloc(self, nbytes: int) -> torch.Tensor | None:
        """A buffer of nbytes: a spare one of that size, else carved from the pinned chunks while the budget
        lasts, else the least recently used entries are evicted (to disk, if any) until one of that size frees."""
        if nbytes > self.cpu_bytes:
            return None
        spare = self._free.get(nbytes)
        if spare:
            return spare.pop()
        if self._reserved + nbytes <= self.cpu_bytes:
            return self._carve(nbytes)
        while self.cpu:
            old_hash, old = self.cpu.popitem(last=False)
            if self.disk_dir is not None and old_hash not in self.disk:
                self._write_disk(old_hash, old.tensors())
            if old.buffer.numel() == nbytes:
                return old.buffer
            self._free.setdefault(old.buffer.numel(), []).append(old.buffer)
        return None

    def _carve(self, nbytes: int) -> torch.Tensor:
        """nbytes from the current pinned chunk (chunks of up to 256 MiB, allocated as the pool fills)."""
        if self._chunk is None or self._chunk_used + nbytes > self._chunk.numel():
            size = max(nbytes, min(256 * 2**20, self.cpu_bytes - self._reserved))
            self._chunk, self._chunk_used = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin), 0
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
        cpu_held = sum(e.buffer.numel() for e in self.cpu.values())
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
    copied down in one gather per cache tensor by `flush`, before anything overwrites them); the scheduler asks
    `has_block` / `has_state` while looking up a prefix and `load_blocks` / `fetch_state` when it takes one."""

    def __init__(self, store: KVTierStore, cache):
        self.store, self.cache = store, cache
        self.pending_blocks: list[tuple[int, bytes]] = []
        self.pending_states: list[tuple[int, bytes]] = []

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

    def flush(self) -> None:
        """Copy the queued evictions down to the store (GPU -> CPU, one gather per cache tensor)."""
        for pending, tensors, prefix in ((self.pending_blocks, self._block_tensors, b""),
                                         (self.pending_states, self._state_tensors, STATE_KEY)):
            if not pending:
                continue
            index = [i for i, _ in pending]
            gathered = {name: t[torch.tensor(index, device=t.device)].cpu() for name, t in tensors()}
            for row, (_, h) in enumerate(pending):
                self.store.offload(prefix + h, {name: g[row] for name, g in gathered.items()})
            pending.clear()

    def has_block(self, h: bytes) -> bool:
        return self.store.contains(h)

    def has_state(self, h: bytes) -> bool:
        return self.store.contains(STATE_KEY + h)

    def load_blocks(self, hashes: list[bytes], blocks: list[int]) -> int:
        """Copy the stored blocks `hashes` into GPU blocks `blocks`; returns how many leading ones were found."""
        self.flush()  # the fresh blocks may hold evicted content not yet copied down
        found = []
        for h in hashes:
            tensors = self.store.fetch(h)
            if tensors is None:
                break
            found.append({name: t.clone() for name, t in tensors.items()})  # fetch's views may be reused
        if found:
            index = None
            for name, t in self._block_tensors():
                if index is None:
                    index = torch.tensor(blocks[:len(found)], device=t.device)
                t[index] = torch.stack([f[name] for f in found]).to(t.device)
        return len(found)

    def fetch_state(self, h: bytes) -> dict[str, torch.Tensor] | None:
        tensors = self.store.fetch(STATE_KEY + h, count=False)
        return None if tensors is None else {name: t.clone() for name, t in tensors.items()}

    def load_state(self, tensors: dict[str, torch.Tensor], slot: int) -> None:
        for name, t in self._state_tensors():
            t[slot].copy_(tensors[name])
