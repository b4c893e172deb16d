"""Tokenizers of the `text` task: byte-level (the default, no files), SentencePiece and tiktoken (optional extras).

Every tokenizer maps document bytes to int32 ids and back, and names a separator id (`sep_id`) that ends each
document in a packed stream (train/data/packing.py). `vocab_size` counts every id it can produce, separator
included: the model's `model.vocab_size` must be at least that. `token_bytes()` gives the number of UTF-8 bytes
each id stands for, which turns a loss per token into bits per byte.

SentencePiece and tiktoken are imported only when configured; a missing package is a config error naming the key
and the extra to install.
"""

import os
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int  # ids in [0, vocab_size), separator included
    sep_id: int  # ends every document of a packed stream

    def encode(self, text: bytes) -> np.ndarray: ...  # [n] int32, no separator

    def decode(self, ids) -> str: ...

    def token_bytes(self) -> np.ndarray: ...  # [vocab_size] UTF-8 bytes per id (0 for the separator / specials)


class ByteTokenizer:
    """Ids 0..255 are the bytes themselves; 256 is the document separator (vocab_size 257)."""

    vocab_size = 257
    sep_id = 256

    def encode(self, text: bytes) -> np.ndarray:
        return np.frombuffer(text, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.concatenate([np.ones(256, np.int64), np.zeros(1, np.int64)])


def _missing(package: str, key: str, extra: str) -> ValueError:
    return ValueError(f"data.text.tokenizer={key} needs the {package} package: pip install 'effarch[{extra}]'")


class SentencePieceTokenizer:
    """A SentencePiece model file. The separator is the model's EOS id, or a new id after the vocabulary if it has
    none (then vocab_size is one more than the model's)."""

    def __init__(self, model_file: str):
        try:
            import sentencepiece
        except ImportError:
            raise _missing("sentencepiece", "sentencepiece", "sentencepiece") from None
        if not model_file or not os.path.isfile(os.path.expanduser(model_file)):
            raise FileNotFoundError(f"data.text.tokenizer_model: SentencePiece model file {model_file!r} does not "
                                    "exist")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=os.path.expanduser(model_file))
        n = self.sp.get_piece_size()
        eos = self.sp.eos_id()
        self.sep_id = eos if eos >= 0 else n
        self.vocab_size = n if eos >= 0 else n + 1

    def encode(self, text: bytes) -> np.ndarray:
        return np.asarray(self.sp.encode(text.decode("utf-8", errors="replace")), np.int32)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) < self.sp.get_piece_size() and int(i) != self.sep_id])

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int64)
        for i in range(self.sp.get_piece_size()):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            # Byte-fallback pieces (<0xAB>) stand for one byte; "▁" is the space SentencePiece writes for " ".
            out[i] = 1 if self.sp.is_byte(i) else len(self.sp.id_to_piece(i).replace("\u2581", " ").encode())
        return out


class TiktokenTokenizer:
    """A tiktoken encoding: a registered name ("cl100k_base", "o200k_base", ...; tiktoken fetches its file once) or a
    local .tiktoken BPE file (base64 token and rank per line; the GPT-2 split pattern). The separator is the
    encoding's end-of-text token; a document's own text is never read as a special token."""

    GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, encoding: str):
        try:
            import tiktoken
            import tiktoken.load
        except ImportError:
            raise _missing("tiktoken", "tiktoken", "tiktoken") from None
        if not encoding:
            raise ValueError("data.text.tokenizer=tiktoken needs data.text.tokenizer_model: an encoding name or a "
                             ".tiktoken file")
        path = os.path.expanduser(encoding)
        if os.path.isfile(path):
            ranks = tiktoken.load.load_tiktoken_bpe(path)
            self.enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=self.GPT2_PATTERN, mergeable_ranks=ranks,
                                         special_tokens={"<|endoftext|>": len(ranks)})
        else:
            try:
                self.enc = tiktoken.get_encoding(encoding)
            except ValueError as e:
                raise ValueError(f"data.text.tokenizer_model: {encoding!r} is neither a file nor a tiktoken encoding "
                                 f"({e})") from None
        self.sep_id = self.enc.eot_token
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: bytes) -> np.ndarray:
        return np.asarray(self.enc.encode(text.decode("utf-8", errors="replace"), disallowed_special=()), np.int32)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids if int(i) != self.sep_id])

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int64)
        special = {self.enc.encode_single_token(s) for s in self.enc.special_tokens_set}
        for i in range(self.vocab_size):
            if i in special:
                continue
            try:
                out[i] = len(self.enc.decode_single_token_bytes(i))
            except KeyError:  # a gap in the id range
                pass
        return out


def make_tokenizer(kind: str, model: str = "") -> Tokenizer:
    """`data.text.tokenizer` ("bytes", "sentencepiece", "tiktoken") and `data.text.tokenizer_model` -> a tokenizer."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "sentencepiece":
        return SentencePieceTokenizer(model)
    if kind == "tiktoken":
        return TiktokenTokenizer(model)
    raise ValueError(f"data.text.tokenizer: unknown tokenizer {kind!r}; use bytes, sentencepiece or tiktoken")
