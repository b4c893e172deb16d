"""The Pallas kernels' symmetric degree-2 feature map (chunk_math.py): same kernel value with 153 features at F = 16."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from effarch.pallas_kernels.based import chunk_math, reference
from tests.helpers.numerics import assert_close


def test_sizes():
    assert chunk_math.n_features(16) == reference.feature_dim_expanded(16) == 153  # 1 + 16 + 136, not 273
    assert chunk_math.padded_features(16) == 256
    assert chunk_math.n_features(8) == 45 and chunk_math.padded_features(8) == 64


@pytest.mark.parametrize("f", [8, 16])
def test_symmetric_map_gives_the_taylor_kernel(f):
    rng = np.random.default_rng(f)
    x, y = (jnp.asarray(rng.standard_normal((13, f)), jnp.float32) for _ in range(2))
    weights = tuple(jnp.asarray(w) for w in chunk_math.feature_weights(f))
    phi_x, phi_y = chunk_math.features(x, *weights)[0], chunk_math.features(y, *weights)[0]
    s = x @ y.T / math.sqrt(f)
    assert_close("phi(x).phi(y)", phi_x @ phi_y.T, reference.taylor_kernel(s), 1e-6)
    # Column for column the reference's map (same pair order and weights), so kernel and decode states agree.
    assert_close("reference map", phi_x[:, : chunk_math.n_features(f)], reference.taylor_feature_map(x), 1e-6)
    # The padding columns past P' are zero for every input, so they add nothing to the state.
    assert not np.any(np.asarray(phi_x[:, chunk_math.n_features(f):]))
    assert np.all(np.any(np.asarray(phi_x[:, : chunk_math.n_features(f)]) != 0, axis=0))
