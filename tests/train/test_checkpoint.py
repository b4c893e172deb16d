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


def test_intact_checkpoint_of_other_trees_is_a_mismatch_not_corruption(tmp_path):
    from effarch.train.checkpoint import CheckpointMismatch

    ckpt = Checkpointer(tmp_path, max_to_keep=3, async_save=False, quarantine=True)
    for step in (1, 2):
        ckpt.save(step, *trees(step), meta={"step": step})
    params, opt, rng = trees(0)
    other_params = {**params, "w": jnp.zeros((4, 5))}  # another model: a reshaped parameter
    with pytest.raises(CheckpointMismatch, match=r"w \(3, 5\) saved vs \(4, 5\) now"):
        ckpt.restore_latest(other_params, opt, rng)
    other_opt = {"mu": opt["mu"], "count": opt["count"], "nu": opt["mu"]}  # another optimizer chain
    with pytest.raises(CheckpointMismatch, match="another optimizer state.*nu missing from the checkpoint"):
        ckpt.restore_latest(params, other_opt, rng)
    assert ckpt.steps() == [1, 2] and not (tmp_path.parent / "checkpoints_unreadable").exists()  # nothing moved
    assert ckpt.restore_latest(params, opt, rng)[3]["step"] == 2
    ckpt.close()


def test_quarantine_moves_a_damaged_checkpoint_so_its_step_can_be_saved_again(tmp_path):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, max_to_keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, *trees(step), meta={"step": step})
    ckpt.close()
    shutil.rmtree(directory / "2" / "params")
    ckpt = Checkpointer(directory, max_to_keep=3, async_save=False, quarantine=True)
    with pytest.warns(UserWarning, match="checkpoint .*2.* skipping it \\(moved to"):
        assert ckpt.restore_latest(*trees(0))[3]["step"] == 1
    moved = list((tmp_path / "checkpoints_unreadable").iterdir())
    assert [p.name.split("-")[0] for p in moved] == ["2"] and (moved[0] / "opt_state").is_dir()  # kept, not deleted
    ckpt.save(2, *trees(5), meta={"step": 2})  # the restarted run writes step 2 again
    ckpt.wait()
    params, _, _, meta = ckpt.restore_latest(*trees(0))
    assert meta == {"step": 2}
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(trees(5)[0]["w"]))
    ckpt.close()
