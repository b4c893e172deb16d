"""apply_rope: known answers a reader can check by hand (rotate-half pairs (x_i, x_{i+K/2}))."""

import math

import jax.numpy as jnp
import numpy as np

from effarch.layers.rope import apply_rope, rope_frequencies


def test_frequencies_known_answer():
    # theta^(-2i/K) for K = 4, theta = 10000: [1, 10000^-0.5] = [1, 0.01].
    np.testing.assert_allclose(np.asarray(rope_frequencies(4, 10000.0)), [1.0, 0.01], rtol=1e-6)


def test_rotation_known_answer():
    # K = 4 pairs (x0, x2) at frequency 1 and (x1, x3) at frequency theta^-1/2; theta = (2/pi)^2 makes the second
    # frequency pi/2, so position 1 turns (x1, x3) by 90 degrees and position 2 by 180 degrees.
    theta = (2 / math.pi) ** 2
    x = jnp.broadcast_to(jnp.array([1.0, 2.0, 3.0, 4.0]), (1, 3, 1, 4))
    out = np.asarray(apply_rope(x, jnp.arange(3), theta))[0, :, 0]
    c, s = math.cos(1.0), math.sin(1.0)
    expected = [
        [1.0, 2.0, 3.0, 4.0],  # position 0: identity
        [1 * c - 3 * s, -4.0, 3 * c + 1 * s, 2.0],  # (1, 3) by 1 rad; (2, 4) by 90 degrees -> (-4, 2)
        [math.cos(2) - 3 * math.sin(2), -2.0, 3 * math.cos(2) + math.sin(2), -4.0],  # (2, 4) by 180 -> (-2, -4)
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_batched_positions_match_shared_positions():
    x = jnp.arange(2 * 5 * 3 * 6, dtype=jnp.float32).reshape(2, 5, 3, 6) / 50.0
    shared = apply_rope(x, jnp.arange(5) + 3)
    batched = apply_rope(x, jnp.broadcast_to(jnp.arange(5) + 3, (2, 5)))
    np.testing.assert_allclose(np.asarray(batched), np.asarray(shared), rtol=0, atol=0)
    assert batched.dtype == x.dtype


def test_llama3_frequencies_known_answer():
    # K = 8, theta = 1e4: freqs [1, 0.1, 0.01, 0.001], wavelengths 2*pi/freq = [6.3, 63, 628, 6283]. With
    # original_max_len 1000, low 1, high 4: wavelengths < 250 are kept, > 1000 divided by the factor 8, and 628
    # interpolated with smooth = (1000 / 628.3 - 1) / (4 - 1).
    from effarch.layers.rope import llama3_frequencies

    out = np.asarray(llama3_frequencies(rope_frequencies(8, 1e4), 8.0, 1.0, 4.0, 1000))
    smooth = (1000 / (2 * math.pi / 0.01) - 1) / 3
    expected = [1.0, 0.1, (1 - smooth) * 0.01 / 8 + smooth * 0.01, 0.001 / 8]
    np.testing.assert_allclose(out, expected, rtol=1e-5)
