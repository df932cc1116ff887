"""Data layer: sources -> byte-level BPE -> token shards + manifest -> deterministic batches."""
from nanokimi.data.corpus import DataError, Document, iter_documents, resolve_source, split_of
from nanokimi.data.loader import SplitTokens, TokenStream, iter_eval
from nanokimi.data.shards import Manifest, prepare
from nanokimi.data.tokenizer import EOT, Tokenizer

__all__ = [
    "DataError",
    "Document",
    "EOT",
    "Manifest",
    "SplitTokens",
    "TokenStream",
    "Tokenizer",
    "iter_documents",
    "iter_eval",
    "prepare",
    "resolve_source",
    "split_of",
]
