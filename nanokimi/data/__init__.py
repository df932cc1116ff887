"""Data layer: sources -> byte-level BPE -> token shards + manifest -> deterministic batches; chat formats."""
from nanokimi.data.corpus import DataError, Document, iter_documents, resolve_source, split_of
from nanokimi.data.loader import SplitTokens, TokenStream, iter_eval
from nanokimi.data.shards import Manifest, prepare
from nanokimi.data.tokenizer import EOT, TiktokenTokenizer, Tokenizer, TokenizerBase, load_tokenizer

__all__ = [
    "DataError",
    "Document",
    "EOT",
    "Manifest",
    "SplitTokens",
    "TiktokenTokenizer",
    "TokenStream",
    "Tokenizer",
    "TokenizerBase",
    "iter_documents",
    "iter_eval",
    "load_tokenizer",
    "prepare",
    "resolve_source",
    "split_of",
]
