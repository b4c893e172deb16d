"""Every shipped config loads, builds its model and trains one step under the tiny overlay."""

from pathlib import Path

import jax
import numpy as np
import pytest

from effarch.train.checks import check_config
from effarch.train.config import load_config
from effarch.train.data import build_data
from effarch.train.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
# sweeps/ holds sweep files (effarch sweep; tests/train/test_evals.py loads them), not run configs.
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "overlays" not in p.parts and "sweeps" not in p.parts)
TINY = ROOT / "configs" / "overlays" / "tiny.yaml"


def test_there_are_configs():
    assert len(CONFIGS) >= 2


# Configs whose mixer and task another config already trains in the default run (each mixer's gradients under jit
# are also in tests/conformance/); every config still builds and checks (test_config_checks) by default, and trains
# one step in the slow suite.
SLOW_STEP = {"lm/titans_mac_small.yaml", "niah/titans_mac.yaml", "niah/titans_mac_ft.yaml", "lm/moh_small.yaml",
             "lm/diffqkv_small.yaml", "lm/tnl_small.yaml", "mqar/titans_lmm.yaml", "lm/based_small.yaml",
             "mqar/diffqkv.yaml", "mqar/moh.yaml", "mqar/lightning.yaml",
             "lm/landmark_small.yaml",  # passkey/landmark trains the mixer, quickstart the text task
             "lm/sink_window_small.yaml",  # lm/sparse_attention_small trains the mixer, quickstart the text task
             # the same with data.text.bos, whose windows tests/train/test_text_data.py and test_evals.py check
             "lm/sink_window_bos.yaml",
             "mqar/attention.yaml",  # mqar/zoology_attention trains attention on MQAR
             "niah/attention.yaml",  # niah/sliding_window trains the task, mqar/zoology_attention attention
             # BaseConv + attention / sparse_attention (s2) on MQAR (256, 16): zoology_attention and
             # lm/sparse_attention_small train those mixers
             "mqar/attention_256.yaml", "mqar/s2_hybrid.yaml", "mqar/s2.yaml",
             "passkey/attention_moa.yaml",  # passkey/landmark trains the task, mqar/zoology_attention attention
             # LongLoRA's fine-tunes: lm/attention_512 trains attention on text, lm/sparse_attention_small the mixer,
             # tests/train/test_lora.py the adapters
             "lm/longlora_finetune.yaml", "lm/longlora_s2.yaml",
             # seer's distillation overlay: tests/layers/test_sparse_seer.py trains the gate on its loss,
             # lm/sparse_attention_small the mixer
             "lm/seer_distill.yaml", "passkey/seer_distill.yaml",
             # routing from scratch on MQAR: tests/train/test_trained_buffers.py trains the mixer and its centroids
             "mqar/routing.yaml",
             # bidirectional MQAR: mqar_bidir/biformer trains the task (and the biformer pattern); the dense ceiling and
             # the equal-cost window train the same task, attention and sparse_attention; the other three are biformer
             # without its LCE, with window routing and with every region
             "mqar_bidir/attention.yaml", "mqar_bidir/bidir_window.yaml", "mqar_bidir/biformer_nolce.yaml",
             "mqar_bidir/biformer_window.yaml", "mqar_bidir/biformer_dense.yaml",
             # mqar_bidir/biformer too: tests/layers/test_sparse_biformer.py trains the pattern, test_mqar_bidir.py
             # the task; DuoAttention's gate overlay: tests/train/test_duo_train.py trains the objective
             "mqar_bidir/biformer.yaml", "passkey/duo_gates.yaml",
             # MQAR's Titans MAC (conformance trains MAC's gradients) and NIAH's sliding window (quickstart's)
             "mqar/titans_mac.yaml", "niah/sliding_window.yaml"}


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT / "configs"))


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_config_checks(path):
    check_config(load_config([path]), jax.devices()[:1])  # the model built abstractly (eval_shape) at full size


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if _id(p) in SLOW_STEP else p
                                  for p in CONFIGS], ids=_id)
def test_config_trains_one_step(path, tmp_path):
    overrides = [f"train.run_dir={tmp_path}"]
    base = load_config([path])
    if base.data.task == "bytes":
        # A landmark config needs one more id than the 256 bytes, for its landmark token.
        vocab = base.data.landmark.token + 1 if base.data.landmark.block_len else 256
        overrides += ["data.seq_len=32", "data.text.max_bytes=20000", f"model.vocab_size={vocab}"]
    if base.data.task == "text":  # the tiny overlay's vocab_size 256 has no id for the byte tokenizer's separator
        overrides += ["data.seq_len=32", "data.text.max_bytes=20000", "data.text.max_eval_bytes=4000",
                      f"model.vocab_size={base.model.vocab_size}"]
        # One layer of each of its mixer kinds: the step proves the text pipeline end to end (every mixer kind and
        # the full-size model are covered by lm/based_small.yaml and test_config_checks).
        kinds = list(dict.fromkeys(base.model.mixers))
        overrides += [f"model.mixers=[{', '.join(kinds)}]", f"model.n_layers={len(kinds)}"]
    if base.data.task == "passkey":
        overrides += ["data.seq_len=64", "data.passkey.examples=64"]
    if base.data.task == "niah":
        overrides += ["data.seq_len=64", "data.niah.examples=64"]
    if base.data.task == "mqar_bidir":
        overrides += ["data.seq_len=32", "data.mqar_bidir.examples=64", "data.mqar_bidir.test_examples=32"]
    if "titans_mac" in base.model.mixers:
        # MAC's step compiles nested scans per layer: one pass over the mixer list proves the config (4 layers took
        # 44 s on 2 cores).
        overrides += [f"model.n_layers={len(base.model.mixers)}"]
    cfg = load_config([path, TINY], overrides)
    trainer = Trainer(cfg)
    stream, evals = build_data(cfg.data, cfg.model.vocab_size, cfg.train.batch_size)
    params, opt_state, _ = trainer.init_state(0)
    params, opt_state, m = trainer.train_step(params, opt_state, *trainer.global_batch(*stream.batch(0)))
    assert np.isfinite(float(m["loss"]))
    bpb = {"bits_per_byte"} if evals[0].bytes_per_label else set()  # text task
    assert set(trainer.evaluate(params, evals[0])) == {"accuracy", "loss", "perplexity", *bpb}
    jax.clear_caches()
