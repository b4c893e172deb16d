"""Known-answer tests of the TNL decay schedule (OpenNLPLab `_build_slope_tensor` convention)."""

import numpy as np
import pytest

from effarch.pallas_kernels.lightning import alibi_slopes, tnl_decay


def test_power_of_2_slopes():
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-i for i in range(1, 9)], rtol=1e-7)
    np.testing.assert_allclose(alibi_slopes(2), [2.0**-4, 2.0**-8], rtol=1e-7)


@pytest.mark.parametrize(
    "n_heads, exponents",
    [
        # P = 2 slopes, then every other slope of 4 heads: 2^-2 (2^-4 is already there).
        (3, [4, 8, 2]),
        # P = 4 slopes 2^-2..2^-8, then the odd slopes of 8 heads: 2^-1, 2^-3.
        (6, [2, 4, 6, 8, 1, 3]),
        # P = 8, then 2^-0.5, 2^-1.5, ... of 16 heads.
        (12, [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]),
    ],
)
def test_non_power_of_2_slopes_follow_alibi(n_heads, exponents):
    np.testing.assert_allclose(alibi_slopes(n_heads), [2.0**-e for e in exponents], rtol=1e-6)


def test_layer_factor():
    slopes = np.asarray(alibi_slopes(4))
    np.testing.assert_allclose(tnl_decay(4, 0, 5), slopes * (1 + 1e-5), rtol=1e-7)
    np.testing.assert_allclose(tnl_decay(4, 2, 5), slopes * (0.5 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(tnl_decay(4, 4, 5), slopes * 1e-5, rtol=1e-6)
    # L = 1: the first-layer factor, not 0/0.
    np.testing.assert_allclose(tnl_decay(4, 0, 1), slopes * (1 + 1e-5), rtol=1e-7)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="n_heads"):
        alibi_slopes(0)
    with pytest.raises(ValueError, match="layer_idx"):
        tnl_decay(4, 3, 3)
