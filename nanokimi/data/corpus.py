"""Sources of text documents for `nanokimi data prepare`, and the stable train/val split.

A source is one of:
  "stdlib"            the *.py files of the running interpreter's standard library (no site-packages)
  a .jsonl file       one document per line, taken from a named string field
  any other file      a text file, cut into documents of about DOC_CHARS characters at blank lines
  a folder            every text-like file below it (recursively; hidden entries skipped); .jsonl files
                      inside are read as jsonl, every other file is one document
  a glob pattern      like a folder, but only the matching files (`**` recurses)

Documents come in a fixed order (sorted paths, then file order), and each has an id that does not depend
on where the source lives on disk, so the split of a document is the same on every machine.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """Data cannot be prepared or loaded; the message says what was wrong and how to fix it."""


DOC_CHARS = 4096
SNIFF_BYTES = 8192
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: Path
    doc_prefix: str  # ids of its documents start with this (a path relative to the source root)
    is_jsonl: bool


@dataclass(frozen=True, slots=True)
class Source:
    """A resolved source: what it is, the files behind it, and how to describe it in errors."""

    spec: str
    kind: str  # "stdlib" | "text" | "jsonl" | "folder" | "glob"
    root: Path
    files: tuple[SourceFile, ...]
    filter: str

    def fingerprint(self) -> str:
        """sha256 over (id prefix, size, mtime) of every file: changes when the source's files change."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.path.stat()
            h.update(f"{f.doc_prefix}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def content_sha256(self) -> str:
        """sha256 over (id prefix, bytes) of every file: changes only when the text changes."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.doc_prefix}\0".encode())
            with open(f.path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            h.update(b"\0\n")
        return h.hexdigest()


def hash_unit(doc_id: str) -> float:
    """A stable number in [0, 1) from the sha1 of the document id."""
    return int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(doc_id: str, val_fraction: float) -> str:
    """"val" for about `val_fraction` of all ids (chosen by sha1 of the id), "train" for the rest."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    return "val" if hash_unit(doc_id) < val_fraction else "train"


def resolve_source(source: str | os.PathLike) -> Source:
    """Find the files behind `source`; raise DataError if it does not exist or matches nothing."""
    spec = str(source)
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"]).resolve()
        files = [SourceFile(p, p.relative_to(root).as_posix(), False) for p in _walk(root, "*.py", sniff=False)]
        return Source(spec, "stdlib", root, _sorted(files), f"*.py under {root}, excluding site-packages")
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [SourceFile(p, p.relative_to(path).as_posix(), p.suffix == ".jsonl") for p in _walk(path)]
        return Source(spec, "folder", path, _sorted(files), f"text-like files under {path}, recursively")
    if path.is_file():
        is_jsonl = path.suffix == ".jsonl"
        return Source(spec, "jsonl" if is_jsonl else "text", path.parent, (SourceFile(path, path.name, is_jsonl),),
                      f"the lines of {path}" if is_jsonl else f"the text of {path}")
    if glob.has_magic(spec):
        base = Path(_glob_base(spec))
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [SourceFile(p, p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix(),
                            p.suffix == ".jsonl") for p in matches if p.is_file() and _is_text_like(p)]
        return Source(spec, "glob", base, _sorted(files), f"text-like files matching {spec!r}")
    missing = next((p for p in [path, *path.parents] if p.exists()), None)
    hint = f" (the nearest existing folder is {missing})" if missing is not None and missing != Path(".") else ""
    raise DataError(
        f"Data source {spec!r} does not exist{hint}. Give 'stdlib', an existing text file, a .jsonl file, "
        "a folder, or a glob pattern such as 'texts/**/*.txt'."
    )


def iter_documents(source: str | os.PathLike | Source, text_field: str = "text") -> Iterator[Document]:
    """Yield every non-empty document of `source` in a fixed order (see the module docstring)."""
    src = source if isinstance(source, Source) else resolve_source(source)
    for f in src.files:
        if f.is_jsonl:
            yield from _jsonl_documents(f, text_field)
            continue
        text = _read_text(f.path, strict=src.kind == "text")
        if text is None or not text.strip():
            continue
        if src.kind == "text":
            yield from _chunk_documents(f.doc_prefix, text)
        else:
            yield Document(f.doc_prefix, text)


def _sorted(files: list[SourceFile]) -> tuple[SourceFile, ...]:
    return tuple(sorted(files, key=lambda f: f.doc_prefix))


def _walk(root: Path, pattern: str = "*", sniff: bool = True) -> Iterator[Path]:
    """Files under root matching `pattern`, skipping hidden entries, site-packages and (if sniff) binaries."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in EXCLUDED_DIRS]
        for name in filenames:
            p = Path(dirpath) / name
            if not name.startswith(".") and fnmatch.fnmatch(name, pattern) and p.is_file() and (
                    not sniff or _is_text_like(p)):
                yield p


def _glob_base(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard ('data/*/x.txt' -> 'data')."""
    parts = Path(os.path.expanduser(pattern)).parts
    plain = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return str(Path(*plain)) if plain else "."


def _is_text_like(path: Path) -> bool:
    """No NUL byte in the first 8 KiB: text. Undecodable files are skipped later, when read."""
    with open(path, "rb") as fh:
        return b"\0" not in fh.read(SNIFF_BYTES)


def _read_text(path: Path, strict: bool) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8.") from e
        return None


def _chunk_documents(prefix: str, text: str) -> Iterator[Document]:
    """Cut one text into documents of at least DOC_CHARS characters, each ending after a blank line; a text
    without blank lines is cut at line ends after 4 * DOC_CHARS, and a line longer than that in pieces of
    4 * DOC_CHARS characters, so that any text of more than a few documents' length can be split.

    The documents joined back together give the text exactly; ids are '<file>:<first line number>' (plus
    ':<character offset>' for the pieces of a long line).
    """
    lines = text.splitlines(keepends=True)
    start, size, first_line = 0, 0, 1
    for i, line in enumerate(lines):
        if len(line) > 4 * DOC_CHARS:  # one very long line: flush what came before, then cut it by position
            if start < i:
                yield Document(f"{prefix}:{first_line}", "".join(lines[start:i]))
            for offset in range(0, len(line), 4 * DOC_CHARS):
                yield Document(f"{prefix}:{i + 1}:{offset}", line[offset : offset + 4 * DOC_CHARS])
            start, size, first_line = i + 1, 0, i + 2
            continue
        size += len(line)
        if (size >= DOC_CHARS and not line.strip()) or size >= 4 * DOC_CHARS:
            yield Document(f"{prefix}:{first_line}", "".join(lines[start : i + 1]))
            start, size, first_line = i + 1, 0, i + 2
    if start < len(lines):
        yield Document(f"{prefix}:{first_line}", "".join(lines[start:]))


def read_jsonl(path) -> Iterator[tuple[int, str, object]]:
    """(line number, line, parsed value) for every non-blank line of a jsonl file; a line that is not JSON is a
    DataError naming it."""
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, line, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no} is not valid JSON ({e.msg}); fix or remove that line.") from e


def _jsonl_documents(f: SourceFile, text_field: str) -> Iterator[Document]:
    for line_no, _, record in read_jsonl(f.path):
        if not isinstance(record, dict):
            raise DataError(f"{f.path} line {line_no} is a JSON {type(record).__name__}, not an object "
                            f"with a {text_field!r} field.")
        if text_field not in record:
            raise DataError(
                f"{f.path} line {line_no} has no field {text_field!r}; its fields are "
                f"{sorted(record)}. Pick one with --text-field NAME."
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{f.path} line {line_no}: field {text_field!r} is a {type(text).__name__}, "
                            "not a string; pick a text field with --text-field NAME.")
        if text.strip():
            yield Document(f"{f.doc_prefix}:{line_no}", text)
