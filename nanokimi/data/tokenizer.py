"""Tokenizers: one interface over HF `tokenizers` JSON (nanokimi's own) and Kimi's tiktoken format.

Both are byte-level BPE, so any text round-trips exactly: decode(encode(s)) == s. Special tokens
(`<|endoftext|>`, `<|im_end|>`, ...) are single ids that plain text never produces: `encode` reads the
literal text "<|im_end|>" as ordinary bytes. Only `encode_chat`, for text a chat template rendered, turns
special-token strings into their ids; the data packer inserts the end-of-text id between documents.

    tok = load_tokenizer(checkpoint_dir)   # tokenizer.json, or tiktoken.model + tokenizer_config.json

Kimi's released checkpoints ship `tiktoken.model` (one "base64(token) rank" line per mergeable token),
`tokenizer_config.json` (special tokens by id under `added_tokens_decoder`, eos_token, chat_template) and
split text with KIMI_PATTERN before merging.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanokimi.data.corpus import DataError

EOT = "<|endoftext|>"
END_OF_TURN = "<|im_end|>"
# Kimi's chat and tool-call tokens; nanokimi's own tokenizer training adds them after EOT, so every model
# nanokimi trains can use the default Kimi-style chat template (nanokimi.data.chat).
CHAT_TOKENS = (
    "<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", END_OF_TURN,
    "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>", "<|tool_call_end|>",
)
HF_TOKENIZER, TIKTOKEN_MODEL, TOKENIZER_CONFIG = "tokenizer.json", "tiktoken.model", "tokenizer_config.json"
# Files that make up a checkpoint's tokenizer and chat format (generation_config.json names the ids that end a
# reply); convert and SFT carry them along.
TOKENIZER_FILES = (HF_TOKENIZER, TIKTOKEN_MODEL, TOKENIZER_CONFIG, "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
KIMI_RESERVED_SPECIAL = 256  # Kimi gives special tokens the ids just above the mergeable ranks, 256 of them

# Kimi's pre-tokenizer (from tokenization_kimi.py): runs of Han characters; words of other letters, either
# capitalised-then-lowercase or uppercase-then-lowercase, with an optional leading non-letter and English
# contractions; numbers of up to 3 digits; punctuation runs; newlines; other whitespace.
_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI_PATTERN = "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+{_CONTRACTION}",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*{_CONTRACTION}",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])


class TokenizerBase(ABC):
    """What every tokenizer offers. Subclasses set `eot_id` and `special_tokens` (string -> id) and
    implement `encode`, `decode`, `vocab_size` and `save`."""

    eot_id: int
    special_tokens: dict[str, int]
    extra_stop_ids: frozenset[int] = frozenset()

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; special-token strings in the text are encoded as ordinary text."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text, special tokens written out; ids outside the vocabulary are skipped."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (largest id + 1)."""

    @abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer's files."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_chat(self, text: str) -> list[int]:
        """Text rendered by a chat template -> ids: each special-token string becomes its single id, the
        text between them is encoded as plain text. Never use this on user-supplied text alone."""
        ids: list[int] = []
        start = 0
        for match in self._special_regex().finditer(text):
            if match.start() > start:
                ids += self.encode(text[start:match.start()])
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        if start < len(text):
            ids += self.encode(text[start:])
        return ids

    def token_to_id(self, token: str) -> int | None:
        """The id of a special token, or None."""
        return self.special_tokens.get(token)

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end generation: end of text, end of turn (<|im_end|>) and any eos ids the checkpoint names."""
        ids = {self.eot_id, *self.extra_stop_ids}
        if END_OF_TURN in self.special_tokens:
            ids.add(self.special_tokens[END_OF_TURN])
        return ids

    def _special_regex(self) -> re.Pattern:
        if getattr(self, "_special_pattern", None) is None:
            names = sorted(self.special_tokens, key=len, reverse=True)  # longest first: no token eats a longer one
            self._special_pattern = re.compile("|".join(map(re.escape, names)) if names else r"(?!)")
        return self._special_pattern


class Tokenizer(TokenizerBase):
    """HF `tokenizers` byte-level BPE (tokenizer.json); `eot_id` is the id of `eot_token` (<|endoftext|>)."""

    def __init__(self, hf: HFTokenizer, eot_token: str = EOT, extra_stop_ids: Iterable[int] = ()):
        eot_id = hf.token_to_id(eot_token)
        if eot_id is None:
            raise DataError(f"The tokenizer has no {eot_token!r} token; nanokimi separates documents with it. "
                            "Train one with `nanokimi data prepare` (no --tokenizer), or add the token.")
        hf.encode_special_tokens = True  # document text never turns into a special id
        self.hf = hf
        self.eot_id = eot_id
        self.special_tokens = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        self.special_tokens[eot_token] = eot_id
        self.extra_stop_ids = frozenset(extra_stop_ids)

    @classmethod
    def load(cls, path: str | os.PathLike, eot_token: str = EOT, extra_stop_ids: Iterable[int] = ()) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / HF_TOKENIZER
        if not path.is_file():
            raise DataError(f"Tokenizer file {path} does not exist; give the path of a tokenizer.json.")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"{path} is not a valid HF tokenizers tokenizer.json: {e}") from e
        return cls(hf, eot_token, extra_stop_ids)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, *, show_progress: bool = False) -> "Tokenizer":
        """Train byte-level BPE on `texts`: 256 byte tokens + `<|endoftext|>` + the chat tokens (CHAT_TOKENS)
        + merges up to vocab_size."""
        specials = [EOT, *CHAT_TOKENS]
        minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(specials)
        if vocab_size < minimum:
            raise DataError(f"vocab_size must be at least {minimum} (256 bytes + {len(specials)} special tokens), "
                            f"got {vocab_size}.")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (temp name, then rename); a folder gets PATH/tokenizer.json."""
        path = Path(path)
        if path.is_dir():
            path = path / HF_TOKENIZER
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self.hf.save(str(tmp))
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel (the Rust side uses all cores)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()


