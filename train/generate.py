"""Sampling from a trained run: restore the newest checkpoint, prefill the prompt, then decode token by token.

Decoding goes through each mixer's init_state / prefill / decode_step (KV caches for attention, constant-size
states for recurrent mixers), so generation costs O(1) or O(T) per token rather than a full forward pass.
"""

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effarch.arches.lm import DecoderLM
from effarch.layers.trained_state import SAVED
from effarch.train.checkpoint import Checkpointer, CheckpointMismatch
from effarch.train.config import Config, ConfigError, load_config
from effarch.train.data.text_stream import bos_id, document_source
from effarch.train.data.tokenizers import text_tokenizer
from effarch.train.lora import build_model
from effarch.train.run_dir import checkpoint_steps


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config (config.yaml) of a training run directory; ConfigError when it has none."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"run dir {str(run_dir)!r} has no config.yaml: is it a training run directory?")
    return load_config([run_dir / "config.yaml"])


def load_run(run_dir: str | Path) -> tuple[Config, DecoderLM]:
    """(resolved config, model with the parameters of the newest complete checkpoint) of a training run directory."""
    cfg, model, _ = restore_run(run_dir)
    return cfg, model


def restore_run(run_dir: str | Path) -> tuple[Config, DecoderLM, int]:
    """(resolved config, model, step of the checkpoint restored) of a training run directory.

    The newest complete checkpoint is restored; one that cannot be read is skipped (with a warning) for the one
    before, and the step returned is the one actually restored. Reading takes no lock and writes nothing, so it
    works while the run is training (train/checkpoint.py: a reader sees committed checkpoints only).
    """

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    # Looked up before a Checkpointer exists, so a run without checkpoints gets one line and nothing is created.
    if not checkpoint_steps(run_dir):
        raise ConfigError(f"run dir {str(run_dir)!r} has no checkpoint (nothing was saved yet: train it first)")
    model = build_model(cfg, nnx.Rngs(0))  # with train.lora's adapters: they are in the checkpoint
    graphdef, params, rest = nnx.split(model, SAVED, ...)  # what the checkpoint holds: parameters, trained buffers
    with Checkpointer(run_dir / "checkpoints", read_only=True) as ckpt:
        steps = ckpt.steps()
        try:
            restored = ckpt.restore_latest(params)  # the params item only
        except CheckpointMismatch as e:
            raise ConfigError(f"run dir {str(run_dir)!r}: its config.yaml does not describe its checkpoints ({e})"
                              ) from None
    if restored is None:
        raise ConfigError(f"run dir {str(run_dir)!r}: no readable checkpoint among steps {steps}")
    return cfg, nnx.merge(graphdef, restored[0], rest), int(restored[3]["step"])


def load_model(run_dir: str | Path) -> DecoderLM:
    """The model of `run_dir` with the parameters of its newest complete checkpoint."""
    return load_run(run_dir)[1]


def available_memory() -> int | None:
    """Bytes the decode state may take: free memory of the first device (GPU/TPU), else available host memory."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not on this platform: no check
        return None


def check_reach(model: DecoderLM, batch: int, prompt_len: int, max_new_tokens: int) -> None:
    """ValueError naming the limit when decoding `max_new_tokens` after a prompt cannot run: positions past int32,
    or a decode state (KV caches grow with the length) larger than the memory there is."""
    total = prompt_len + max_new_tokens
    if total >= 2**31:
        raise ValueError(f"prompt + new tokens = {total:,} positions, more than the 2^31 - 1 a "
                         "position index holds")
    need, have = batch * model.state_size(total), available_memory()
    if have is not None and need > have:
        raise ValueError(f"{max_new_tokens:,} new tokens need {need / 2**30:,.1f} GiB of decode "
                         f"state (KV caches grow with the length), more than the {have / 2**30:,.1f} GiB available")


def generate(
    model: DecoderLM, prompt: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0
) -> np.ndarray:
    """Tokens [B, max_new_tokens] continuing `prompt` [B, P]: greedy when temperature == 0, else sampled.

    ValueError for a temperature that is negative or not finite, and for a length out of reach (`check_reach`)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1], got shape {prompt.shape}")
    batch, plen = prompt.shape
    check_reach(model, batch, plen, max_new_tokens)
    run, state = generate_fn(model, batch, plen, max_new_tokens, temperature=temperature)
    return np.asarray(run(state, prompt, jax.random.key(seed)))


def generate_fn(model: DecoderLM, batch: int, plen: int, max_new_tokens: int, *, temperature: float = 0.0):
    """(run, state): the jitted program `generate` calls, run(state, prompt [batch, plen], key) -> tokens [batch,
    max_new_tokens] (prefill, then a scan of decode steps), and the model's state to pass it. Compiled once per
    shape, so a benchmark (benchmarks/decode_cpu.py) times the calls `generate` makes without the compile."""
    graphdef, state = nnx.split(model)

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    @jax.jit
    def run(state, prompt, key):
        m = nnx.merge(graphdef, state)
        dec_state, logits = m.prefill(m.init_state(batch, plen + max_new_tokens), prompt)
        keys = jax.random.split(key, max_new_tokens)
        first = pick(logits[:, -1], keys[0])

        def body(carry, key):
            dec_state, tok = carry
            dec_state, logits = m.decode_step(dec_state, tok)
            nxt = pick(logits, key)
            return (dec_state, nxt), nxt

        _, rest = jax.lax.scan(body, (dec_state, first), keys[1:])  # [max_new_tokens - 1, B]
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return run, state


def sample_text(run_dir: str | Path, *, prompt_bytes: int = 96, max_new_tokens: int = 96, temperature: float = 0.7,
                seed: int = 0) -> tuple[str, str]:
    """(prompt, sampled continuation) of a `data.task: text` run. The prompt is the start of the first held-out
    document (data.text.eval_split), cut at its last newline within `prompt_bytes`; the continuation stops at the
    document separator. Sampled (not greedy: a small model's greedy output collapses into repeated whitespace), with
    a fixed seed, so a run's sample is reproducible. A run trained with `data.text.bos` gets its BOS token first, as
    every training window had."""
    cfg, model = load_run(run_dir)
    if cfg.data.task != "text":
        raise ConfigError(f"run dir {str(run_dir)!r}: sample_text needs data.task: text, not {cfg.data.task}")
    tokenizer = text_tokenizer(cfg.data.text)
    docs, _ = document_source(cfg.data, cfg.data.text.eval_split)
    head = docs[0][:prompt_bytes]
    prompt = head[: head.rfind(b"\n") + 1] or head
    ids = tokenizer.encode(prompt)
    if cfg.data.text.bos:
        ids = np.concatenate([[bos_id(cfg.data.text, tokenizer)], ids]).astype(np.int32)
    out = generate(model, ids[None], max_new_tokens, temperature=temperature, seed=seed)[0]
    ends = np.flatnonzero(out == tokenizer.sep_id)
    return prompt.decode("utf-8", errors="replace"), tokenizer.decode(out[: ends[0] if len(ends) else len(out)])
