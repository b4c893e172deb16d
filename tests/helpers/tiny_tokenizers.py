"""Tiny Hugging Face tokenizers trained in the test (the `tokenizers` library; no download)."""

import json
from pathlib import Path

CORPUS = ["def f(x):\n    return x + 1\n", "the theme: then the thesis", "naïve café — ✓ 漢字\t",
          "the quick brown fox jumps over the lazy dog\n", "import os\nprint(os.getcwd())\n"] * 20
SPECIALS = ["<unk>", "<s>", "</s>"]


def byte_level_bpe(directory: Path, vocab_size: int = 300, config: dict | None = None) -> Path:
    """A GPT-2-style byte-level BPE (every text round-trips) written as directory/tokenizer.json, and
    tokenizer_config.json when `config` is given. Returns the tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return _save(tok, directory, config)


def metaspace_bpe(directory: Path, vocab_size: int, alphabet: str, texts: list[str],
                  config: dict | None = None) -> Path:
    """A SentencePiece-style BPE ("▁" for a space, <unk> outside `alphabet`) of at most `vocab_size` ids: small
    enough for a tiny model's vocabulary. Texts within the alphabet round-trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=sorted(set(alphabet.replace(" ", "\u2581"))), limit_alphabet=1000)
    tok.train_from_iterator(texts, trainer)
    return _save(tok, directory, config)


def _save(tok, directory: Path, config: dict | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json"
