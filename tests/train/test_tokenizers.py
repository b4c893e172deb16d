"""Tokenizer round trips: byte-level always; SentencePiece and tiktoken when their (optional) packages are present."""

import base64
import importlib.util
import sys

import numpy as np
import pytest

from effarch.train.config import DataConfig, TextData
from effarch.train.data import build_data
from effarch.train.data.tokenizers import ByteTokenizer, make_tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "naïve café — ✓ 漢字\t", "", "the theme: then the thesis"]

needs_sentencepiece = pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is None,
                                         reason="sentencepiece is not installed (pip install 'effarch[sentencepiece]')")
needs_tiktoken = pytest.mark.skipif(importlib.util.find_spec("tiktoken") is None,
                                    reason="tiktoken is not installed (pip install 'effarch[tiktoken]')")


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text.encode())
    assert ids.dtype == np.int32 and len(ids) == len(text.encode()) and (ids < 256).all()
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.sep_id]) == text  # the separator decodes to nothing
    assert (tok.vocab_size, tok.sep_id) == (257, 256)
    assert tok.token_bytes().sum() == 256 and tok.token_bytes()[tok.sep_id] == 0


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    corpus = [t for t in TEXTS if t] * 20 + ["import os\nprint(os.getcwd())\n"] * 20
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=f, vocab_size=296,
                                       byte_fallback=True, normalization_rule_name="identity",
                                       remove_extra_whitespaces=False, split_by_whitespace=True, minloglevel=2)
    return str(path)


@needs_sentencepiece
@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip(sentencepiece_model, text):
    tok = make_tokenizer("sentencepiece", sentencepiece_model)
    ids = tok.encode(text.encode())
    assert ids.dtype == np.int32 and ((ids >= 0) & (ids < tok.vocab_size)).all()
    assert tok.decode(ids) == text
    assert tok.sep_id == tok.sp.eos_id() and tok.vocab_size == 296
    assert tok.token_bytes()[tok.sep_id] == 0
    if text:  # a piece's byte count: the pieces of a text add up to its UTF-8 length (byte fallback included)
        assert tok.token_bytes()[ids].sum() == len(text.encode()) + (tok.sp.id_to_piece(int(ids[0]))[0] == "\u2581")


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory):
    pytest.importorskip("tiktoken", reason="tiktoken is not installed")
    merges = [b"th", b"he", b"the", b" the", b"en", b"then"]
    lines = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]
    lines += [base64.b64encode(m) + b" %d" % (256 + i) for i, m in enumerate(merges)]
    path = tmp_path_factory.mktemp("tiktoken") / "tiny.tiktoken"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@needs_tiktoken
@pytest.mark.parametrize("text", TEXTS)
def test_tiktoken_round_trip(tiktoken_file, text):
    tok = make_tokenizer("tiktoken", tiktoken_file)
    ids = tok.encode(text.encode())
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.sep_id) == (263, 262)  # 256 bytes + 6 merges, then <|endoftext|>
    assert tok.token_bytes()[ids].sum() == len(text.encode()) and tok.token_bytes()[tok.sep_id] == 0
    if "the" in text:
        assert len(ids) < len(text.encode())  # merges were applied
    # A document's own "<|endoftext|>" is text, not the separator.
    assert tok.sep_id not in tok.encode(b"a <|endoftext|> b")


@needs_tiktoken
def test_text_task_with_tiktoken(tiktoken_file, tmp_path):
    (tmp_path / "c").mkdir()
    for i in range(4):
        (tmp_path / "c" / f"{i}.txt").write_text(f"then the theme {i}\n" * 30)
    text = TextData(source=str(tmp_path / "c"), tokenizer="tiktoken", tokenizer_model=tiktoken_file, val_fraction=0.3)
    cfg = DataConfig(task="text", data_dir=str(tmp_path / "d"), seq_len=16, text=text)
    stream, (val,) = build_data(cfg, vocab_size=263, batch_size=2)
    x, y = stream.batch(0)
    assert x.max() < 263 and (y[x == 262] == -100).all()
    # Bytes per label = the UTF-8 bytes of every labelled token / the labels (the separator label stands for 0 bytes).
    tok = make_tokenizer("tiktoken", tiktoken_file)
    labelled = val.labels[val.labels != -100]
    assert val.bytes_per_label == pytest.approx(tok.token_bytes()[labelled].sum() / labelled.size, rel=1e-12)
    assert val.bytes_per_label > 1  # merges make a label stand for more than one byte


@pytest.mark.parametrize("package", ["sentencepiece", "tiktoken"])
def test_missing_package_names_the_key_and_the_extra(package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # what an environment without the extra looks like to `import`
    with pytest.raises(ValueError, match=rf"data.text.tokenizer={package} needs the {package} package: "
                                         rf"pip install 'effarch\[{package}\]'"):
        make_tokenizer(package, "x")


@needs_sentencepiece
def test_missing_sentencepiece_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.text.tokenizer_model: SentencePiece model file"):
        make_tokenizer("sentencepiece", str(tmp_path / "missing.model"))


@needs_tiktoken
def test_unknown_tiktoken_encoding():
    with pytest.raises(ValueError, match="data.text.tokenizer_model: 'no_such_encoding' is neither a file nor"):
        make_tokenizer("tiktoken", "no_such_encoding")
