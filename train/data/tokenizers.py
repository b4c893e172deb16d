"""Tokenizers of the `text` task: byte-level (the default, no files), SentencePiece, tiktoken and Hugging Face
`tokenizer.json` (optional extras).

Every tokenizer maps document bytes to int32 ids and back, and names a separator id (`sep_id`) that ends each
document in a packed stream (train/data/packing.py). `vocab_size` counts every id it can produce, separator
included: the model's `model.vocab_size` must be at least that. `token_bytes()` gives the number of UTF-8 bytes
each id stands for, which turns a loss per token into bits per byte.

SentencePiece, tiktoken and tokenizers are imported only when configured; a missing package is a config error naming
the key and the extra to install.
"""

import json
import os
import re
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


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library, what Llama-family checkpoints ship): the file, or a
    directory holding it. The separator is `separator_token` if given, else the EOS token named by the
    tokenizer_config.json (or special_tokens_map.json) beside it, else the first of `EOS_CANDIDATES` in the vocabulary.
    Documents are encoded without the tokenizer's added BOS/EOS (packing adds the separator), and a document's own
    text is never read as a special token ("</s>" written in a document is text)."""

    FILE = "tokenizer.json"
    EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")

    def __init__(self, model: str, separator_token: str = ""):
        try:
            import tokenizers
        except ImportError:
            raise _missing("tokenizers", "hf", "tokenizers") from None
        path = os.path.expanduser(model)
        if os.path.isdir(path):
            path = os.path.join(path, self.FILE)
        if not model or not os.path.isfile(path):
            raise FileNotFoundError(f"data.text.tokenizer_model: {model!r} is neither a tokenizer.json nor a directory "
                                    "holding one")
        self.path = path
        try:
            self.tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for any file it cannot parse
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"data.text.tokenizer_model: {path} is not a Hugging Face tokenizer.json ({why})"
                             ) from None
        self.tok.encode_special_tokens = True  # "</s>" in a document's text is text, never the separator
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0  # ids may have gaps: the largest counts
        name = separator_token or self._eos(os.path.dirname(path), vocab)
        if name not in vocab:
            what = "data.text.separator_token" if separator_token else "its EOS token"
            raise ValueError(f"data.text.tokenizer_model: {path} has no token {name!r} ({what})")
        self.sep_token, self.sep_id = name, vocab[name]
        self._special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def _eos(cls, directory: str, vocab: dict) -> str:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            try:
                with open(os.path.join(directory, name)) as f:
                    eos = json.load(f).get("eos_token")
            except (OSError, ValueError, AttributeError):  # absent, not JSON, not an object
                continue
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str) and eos:
                return eos
        for eos in cls.EOS_CANDIDATES:
            if eos in vocab:
                return eos
        raise ValueError(f"data.text.tokenizer_model: {directory}/tokenizer.json names no EOS token (no "
                         f"tokenizer_config.json eos_token, none of {list(cls.EOS_CANDIDATES)}): set "
                         "data.text.separator_token")

    def encode(self, text: bytes) -> np.ndarray:
        ids = self.tok.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False).ids
        return np.asarray(ids, np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.sep_id],
                               skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        # Byte-level BPE (GPT-2, Llama 3) writes each byte as one character; SentencePiece-style vocabularies (Llama
        # 2) write "▁" for a space and <0xAB> for a byte-fallback piece.
        byte_level = type(self.tok.decoder).__name__ == "ByteLevel"
        out = np.zeros(self.vocab_size, np.int64)
        for piece, i in self.tok.get_vocab(with_added_tokens=True).items():
            if i in self._special:
                continue
            if byte_level:
                out[i] = len(piece)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                out[i] = 1
            else:
                out[i] = len(piece.replace("\u2581", " ").encode())
        return out


def make_tokenizer(kind: str, model: str = "", separator_token: str = "") -> Tokenizer:
    """`data.text.tokenizer` ("bytes", "sentencepiece", "tiktoken", "hf"), `data.text.tokenizer_model` and
    `data.text.separator_token` (hf only) -> a tokenizer."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "sentencepiece":
        return SentencePieceTokenizer(model)
    if kind == "tiktoken":
        return TiktokenTokenizer(model)
    if kind == "hf":
        return HFTokenizer(model, separator_token)
    raise ValueError(f"data.text.tokenizer: unknown tokenizer {kind!r}; use bytes, sentencepiece, tiktoken or hf")


def text_tokenizer(text_cfg) -> Tokenizer:
    """The tokenizer of a `data.text` config section."""
    return make_tokenizer(text_cfg.tokenizer, text_cfg.tokenizer_model, text_cfg.separator_token)
