"""A Hugging Face checkpoint's own tokenizer: `effarch import-hf` carries tokenizer.json (and tokenizer_config.json,
special_tokens_map.json) into the run directory and configures `data.text.tokenizer: hf`; export-hf writes them back;
end to end, the transformers-written fixture Llama fine-tuned on a .jsonl.zst + .parquet corpus through its own
tokenizer, prompted with --text, exported, and loaded by transformers with the same logits."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from effarch.train.config import load_config
from effarch.train.hf import TOKENIZER_DIR, TOKENIZER_FILES, tokenizer_sources
from tests.arches.test_hf_llama import FIXTURE, assert_logits_close
from tests.helpers.cli import cli, one_error_line
from tests.train.test_hf import HF_REFERENCE, _hf_python

pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install 'effarch[tokenizers]')")

from tests.helpers.tiny_tokenizers import byte_level_bpe, metaspace_bpe  # noqa: E402 - needs tokenizers

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"
WORDS = "the quick brown fox jumps over a lazy dog while seven cats watch from an old wall".split()
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) + "." for _ in range(n)]


def llama_with_tokenizer(directory: Path) -> Path:
    """The fixture Llama (written by transformers; vocab 199) with a tokenizer of its own that fits it."""
    shutil.copytree(FIXTURE, directory)
    metaspace_bpe(directory, 199, ALPHABET, sentences(200),
                  config={**SPECIAL_TOKENS, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256})
    (directory / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS))
    return directory


def test_import_hf_carries_the_tokenizer(tmp_path, capsys):
    from effarch.train.data.tokenizers import text_tokenizer

    ckpt = llama_with_tokenizer(tmp_path / "ckpt")
    code, _, err = cli(capsys, "import-hf", ckpt, tmp_path / "run")
    assert code == 0, err
    for f in TOKENIZER_FILES:
        assert (tmp_path / "run" / TOKENIZER_DIR / f).read_bytes() == (ckpt / f).read_bytes(), f
    cfg = load_config([tmp_path / "run" / "config.yaml"])
    assert (cfg.data.task, cfg.data.text.tokenizer) == ("text", "hf")
    assert cfg.data.text.tokenizer_model == str((tmp_path / "run" / TOKENIZER_DIR).absolute())
    tok = text_tokenizer(cfg.data.text)
    assert tok.sep_token == "</s>" and tok.vocab_size <= cfg.model.vocab_size == 199
    # export-hf copies these files (write_hf_checkpoint's part is tests/train/test_hf.py's):
    assert tokenizer_sources(cfg) == [tmp_path / "run" / TOKENIZER_DIR / f for f in TOKENIZER_FILES]
    # (the end-to-end test below exports for real)


@pytest.mark.parametrize("problem", ["does not parse", "too many ids"])
def test_import_hf_refuses_a_tokenizer_it_cannot_use(tmp_path, capsys, problem):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    if problem == "does not parse":
        (ckpt / "tokenizer.json").write_text('{"model": "truncated')
        expected = rf"{ckpt}/tokenizer.json: not a Hugging Face tokenizer.json \(.+\)"
    else:
        byte_level_bpe(ckpt, vocab_size=300)
        expected = rf"{ckpt}/tokenizer.json: its 300 token ids do not fit the model's vocab_size=199 \(config.json\)"
    code, out, err = cli(capsys, "import-hf", ckpt, tmp_path / "run")
    assert code == 2 and out == ""
    assert re.fullmatch("effarch: error: " + expected, one_error_line(err, alone=True))
    assert not (tmp_path / "run").exists()  # nothing written


def write_corpus(root: Path) -> None:
    """Half the documents in a .jsonl.zst shard, half in a .parquet shard (and a record to skip in each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = sentences(160, seed=1)
    root.mkdir(parents=True)
    lines = [json.dumps({"text": d, "url": f"https://example.com/{i}"}) for i, d in enumerate(docs[:80])]
    raw = "\n".join([*lines, json.dumps({"url": "no text"})]).encode() + b"\n"
    (root / "part-00000.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": [*docs[80:], None]}), root / "part-00001.parquet")


@pytest.mark.slow  # a fine-tuning run, generation, an eval, an export and transformers: 60-140 s on 2 loaded cores
def test_imported_llama_fine_tuned_on_its_own_tokenizer_end_to_end(tmp_path, capsys):
    from effarch.train.data.tokenizers import text_tokenizer
    from effarch.train.generate import generate, load_model

    ckpt = llama_with_tokenizer(tmp_path / "ckpt")
    run, ft = tmp_path / "run", tmp_path / "ft"
    assert cli(capsys, "import-hf", ckpt, run)[0] == 0
    write_corpus(tmp_path / "corpus")
    overrides = [f"train.run_dir={ft}", f"train.init_from={run}", "train.steps=4", "train.batch_size=4",
                 "train.eval_batch_size=4", "train.eval_every=4", "train.progress=false", "optim.lr=3e-3",
                 f"data.text.source={tmp_path / 'corpus'}", f"data.data_dir={tmp_path / 'tfds'}", "data.seq_len=32"]
    code, out, err = cli(capsys, "train", run / "config.yaml", *overrides)
    assert code == 0, err
    report = json.loads((ft / "init_report.json").read_text())
    assert report["new"] == report["dropped"] == report["reshaped"] == [] and report["loaded"]
    cfg = load_config([ft / "config.yaml"])
    tok = text_tokenizer(cfg.data.text)
    assert cfg.data.text.tokenizer_model == str(run.absolute() / TOKENIZER_DIR)

    prompt = "the quick brown fox"
    ids = tok.encode(prompt.encode())
    assert tok.decode(ids) == prompt and 0 not in ids  # no <unk>: the tokenizer covers the corpus' alphabet
    code, out, err = cli(capsys, "generate", ft, "--text", prompt, "--max-new-tokens", 6)
    assert code == 0, err
    model = load_model(ft)
    assert out == tok.decode(generate(model, ids[None], 6)[0]) + "\n"
    assert set(out) <= set(ALPHABET)  # text in the tokenizer's alphabet, decoded through its own pieces
    code, out, err = cli(capsys, "eval", ft, "perplexity", "--max-examples", 4)
    assert code == 0, err
    assert json.loads((ft / "eval" / "perplexity.json").read_text())["checkpoint_step"] == 4

    code, _, err = cli(capsys, "export-hf", ft, tmp_path / "exported")
    assert code == 0, err
    for f in TOKENIZER_FILES:
        assert (tmp_path / "exported" / f).read_bytes() == (ckpt / f).read_bytes(), f
    ours = np.asarray(model(jnp.asarray(ids[None]))[0])
    before = np.asarray(load_model(run)(jnp.asarray(ids[None]))[0])
    assert np.abs(ours - before).max() > 1e-3  # fine-tuning changed the model
    hf = _hf_python()
    if hf is None:
        pytest.skip("the transformers side needs transformers (here, or a Python in EFFARCH_HF_PYTHON)")
    done = subprocess.run([hf, str(HF_REFERENCE), "text", str(tmp_path / "exported"), prompt], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout)
    assert theirs["ids"] == ids.tolist()  # transformers' tokenizer reads the exported tokenizer.json as we do
    assert_logits_close(ours, theirs["logits"])
