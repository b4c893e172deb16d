"""Tokenizer round trips: byte-level always; SentencePiece, tiktoken and Hugging Face tokenizer.json when their
(optional) packages are present."""

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


needs_tokenizers = pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                                      reason="tokenizers is not installed (pip install 'effarch[tokenizers]')")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    from tests.helpers.tiny_tokenizers import byte_level_bpe

    return byte_level_bpe(tmp_path_factory.mktemp("hf") / "tok").parent


@needs_tokenizers
@pytest.mark.parametrize("text", [*TEXTS, "a </s> b <s>"])
def test_hf_tokenizer_round_trip(hf_dir, text):
    tok = make_tokenizer("hf", str(hf_dir))  # the directory or the file itself
    assert make_tokenizer("hf", str(hf_dir / "tokenizer.json")).encode(text.encode()).tolist() == (
        ids := tok.encode(text.encode())).tolist()
    assert ids.dtype == np.int32 and ((ids >= 0) & (ids < tok.vocab_size)).all()
    assert tok.decode(ids) == text and tok.decode([*ids, tok.sep_id]) == text
    assert (tok.vocab_size, tok.sep_token, tok.sep_id) == (300, "</s>", 2)  # no tokenizer_config.json: "</s>"
    assert tok.sep_id not in ids  # "</s>" written in a document is text, not the separator
    assert tok.token_bytes()[ids].sum() == len(text.encode()) and tok.token_bytes()[tok.sep_id] == 0


@needs_tokenizers
def test_hf_separator_from_the_config_or_the_key(hf_dir, tmp_path):
    from tests.helpers.tiny_tokenizers import byte_level_bpe

    d = byte_level_bpe(tmp_path / "t", config={"eos_token": {"content": "<s>", "special": True}}).parent
    assert make_tokenizer("hf", str(d)).sep_token == "<s>"  # tokenizer_config.json's eos_token
    assert make_tokenizer("hf", str(d), separator_token="<unk>").sep_id == 0
    with pytest.raises(ValueError, match=r"has no token 'EOT' \(data.text.separator_token\)"):
        make_tokenizer("hf", str(d), separator_token="EOT")
    metaspace = tmp_path / "m"
    from tests.helpers.tiny_tokenizers import metaspace_bpe

    tok = make_tokenizer("hf", str(metaspace_bpe(metaspace, 100, "abc ", ["ab ca bc"] * 5)))
    ids = tok.encode(b"ab cab")
    assert tok.decode(ids) == "ab cab" and tok.token_bytes()[ids].sum() == 6  # "\u2581" counts as the space


@needs_tokenizers
def test_hf_tokenizer_files_that_do_not_parse(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(ValueError, match=rf"^data.text.tokenizer_model: {tmp_path}/tokenizer.json is not a Hugging "
                                         r"Face tokenizer.json \(.+\)$"):
        make_tokenizer("hf", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is neither a tokenizer.json nor a directory holding one"):
        make_tokenizer("hf", str(tmp_path / "empty_dir_or_missing"))


def test_hf_tokenizer_without_its_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ValueError, match=r"data.text.tokenizer=hf needs the tokenizers package: "
                                         r"pip install 'effarch\[tokenizers\]'"):
        make_tokenizer("hf", "x")


@needs_tokenizers
def test_text_task_with_an_hf_tokenizer(hf_dir, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text("".join(f'{{"text": "then the theme {i} </s>"}}\n' for i in range(40)))
    text = TextData(source=str(tmp_path / "c"), tokenizer="hf", tokenizer_model=str(hf_dir), val_fraction=0.2)
    cfg = DataConfig(task="text", data_dir=str(tmp_path / "d"), seq_len=16, text=text)
    stream, (val,) = build_data(cfg, vocab_size=300, batch_size=2)
    x, y = stream.batch(0)
    assert x.max() < 300 and (y[x == 2] == -100).all()  # the label after a separator is masked
    assert val.bytes_per_label > 1
    with pytest.raises(ValueError, match=r"^model.vocab_size=299 is smaller than the 300 ids of "
                                         r"data.text.tokenizer=hf \(separator id 2 included\)$"):
        build_data(cfg, vocab_size=299, batch_size=2)
