"""Bad paths and interruptions at the command line: one `effarch: error:` line and exit 2 (Ctrl-C during startup
too), never a traceback."""

import os
from pathlib import Path

import pytest

from effarch.train.main import os_error_message
from tests.helpers.cli import cli, one_error_line

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs" / "mqar" / "zoology_attention.yaml"
TINY = ROOT / "configs" / "overlays" / "tiny.yaml"
AS_ROOT = "running as root: permissions do not stop root, so the error cannot happen"




def test_run_dir_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "run"
    file.write_text("mine")
    code, _, err = cli(capsys, "train", BASE, TINY, f"train.run_dir={file}")
    assert code == 2 and one_error_line(err) == f"effarch: error: train.run_dir: {file} exists and is not a directory"
    assert file.read_text() == "mine"
    try:  # a run_dir below that file: the same handler, another message
        (file / "sub").mkdir(parents=True)
    except OSError as e:
        assert os_error_message(e) == f"{file / 'sub'}: a part of this path is a file, not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason=AS_ROOT)
def test_read_only_run_dir_parent(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, _, err = cli(capsys, "train", BASE, TINY, f"train.run_dir={parent / 'run'}")
    finally:
        parent.chmod(0o755)
    assert code == 2 and "permission denied" in one_error_line(err)


def test_config_file_with_an_equals_sign_is_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a=b.yaml").write_text("train: {steps: -1}\n")  # read as the override `a` it would be an unknown key
    code, _, err = cli(capsys, "train", BASE, "a=b.yaml")
    assert code == 2 and one_error_line(err) == "effarch: error: train: steps must be >= 1, got -1"


def test_ctrl_c_during_startup_is_one_line(tmp_path, capsys, monkeypatch):
    """SIGINT before training installs its handler raises KeyboardInterrupt wherever startup is (here: loading
    the config); it ends the command with one line and exit 2."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("effarch.train.config.load_config", interrupted)
    code, out, err = cli(capsys, "train", BASE, TINY, f"train.run_dir={tmp_path / 'run'}")
    assert code == 2
    assert one_error_line(err) == "effarch: error: train interrupted (Ctrl-C) before it started; nothing was written"
    assert out == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason=AS_ROOT)
def test_unreadable_corpus_file(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text("some text\n" * 50)
    (corpus / "b.txt").chmod(0o000)
    try:
        code, _, err = cli(capsys, "train", ROOT / "configs" / "lm" / "quickstart.yaml", TINY, "model.vocab_size=257",
                           f"data.text.source={corpus}", f"data.data_dir={tmp_path / 'tfds'}", "data.seq_len=16",
                           f"train.run_dir={tmp_path / 'run'}")
    finally:
        (corpus / "b.txt").chmod(0o644)
    assert code == 2 and f"{corpus / 'b.txt'}: permission denied" in one_error_line(err)


def test_a_data_error_writes_nothing_to_the_run_dir(tmp_path, capsys):
    """A binary file in a text corpus: one line naming it, and no config.yaml / run_info.json of a run that never
    started (they were written before the data was read)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text\n" * 50)
    (corpus / "b.bin").write_bytes(bytes(range(256)))
    code, _, err = cli(capsys, "train", ROOT / "configs" / "lm" / "quickstart.yaml", TINY, "model.vocab_size=257",
                       f"data.text.source={corpus}", f"data.data_dir={tmp_path / 'tfds'}", "data.seq_len=16",
                       f"train.run_dir={tmp_path / 'run'}")
    assert code == 2 and f"{corpus / 'b.bin'} is not a text file (a NUL byte at offset 0)" in one_error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("problem", ["no shard", "field in no record", "tokenizer does not parse", "vocab too large"])
def test_corpus_and_tokenizer_errors_are_one_line(tmp_path, capsys, problem):
    """Bad input of a sharded corpus or an hf tokenizer: one line naming it, exit 2, no run directory."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "some text"}\n' * 50)
    args = [f"data.text.source={corpus}"]
    if problem == "no shard":
        args = [f"data.text.source={corpus}/*.parquet"]
        expected = f"data: data.text.source: no files match '{corpus}/*.parquet'"
    elif problem == "field in no record":
        args.append("data.text.field=body")
        expected = f"data: data.text.field='body' is in none of the 50 records of the 1 record files under {corpus}"
    else:
        pytest.importorskip("tokenizers", reason="tokenizers is not installed")
        from tests.helpers.tiny_tokenizers import byte_level_bpe

        model = tmp_path / "tok" / "tokenizer.json"
        if problem == "tokenizer does not parse":
            model.parent.mkdir()
            model.write_text("{not json")
        else:
            byte_level_bpe(model.parent, vocab_size=300)
        args += ["data.text.tokenizer=hf", f"data.text.tokenizer_model={model.parent}"]
        expected = (f"data: data.text.tokenizer_model: {model} is not a Hugging Face tokenizer.json ("
                    if problem == "tokenizer does not parse" else
                    "data: model.vocab_size=257 is smaller than the 300 ids of data.text.tokenizer=hf (separator id 2 "
                    "included)")
    code, out, err = cli(capsys, "train", ROOT / "configs" / "lm" / "quickstart.yaml", TINY, "model.vocab_size=257",
                         f"data.data_dir={tmp_path / 'tfds'}", "data.seq_len=16", f"train.run_dir={tmp_path / 'run'}",
                         *args)
    assert code == 2  # (stdout may hold TFDS's "Downloading and preparing" line of the corpus build)
    assert one_error_line(err).startswith(f"effarch: error: {expected}")
    assert not (tmp_path / "run").exists()
