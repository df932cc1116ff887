"""`prepare`: a source -> tokenizer.json + token shards (train_000.bin, val_000.bin, ...) + manifest.json.

Each split is one token stream: every document is preceded by `<|endoftext|>` and the stream is cut into
shards of `shard_tokens` tokens (the last one shorter). Shards are raw little-endian numpy arrays, uint16
when the vocabulary fits (< 65536), else uint32. The manifest records the source, the settings, the
tokenizer's sha256, per shard its file, token count, dtype and sha256, and per split the number of
documents, tokens and UTF-8 bytes of text (bytes / tokens turns a loss in nats/token into bits per byte).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from nanokimi.data.corpus import DataError, Document, Source, hash_unit, iter_documents, resolve_source
from nanokimi.data.tokenizer import Tokenizer

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
ENCODE_BATCH_CHARS = 4 << 20  # texts handed to the parallel encoder at once


@dataclass(slots=True)
class Shard:
    file: str
    tokens: int
    sha256: str
    dtype: str


@dataclass(slots=True)
class SplitInfo:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents' text (separators not counted)
    shards: list[Shard] = field(default_factory=list)


@dataclass(slots=True)
class Manifest:
    source: dict  # spec, kind, root, filter, files, fingerprint
    settings: dict  # everything that decides the output; a second prepare with equal settings is a no-op
    tokenizer: dict  # file, sha256, vocab_size, eot_id
    dtype: str
    splits: dict[str, SplitInfo]
    val_threshold: float  # documents with hash_unit(id) < this are in val
    created: str
    seconds: dict[str, float]  # wall time of each phase: scan, tokenizer, tokenise, total
    format: int = FORMAT_VERSION

    def bytes_per_token(self, split: str) -> float:
        info = self.splits[split]
        return info.bytes / info.tokens if info.tokens else float("nan")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> "Manifest":
        path = Path(data_dir) / MANIFEST
        if not path.is_file():
            raise DataError(f"{data_dir} has no {MANIFEST}; prepare it first: "
                            f"nanokimi data prepare --source SOURCE --out {data_dir}")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT_VERSION:
                raise DataError(f"{path} has format {raw.get('format')}, this nanokimi reads {FORMAT_VERSION}; "
                                "re-run nanokimi data prepare with --overwrite.")
            raw["splits"] = {k: SplitInfo(v["documents"], v["tokens"], v["bytes"], [Shard(**s) for s in v["shards"]])
                             for k, v in raw["splits"].items()}
            return cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path} is damaged ({e}); re-run nanokimi data prepare with --overwrite.") from e


def prepare(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 4096,
    tokenizer_path: str | os.PathLike | None = None,
    text_field: str = "text",
    val_fraction: float = 0.01,
    shard_tokens: int = 1 << 24,
    tokenizer_sample_chars: int = 8_000_000,
    max_chars: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    refresh_changed_source: bool = False,
) -> Manifest:
    """Tokenise `source` into `out_dir` and return its Manifest (or the existing one if already prepared).

    vocab_size: size of the BPE trained on up to `tokenizer_sample_chars` of train documents (a fixed,
    hash-chosen sample); ignored when `tokenizer_path` names an existing tokenizer.json to use instead.
    max_chars: when > 0, use only a fixed sample of whole documents (in the order of their hash) of about this
    many characters, and record both sizes in the manifest (source.chars, source.chars_used).
    val_fraction: share of documents (by sha1 of their id) held out; val always gets at least one document
    when the source has two or more. Raises DataError on a missing/empty source, bad jsonl, or an out_dir
    prepared with other settings (unless overwrite=True). When only the source's files changed (their
    mtime or size; same content only touched: the manifest is kept), `refresh_changed_source=True` prepares
    the folder again instead of raising.
    """
    started = time.perf_counter()
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}.")
    out = Path(out_dir)
    src = resolve_source(source)
    if not src.files:
        raise DataError(f"Source {src.spec!r} is empty: no files match ({src.filter}).")
    given_tokenizer = Tokenizer.load(tokenizer_path) if tokenizer_path is not None else None
    settings = {
        "source": src.spec,
        "source_fingerprint": src.fingerprint(),
        "text_field": text_field if src.kind in ("jsonl", "folder", "glob") else None,
        "tokenizer": ({"path": str(tokenizer_path), "sha256": given_tokenizer.sha256()} if given_tokenizer
                      else {"train_vocab_size": vocab_size, "sample_chars": tokenizer_sample_chars}),
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        # only when it may cut (characters <= bytes), so folders prepared before max_chars existed still match
        **({"max_chars": max_chars} if 0 < max_chars < sum(f.path.stat().st_size for f in src.files) else {}),
    }
    existing = _check_existing(out, src, settings, overwrite, refresh_changed_source)
    if existing is not None:
        return existing

    seconds = {}
    docs = [(d.id, hash_unit(d.id), len(d.text)) for d in _documents(src, text_field)]
    if not docs:
        raise DataError(f"Source {src.spec!r} has no documents with text ({src.filter}).")
    chars = sum(n for _, _, n in docs)
    kept = None
    if 0 < max_chars < chars:
        kept = _hash_sample(docs, max_chars)
        docs = [d for d in docs if d[0] in kept]
    val_threshold = _val_threshold([h for _, h, _ in docs], val_fraction)

    seconds["scan"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    _remove_outputs(out)
    if given_tokenizer is not None:
        tokenizer = given_tokenizer
    else:
        tokenizer = Tokenizer.train(_tokenizer_sample(src, text_field, docs, val_threshold, tokenizer_sample_chars),
                                    vocab_size)
    tokenizer.save(out / TOKENIZER)
    seconds["tokenizer"] = time.perf_counter() - started - seconds["scan"]
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)

    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    splits = {s: SplitInfo() for s in SPLITS}
    total_chars = sum(n for _, _, n in docs)
    bar = tqdm(total=total_chars, unit="char", unit_scale=True, desc=f"tokenising {src.spec}", disable=not progress)
    chosen = (d for d in _documents(src, text_field) if kept is None or d.id in kept)
    for batch in _batches(chosen, ENCODE_BATCH_CHARS):
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
            split = "val" if hash_unit(doc.id) < val_threshold else "train"
            writers[split].write([tokenizer.eot_id, *ids])
            info = splits[split]
            info.documents += 1
            info.tokens += len(ids) + 1
            info.bytes += len(doc.text.encode("utf-8"))
        bar.update(sum(len(d.text) for d in batch))
    bar.close()
    for s in SPLITS:
        splits[s].shards = writers[s].close()
    seconds["total"] = time.perf_counter() - started
    seconds["tokenise"] = seconds["total"] - seconds["scan"] - seconds["tokenizer"]

    manifest = Manifest(
        source={"spec": src.spec, "kind": src.kind, "root": str(src.root), "filter": src.filter,
                "files": len(src.files), "sha256": src.content_sha256(), "chars": chars, "chars_used": total_chars},
        settings=settings,
        tokenizer={"file": TOKENIZER, "sha256": _sha256_file(out / TOKENIZER), "vocab_size": tokenizer.vocab_size,
                   "eot_id": tokenizer.eot_id, "trained": given_tokenizer is None},
        dtype=dtype.name,
        splits=splits,
        val_threshold=val_threshold,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )
    _write_atomic(out / MANIFEST, manifest.to_json().encode())
    return manifest


def _documents(src: Source, text_field: str) -> Iterator[Document]:
    return iter_documents(src, text_field=text_field)


def _check_existing(out: Path, src: Source, settings: dict, overwrite: bool, refresh: bool) -> Manifest | None:
    """The existing manifest if `out` already holds exactly this preparation; DataError if it holds another."""
    if not (out / MANIFEST).is_file() or overwrite:
        return None
    old = Manifest.load(out)
    if old.settings != {**settings, "source_fingerprint": old.settings.get("source_fingerprint")}:
        refresh = False  # more than the source's files changed: never replace it silently
    elif old.settings != settings:  # the same source, its files touched or edited
        if old.source.get("sha256") == src.content_sha256():
            old.settings = settings  # only touched: the tokens are still right
            _write_atomic(out / MANIFEST, old.to_json().encode())
        elif refresh:
            return None
        else:
            raise DataError(f"{src.spec!r} changed since {out} was prepared from it. Prepare it again: "
                            f"nanokimi data prepare --source {src.spec} --out {out} --overwrite")
    if old.settings != settings:
        differ = sorted(k for k in settings.keys() | old.settings.keys() if settings.get(k) != old.settings.get(k))
        what = ", ".join(f"{k}: {old.settings.get(k)!r} there vs {settings.get(k)!r} now" for k in differ)
        raise DataError(
            f"{out} was prepared from a different source/tokenizer/settings ({what}). "
            "Choose another output folder (--out; data.dir for a training run), or replace it (--overwrite; "
            "for a training run, delete the folder)."
        )
    for split in old.splits.values():
        for shard in split.shards:
            path = out / shard.file
            if not path.is_file() or path.stat().st_size != shard.tokens * np.dtype(shard.dtype).itemsize:
                return None  # incomplete: prepare again
    return old if (out / TOKENIZER).is_file() else None


def _val_threshold(hashes: list[float], val_fraction: float) -> float:
    """Documents with hash below the result go to val: about `val_fraction` of them, but at least
    ceil(val_fraction * n) and at least one (when n >= 2), always leaving at least one for train."""
    n = len(hashes)
    if n < 2:
        return 0.0
    want = min(max(math.ceil(val_fraction * n), 1), n - 1)
    have = sum(h < val_fraction for h in hashes)
    if want <= have <= n - 1:
        return val_fraction
    ordered = sorted(hashes)
    return float(np.nextafter(ordered[want - 1], 1.0)) if have < want else ordered[n - 1]


def _hash_sample(docs, budget: int) -> set[str]:
    """Ids of documents taken in the order of their hash until `budget` characters: a fixed, spread-out sample."""
    chosen, size = set(), 0
    for doc_id, _, n in sorted(docs, key=lambda d: d[1]):
        if size >= budget:
            break
        chosen.add(doc_id)
        size += n
    return chosen


def _tokenizer_sample(src: Source, text_field: str, docs, val_threshold: float, budget: int) -> Iterator[str]:
    """Train documents in order of their hash until `budget` characters: a fixed, spread-out sample."""
    chosen = _hash_sample([d for d in docs if d[1] >= val_threshold], budget)
    return (d.text for d in _documents(src, text_field) if d.id in chosen)


def _batches(docs: Iterator[Document], max_chars: int) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Buffers one split's token stream and writes it as <split>_000.bin, <split>_001.bin, ..."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=dtype)
        self.filled = 0
        self.shards: list[Shard] = []

    def write(self, ids: list[int]) -> None:
        tokens = np.asarray(ids, dtype=self.dtype)
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self._flush()

    def close(self) -> list[Shard]:
        if self.filled:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        data = self.buffer[: self.filled].astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        _write_atomic(self.out / name, data)
        self.shards.append(Shard(name, self.filled, hashlib.sha256(data).hexdigest(), self.dtype.name))
        self.filled = 0


def _remove_outputs(out: Path) -> None:
    """Delete what an earlier prepare wrote here (never other files)."""
    for pattern in (MANIFEST, TOKENIZER, "train_*.bin", "val_*.bin", "*.tmp-*"):
        for p in out.glob(pattern):
            p.unlink()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
