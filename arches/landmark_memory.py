"""Landmark-attention LM inference with a block memory (arXiv 2305.16300 §3.3): chunked prompt, top-k retrieval.

Every mixer of the model must be `landmark` (layers/landmark.py): each layer keeps its own block cache and runs
`memory_prefill` on each chunk. Tokens at landmark positions (p % (L + 1) == L) must be the landmark token, as in
training; `memory_generate` inserts them while it decodes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from effarch.arches.lm import DecoderLM
from effarch.layers.landmark import LandmarkAttention


def _check(model: DecoderLM) -> None:
    bad = [b.mixer_name for b in model.blocks if not isinstance(b.mixer, LandmarkAttention)]
    if bad:
        raise ValueError(f"block-memory inference needs landmark mixers in every layer, got {bad}")


def init_memory(model: DecoderLM, batch_size: int, max_blocks: int, max_chunk: int) -> tuple:
    """One empty block memory per layer (see LandmarkAttention.init_memory)."""
    _check(model)
    return tuple(b.mixer.init_memory(batch_size, max_blocks, max_chunk) for b in model.blocks)


def memory_prefill(model: DecoderLM, state: tuple, tokens: Int[Array, "B T"]) -> tuple[tuple, Float[Array, "B T V"]]:
    """Runs a chunk of tokens through every layer with retrieval; returns (state, logits [B, T, vocab])."""
    h = model.embed(tokens)
    new_state = []
    for block, s in zip(model.blocks, state, strict=True):
        s, y = block.mixer.memory_prefill(s, block.norm1(h))
        h = block._channel_mix(h + y)
        new_state.append(s)
    return tuple(new_state), model.logits(h)


def memory_generate(
    model: DecoderLM, prompt: np.ndarray, max_new_tokens: int, *, chunk: int, landmark_token: int,
    max_blocks: int | None = None,
) -> np.ndarray:
    """Greedy tokens [B, max_new_tokens] after `prompt` [B, P] (landmarks already in place), with retrieval.

    The prompt goes through in chunks of `chunk` tokens; then one token per step. A landmark position during
    decoding is fed the landmark token and its prediction is dropped (landmarks are never predicted).
    `max_blocks`: the blocks each layer's cache keeps, the oldest evicted first (the paper's cache size), so
    memory does not grow with the prompt; None keeps every block of the prompt and the generated tokens.
    """
    _check(model)
    B, P = prompt.shape
    L = model.blocks[0].mixer.config.block_len
    if max_blocks is None:
        max_blocks = (P + 2 * max_new_tokens) // (L + 1) + 1
    elif max_blocks < 1:
        raise ValueError(f"memory_generate: max_blocks must be >= 1, got {max_blocks}")
    graphdef, params = nnx.split(model)

    # Donating the state lets XLA update the block cache in place rather than copy it (O(context)) every token.
    @functools.partial(jax.jit, donate_argnums=1)
    def step(params, state, tokens):
        return memory_prefill(nnx.merge(graphdef, params), state, tokens)

    state = init_memory(model, B, max_blocks, chunk)
    for start in range(0, P, chunk):
        state, logits = step(params, state, jnp.asarray(prompt[:, start : start + chunk], jnp.int32))
    pos, out = P, []
    nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    while len(out) < max_new_tokens:
        if pos % (L + 1) == L:
            state, logits = step(params, state, jnp.full((B, 1), landmark_token, jnp.int32))
        else:
            out.append(nxt)
            state, logits = step(params, state, nxt[:, None])
        nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
        pos += 1
    return np.asarray(jnp.stack(out, axis=1))
