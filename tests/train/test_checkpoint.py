"""Checkpointer: round trip, keep-last-K, and skipping incomplete or corrupt checkpoints with a warning."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.train.checkpoint import Checkpointer


def trees(scale):
    params = {"w": jnp.full((3, 5), scale, jnp.float32), "b": jnp.arange(7.0) * scale}
    opt = {"mu": jnp.ones((3, 5)) * scale, "count": jnp.asarray(int(scale), jnp.int32)}
    rng = jax.random.key_data(jax.random.key(int(scale)))
    return params, opt, rng


def test_round_trip_and_keep_last(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2, async_save=True)
    for step in (1, 2, 3):
        ckpt.save(step, *trees(step), meta={"step": step, "data_position": step * 8})
    ckpt.wait()
    assert ckpt.steps() == [2, 3]
    params, opt, rng, meta = ckpt.restore_latest(*trees(0))
    want = trees(3)
    for a, b in zip(jax.tree.leaves((params, opt, rng)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta == {"step": 3, "data_position": 24}
    only_params, no_opt, no_rng, _ = ckpt.restore(2, trees(0)[0])  # what generation reads
    np.testing.assert_array_equal(np.asarray(only_params["w"]), np.asarray(trees(2)[0]["w"]))
    assert no_opt is None and no_rng is None
    ckpt.close()


@pytest.mark.parametrize("damage", ["metadata", "params"])
def test_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path, damage):
    ckpt = Checkpointer(tmp_path, max_to_keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, *trees(step), meta={"step": step})
    ckpt.close()
    if damage == "metadata":  # as if the process died before the save was finalised
        (tmp_path / "2" / "_CHECKPOINT_METADATA").unlink()
    else:  # a corrupt item
        shutil.rmtree(tmp_path / "2" / "params")
    ckpt = Checkpointer(tmp_path, max_to_keep=3, async_save=False)
    with pytest.warns(UserWarning, match="checkpoint .*2.* skipping it"):
        params, _, _, meta = ckpt.restore_latest(*trees(0))
    assert meta["step"] == 1
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(trees(1)[0]["w"]))
    ckpt.close()


def test_no_checkpoint_returns_none(tmp_path):
    ckpt = Checkpointer(tmp_path / "empty", async_save=False)
    assert ckpt.restore_latest(*trees(0)) is None
    ckpt.close()
