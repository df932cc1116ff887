"""A byte-level BPE tokenizer (HF `tokenizers`) with one special token, `<|endoftext|>`.

Byte-level means every string is first turned into its UTF-8 bytes, so any text round-trips exactly:
decode(encode(s)) == s. The literal text "<|endoftext|>" inside a document is encoded as ordinary text;
only the data packer inserts the real end-of-text id between documents.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanokimi.data.corpus import DataError

EOT = "<|endoftext|>"


class Tokenizer:
    """Wraps an HF `tokenizers.Tokenizer`; `eot_id` is the id of `<|endoftext|>`."""

    def __init__(self, hf: HFTokenizer):
        eot_id = hf.token_to_id(EOT)
        if eot_id is None:
            raise DataError(f"The tokenizer has no {EOT!r} token; nanokimi separates documents with it. "
                            "Train one with `nanokimi data prepare` (no --tokenizer), or add the token.")
        hf.encode_special_tokens = True  # document text never turns into the end-of-text id
        self.hf = hf
        self.eot_id = eot_id

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"Tokenizer file {path} does not exist; give the path of a tokenizer.json.")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"{path} is not a valid HF tokenizers tokenizer.json: {e}") from e
        return cls(hf)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, *, show_progress: bool = False) -> "Tokenizer":
        """Train byte-level BPE on `texts`: 256 byte tokens + `<|endoftext|>` + merges up to vocab_size."""
        minimum = len(pre_tokenizers.ByteLevel.alphabet()) + 1
        if vocab_size < minimum:
            raise DataError(f"vocab_size must be at least {minimum} (256 bytes + {EOT}), got {vocab_size}.")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (temp name, then rename)."""
        path = Path(path)
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
