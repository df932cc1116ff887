"""Batches of token windows from prepared shards, deterministic and resumable.

A split's shards form one token stream of N tokens. Training reads it in epochs: epoch e starts at a
random offset o_e in [0, T) and cuts the stream into the non-overlapping windows [o_e + kT, o_e + kT + T]
(T + 1 tokens: inputs and the targets shifted by one), visited in a random permutation; both come from a
generator seeded with (seed, e). Consecutive global batches take the next B * world_size windows of that
sequence (running into the next epoch when one ends), and rank r takes windows [r*B, (r+1)*B) of each
global batch, so the ranks' batches concatenated in rank order equal the world_size=1 batch of size
B * world_size. The state is just (epoch, windows consumed), so a resumed run sees the same batches.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from nanokimi.data.corpus import DataError
from nanokimi.data.shards import Manifest

_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 already checked


class SplitTokens:
    """The memory-mapped shards of one split, read as a single stream of `len(self)` tokens."""

    def __init__(self, data_dir: str | os.PathLike, split: str, *, verify: bool = True):
        self.data_dir = Path(data_dir)
        self.manifest = Manifest.load(self.data_dir)
        if split not in self.manifest.splits:
            raise DataError(f"Unknown split {split!r}; {self.data_dir} has {sorted(self.manifest.splits)}.")
        self.split = split
        self.shards = []
        for shard in self.manifest.splits[split].shards:
            path = self.data_dir / shard.file
            _check_shard(path, shard.tokens * np.dtype(shard.dtype).itemsize, shard.sha256 if verify else None,
                         self.data_dir)
            self.shards.append(np.memmap(path, dtype=np.dtype(shard.dtype).newbyteorder("<"), mode="r"))
        self.ends = np.cumsum([len(s) for s in self.shards], dtype=np.int64)  # [n_shards]

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries if needed.  [length]"""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while filled < length:
            shard_start = int(self.ends[shard - 1]) if shard else 0
            lo = start + filled - shard_start
            piece = self.shards[shard][lo : lo + length - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

    def windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both [len(starts), seq_len] int64: targets are inputs shifted by one."""
        rows = np.stack([self.read(int(s), seq_len + 1) for s in starts])  # [B, T+1]
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()


class TokenStream:
    """Endless training batches (inputs [B, T], targets [B, T], int64) of one split of a prepared folder."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = True,
        device: str | torch.device | None = None,
    ):
        _check_layout(batch_size, seq_len, rank, world_size)
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.verify = rank, world_size, verify
        self.device = torch.device(device) if device is not None else None
        self.tokens = SplitTokens(data_dir, split, verify=verify)
        self.manifest = self.tokens.manifest
        n = len(self.tokens)
        if n < seq_len + 1:
            raise DataError(f"The {split} split of {data_dir} has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                            "use a shorter seq_len or a bigger source (or a larger --val-fraction for val).")
        self.epoch, self.index = 0, 0
        self._layout_epoch, self._layout = -1, (0, np.empty(0, dtype=np.int64))

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._starts(self.epoch, self.index + self.rank * self.batch_size, self.batch_size)
        self.epoch, self.index = self._advance(self.epoch, self.index, self.batch_size * self.world_size)
        return _to_device(*self.tokens.windows(starts, self.seq_len), self.device)

    def state_dict(self) -> dict:
        """Where the next batch comes from; load it into a TokenStream over the same data to resume."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "split": self.split, "tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        differ = [k for k in ("seed", "seq_len", "split", "tokens") if state.get(k) != mine[k]]
        if differ:
            raise DataError("Cannot resume the data stream: " + ", ".join(
                f"{k} was {state.get(k)!r}, is now {mine[k]!r}" for k in differ) + ". Use the same data and settings.")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def iter_eval(self, split: str = "val", batch_size: int | None = None, seq_len: int | None = None,
                  max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`iter_eval` over this stream's folder with its rank/world_size (and by default its B and T)."""
        return iter_eval(self.data_dir, split, batch_size or self.batch_size, seq_len or self.seq_len, max_batches,
                         rank=self.rank, world_size=self.world_size, verify=self.verify, device=self.device)

    def _epoch_windows(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, permutation of the window indices) of an epoch."""
        if epoch != self._layout_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n, t = len(self.tokens), self.seq_len
            offset = int(rng.integers(0, min(t - 1, n - 1 - t) + 1))
            self._layout = (offset, rng.permutation((n - 1 - offset) // t))
            self._layout_epoch = epoch
        return self._layout

    def _starts(self, epoch: int, index: int, count: int) -> np.ndarray:
        """Start positions of `count` windows from position (epoch, index) of the window sequence."""
        starts = []
        epoch, index = self._advance(epoch, 0, index)
        while len(starts) < count:
            offset, order = self._epoch_windows(epoch)
            take = order[index : index + count - len(starts)]
            starts.extend(offset + take * self.seq_len)
            epoch, index = epoch + 1, 0
        return np.asarray(starts, dtype=np.int64)

    def _advance(self, epoch: int, index: int, steps: int) -> tuple[int, int]:
        index += steps
        while index >= len(self._epoch_windows(epoch)[1]):
            index -= len(self._epoch_windows(epoch)[1])
            epoch += 1
        return epoch, index


def iter_eval(
    data_dir: str | os.PathLike,
    split: str,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    verify: bool = True,
    device: str | torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation pass: the same (inputs [B, T], targets [B, T]) batches every call.

    The split is cut into windows [kT, kT + T]; all of them are used, or with `max_batches` that many
    global batches of windows spread evenly over the split. Each global batch holds B * world_size
    windows and rank r gets [r*B, (r+1)*B). B shrinks when the split is too small for one full global
    batch; windows beyond the last full global batch are left out, so every rank sees equal batches.
    """
    _check_layout(batch_size, seq_len, rank, world_size)
    tokens = SplitTokens(data_dir, split, verify=verify)
    n_windows = max(len(tokens) - 1, 0) // seq_len
    if n_windows < world_size:
        raise DataError(f"The {split} split of {data_dir} has {len(tokens)} tokens: too few for {world_size} "
                        f"window(s) of {seq_len} + 1 tokens. Use a shorter seq_len or a larger --val-fraction.")
    batch_size = min(batch_size, n_windows // world_size)
    per_batch = batch_size * world_size
    n_batches = n_windows // per_batch
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    chosen = np.linspace(0, n_windows - 1, n_batches * per_batch).round().astype(np.int64)  # sorted, distinct
    device = torch.device(device) if device is not None else None
    for b in range(n_batches):
        mine = chosen[b * per_batch + rank * batch_size : b * per_batch + (rank + 1) * batch_size]
        yield _to_device(*tokens.windows(mine * seq_len, seq_len), device)


def _check_layout(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")


def _check_shard(path: Path, size: int, sha256: str | None, data_dir: Path) -> None:
    redo = f"Re-run `nanokimi data prepare --source SOURCE --out {data_dir} --overwrite`."
    if not path.is_file():
        raise DataError(f"Shard {path.name} listed in {data_dir}/manifest.json is missing. {redo}")
    stat = path.stat()
    if stat.st_size != size:
        raise DataError(f"Shard {path} has {stat.st_size} bytes, the manifest says {size}: it is damaged. {redo}")
    if sha256 is None or _verified.get((str(path), stat.st_size, stat.st_mtime_ns)) == sha256:
        return
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != sha256:
        raise DataError(f"Shard {path} does not match its checksum in the manifest (sha256 {h.hexdigest()[:16]}... "
                        f"instead of {sha256[:16]}...): it is damaged or was changed. {redo}")
    _verified[(str(path), stat.st_size, stat.st_mtime_ns)] = sha256


def _to_device(inputs: torch.Tensor, targets: torch.Tensor, device: torch.device | None):
    if device is None or device.type == "cpu":
        return inputs, targets
    return inputs.pin_memory().to(device, non_blocking=True), targets.pin_memory().to(device, non_blocking=True)
