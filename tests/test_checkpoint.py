"""Native orbax checkpoints: exact round trip, step discovery, incomplete and damaged directories."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vit_jax import checkpoint
from vit_jax.interop import CheckpointError
from vit_jax.interop.tree import flatten

PARAMS = {"embedding": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 2, 3, 2) / 7,
                        "bias": np.float32([0.1, -0.2])},
          "head": {"kernel": np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)}}
MODEL = dict(width=2, patch_size=(2, 4), param_dtype=jnp.bfloat16, activation="gelu")


def assert_same(a, b):
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb)
  assert all(np.array_equal(fa[k], fb[k]) and fa[k].dtype == fb[k].dtype for k in fa)


def test_round_trip_is_exact_and_keeps_the_config(tmp_path):
  step_dir = checkpoint.save(tmp_path / "ckpt", PARAMS, config={"model": MODEL, "image_size": [4, 8]}, step=3)
  assert step_dir == str(tmp_path / "ckpt" / "3")
  params, config = checkpoint.load(tmp_path / "ckpt")
  assert_same(params, PARAMS)
  assert config["model"]["patch_size"] == (2, 4) and config["model"]["param_dtype"] == jnp.bfloat16
  assert config["image_size"] == [4, 8]


def test_newest_complete_step_is_found(tmp_path):
  root = tmp_path / "work" / checkpoint.CHECKPOINTS_SUBDIR
  for step in (1, 5):
    checkpoint.save(root, jax_tree_scaled(step), config={"model": MODEL}, step=step)
  # What a kill during a save leaves behind: orbax's temporary directory, never renamed to a step.
  os.makedirs(root / "9.orbax-checkpoint-tmp-1234" / "params")
  assert checkpoint.find_step_dir(tmp_path / "work") == str(root / "5")
  params, _ = checkpoint.load(tmp_path / "work")
  assert_same(params, jax_tree_scaled(5))
  assert checkpoint.find_step_dir(root / "1") == str(root / "1")


def jax_tree_scaled(step):
  return {k: {n: v * step for n, v in d.items()} for k, d in PARAMS.items()}


def test_train_state_item_is_read_through_its_params(tmp_path):
  """A trainer may save its whole state (params, optimizer state, step) as one item."""
  state = {"params": PARAMS, "opt_state": {"mu": np.ones(3, np.float32)}, "step": np.int32(7)}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         config=ocp.args.JsonSave({"model": checkpoint.settings_to_json(MODEL)})))
    mngr.wait_until_finished()
  params, config = checkpoint.load(tmp_path / "ckpt")
  assert_same(params, PARAMS)
  assert config["model"]["width"] == 2


def test_damaged_and_missing_checkpoints_fail_clearly(tmp_path):
  with pytest.raises(CheckpointError, match="No checkpoint directory"):
    checkpoint.load(tmp_path / "nothing")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    checkpoint.load(tmp_path / "empty")
  step_dir = checkpoint.save(tmp_path / "ckpt", PARAMS, config={"model": MODEL})
  for name in os.listdir(os.path.join(step_dir, "params")):
    path = os.path.join(step_dir, "params", name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  with pytest.raises(CheckpointError, match="incomplete or corrupt"):
    checkpoint.load(step_dir)