class TiktokenTokenizer(TokenizerBase):
    """Kimi's format through the `tiktoken` package: mergeable ranks, KIMI_PATTERN, and special tokens by id.

    `config` is the tokenizer_config.json it came from (kept as it is and written back by `save`);
    its eos_token is the end-of-text token.
    """

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], eot_token: str,
                 pattern: str = KIMI_PATTERN, config: dict | None = None, extra_stop_ids: Iterable[int] = ()):
        try:
            import tiktoken
        except ImportError as e:
            raise DataError("Kimi's tiktoken tokenizer format needs the tiktoken package: "
                            "pip install 'nanokimi[chat]'.") from e
        if eot_token not in special_tokens:
            raise DataError(f"The tokenizer's end-of-text token {eot_token!r} is not one of its special tokens; "
                            "name an existing one as eos_token in tokenizer_config.json.")
        clash = sorted(set(ranks.values()) & set(special_tokens.values()))
        if clash:
            raise DataError(f"special token ids {clash[:5]} are also ranks of mergeable tokens; special tokens need "
                            "ids of their own (above the ranks in tiktoken.model).")
        self.ranks, self.pattern, self.config = ranks, pattern, dict(config or {})
        self.special_tokens = dict(special_tokens)
        self.eot_id = special_tokens[eot_token]
        self.extra_stop_ids = frozenset(extra_stop_ids)
        self.encoding = tiktoken.Encoding(name="nanokimi-tiktoken", pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        self._known_ids = set(ranks.values()) | set(special_tokens.values())
        self._size = max(self._known_ids) + 1

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TiktokenTokenizer":
        """tiktoken.model + tokenizer_config.json (+ generation_config.json's eos ids as extra stop ids)."""
        directory = Path(directory)
        model_file, config_file = directory / TIKTOKEN_MODEL, directory / TOKENIZER_CONFIG
        for f in (model_file, config_file):
            if not f.is_file():
                raise DataError(f"{f} is missing; Kimi's tiktoken format needs {TIKTOKEN_MODEL} and "
                                f"{TOKENIZER_CONFIG}.")
        ranks = read_tiktoken_ranks(model_file)
        config = _read_json(config_file)
        specials = special_tokens_from_config(config, len(ranks), config_file)
        eot = _token_content(config.get("eos_token")) or (END_OF_TURN if END_OF_TURN in specials else None)
        if eot is None:
            raise DataError(f"{config_file} names no eos_token; add one (e.g. \"eos_token\": \"[EOS]\").")
        return cls(ranks, specials, eot, config=config, extra_stop_ids=_generation_eos_ids(directory))

    def save(self, directory: str | os.PathLike) -> None:
        """Write tiktoken.model and tokenizer_config.json (special tokens under added_tokens_decoder)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lines = "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                        for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]))
        _write_atomic(directory / TIKTOKEN_MODEL, lines.encode())
        config = dict(self.config)
        decoder = dict(config.get("added_tokens_decoder") or {})
        for token, i in self.special_tokens.items():
            if not token.startswith("<|reserved_token_"):
                decoder.setdefault(str(i), {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                            "single_word": False, "special": True})
        config["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
        config.setdefault("eos_token", self.id_to_special(self.eot_id))
        _write_atomic(directory / TOKENIZER_CONFIG, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([i for i in ids if i in self._known_ids])

    def id_to_special(self, token_id: int) -> str | None:
        return next((t for t, i in self.special_tokens.items() if i == token_id), None)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            h.update(token + b"\0" + str(rank).encode() + b"\n")
        h.update(json.dumps(sorted(self.special_tokens.items())).encode())
        return h.hexdigest()


def load_tokenizer(path: str | os.PathLike) -> TokenizerBase:
    """The tokenizer of a checkpoint folder: tokenizer.json (HF tokenizers) if present, else Kimi's
    tiktoken.model + tokenizer_config.json. A path to a tokenizer.json file also works."""
    path = Path(path)
    if path.is_file():
        return Tokenizer.load(path)
    if (path / HF_TOKENIZER).is_file():
        eot, stops = EOT, _generation_eos_ids(path)
        config = _read_json(path / TOKENIZER_CONFIG) if (path / TOKENIZER_CONFIG).is_file() else {}
        try:
            hf = HFTokenizer.from_file(str(path / HF_TOKENIZER))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"{path / HF_TOKENIZER} is not a valid HF tokenizers tokenizer.json: {e}") from e
        if hf.token_to_id(EOT) is None and _token_content(config.get("eos_token")):
            eot = _token_content(config["eos_token"])
        return Tokenizer(hf, eot, stops)
    if (path / TIKTOKEN_MODEL).is_file():
        return TiktokenTokenizer.load(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; give a checkpoint folder that holds its tokenizer.")
    raise DataError(f"{path} holds no tokenizer: expected {HF_TOKENIZER} (HF tokenizers) or {TIKTOKEN_MODEL} + "
                    f"{TOKENIZER_CONFIG} (Kimi's tiktoken format).")


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """A tiktoken BPE file: one 'base64(token) rank' line per mergeable token."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(Path(path).read_text(encoding="ascii", errors="strict").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (IndexError, ValueError) as e:
            raise DataError(f"{path} line {line_no} is not 'base64(token) rank': {line[:60]!r}") from e
        ranks[token] = rank
    if not ranks:
        raise DataError(f"{path} holds no tokens.")
    return ranks


def special_tokens_from_config(config: dict, num_ranks: int, where: str | os.PathLike = TOKENIZER_CONFIG
                               ) -> dict[str, int]:
    """Special tokens of a Kimi tokenizer_config.json: the added_tokens_decoder entries, and the ids left over in
    Kimi's reserved block [num_ranks, num_ranks + 256) named <|reserved_token_ID|>, as Kimi's own tokenizer does."""
    specials: dict[str, int] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _token_content(entry)
        if content is None or not str(key).isdigit():
            raise DataError(f"{where}: added_tokens_decoder entry {key!r} must map an id to {{\"content\": TOKEN}}.")
        specials[content] = int(key)
    taken = set(specials.values())
    last = max([num_ranks + KIMI_RESERVED_SPECIAL - 1, *taken])
    for i in range(num_ranks, last + 1):
        if i not in taken:
            specials[f"<|reserved_token_{i}|>"] = i
    return specials


def _token_content(entry) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _generation_eos_ids(directory: Path) -> list[int]:
    """eos_token_id (an int or a list) of generation_config.json, if the folder has one."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    eos = _read_json(path).get("eos_token_id")
    return [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from e
    if not isinstance(value, dict):
        raise DataError(f"{path} must hold a JSON object.")
    return value


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
