"""A text-task run SIGKILLed mid-epoch and resumed sees the batches, and logs the losses, of the uninterrupted run.

Batch identity itself (a fresh stream, any access order) is tested by default in test_text_data.py; the end-to-end
runs here take three `effarch train` processes, so they are in the slow suite.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train.test_train import losses

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "lm" / "quickstart.yaml"
TINY = ROOT / "configs" / "overlays" / "tiny.yaml"
# 8 documents of 300-900 bytes: ~150 windows of 32, 19 steps per epoch at batch 8, so 60 steps cross 3 epochs.
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(8):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=60 + 20 * i)) + "\n")
    return root


def run(run_dir, corpus, *extra, wait=True):
    cmd = [sys.executable, "-m", "effarch.train", str(CONFIG), str(TINY), f"train.run_dir={run_dir}",
           f"data.text.source={corpus}", "data.seq_len=32", "data.text.val_fraction=0.2", "model.vocab_size=257",
           "model.n_layers=2", "model.mixers=[base_conv, sliding_window]", "model.sliding_window.window=8",
           "train.steps=60", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=10",
           "train.sample_tokens=0", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(corpus, tmp_path):
    ref = run(tmp_path / "ref", corpus)
    assert ref.returncode == 0, ref.stderr
    reference = losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, 61))

    run_dir = tmp_path / "killed"
    proc = run(run_dir, corpus, wait=False)
    t0 = time.time()
    while not (run_dir / "metrics.jsonl").exists() or len(losses(run_dir)) < 25:  # past the step-20 checkpoint
        assert proc.poll() is None and time.time() - t0 < 240, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(losses(run_dir))
    assert 25 <= killed_at < 60 and killed_at % 19, "the kill must land mid-run and mid-epoch"
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    meta = json.loads((run_dir / "checkpoints" / str(saved[-1]) / "meta" / "metadata").read_text())
    epoch, window = divmod(saved[-1] * 8, meta["data"]["windows_per_epoch"])
    assert (meta["data"]["epoch"], meta["data"]["window"]) == (epoch, window)  # the data position = the step

    resumed = run(run_dir, corpus)
    assert resumed.returncode == 0, resumed.stderr
    after = losses(run_dir)
    assert sorted(after) == sorted(reference)
    np.testing.assert_allclose([after[s] for s in range(1, 61)], [reference[s] for s in range(1, 61)], rtol=1e-6)

    # Generation reads and writes the run's tokenizer: a prompt of text, a continuation of text.
    from effarch.train.generate import sample_text

    prompt, continuation = sample_text(run_dir, max_new_tokens=8)
    docs = [p.read_text() for p in corpus.iterdir()]  # one line each, longer than the 96-byte prompt
    assert len(prompt) == 96 and any(doc.startswith(prompt) for doc in docs)
    assert isinstance(continuation, str) and "\x00" not in continuation  # the separator decodes to nothing
    gen = subprocess.run([sys.executable, "-c", "from effarch.train.main import main; main()", "generate",
                          str(run_dir), "--text", "alpha", "--max-new-tokens", "4"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert gen.returncode == 0, gen.stderr

    # Another corpus under the same config would give other batches: resuming is refused, naming the key.
    (corpus / "doc0.txt").write_text("changed\n")
    out = run(run_dir, corpus, "train.steps=70")
    assert out.returncode == 2 and "data.text.source: the checkpoint at step 60 was trained on" in out.stderr
