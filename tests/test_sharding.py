"""Meshes and parameter sharding on 8 simulated CPU devices, and the same training on every mesh."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.test_train import tiny
from vit_jax.models.vit import VisionTransformer
from vit_jax.train import sharding, trainer


def test_mesh_fills_the_free_axis_and_rejects_bad_shapes():
  assert jax.device_count() == 8
  assert dict(sharding.make_mesh([("data", -1)]).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(sharding.make_mesh([("data", 2), ("tensor", -1)]).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  with pytest.raises(ValueError, match="cannot be split"):
    sharding.make_mesh([("data", 3), ("fsdp", -1)])
  with pytest.raises(ValueError, match="Unknown mesh axes"):
    sharding.make_mesh([("model", -1)])
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh([("data", 4), ("fsdp", 4)])


def shapes():
  model = VisionTransformer(num_classes=10, patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=256)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))["params"]


def test_rules_shard_fsdp_and_tensor_axes():
  params = shapes()
  blk = lambda sh: sh["Transformer"]["encoderblock_0"]
  fsdp = sharding.param_shardings(params, sharding.make_mesh([("fsdp", -1)]), fsdp_min_size=0)
  assert blk(fsdp)["MlpBlock_0"]["Dense_0"]["kernel"].spec == P(None, "fsdp")  # [64, 256]: the larger dim
  assert blk(fsdp)["MultiHeadDotProductAttention_0"]["query"]["kernel"].spec == P("fsdp")
  assert fsdp["head"]["bias"].spec == P()  # 10 is not divisible by 8
  tp = sharding.param_shardings(params, sharding.make_mesh([("data", 2), ("tensor", 4)]))
  assert blk(tp)["MlpBlock_0"]["Dense_0"]["kernel"].spec == P(None, "tensor")
  assert blk(tp)["MlpBlock_0"]["Dense_1"]["kernel"].spec == P("tensor")
  assert blk(tp)["MultiHeadDotProductAttention_0"]["key"]["kernel"].spec == P(None, "tensor")
  assert blk(tp)["MultiHeadDotProductAttention_0"]["out"]["kernel"].spec == P("tensor")
  assert tp["embedding"]["kernel"].spec == P()  # fsdp axis has size 1: nothing else is split
  big = sharding.param_shardings(params, sharding.make_mesh([("fsdp", -1)]))  # default minimum size
  assert blk(big)["MlpBlock_0"]["Dense_0"]["kernel"].spec == P(None, "fsdp") and big["cls"].spec == P()
  with pytest.raises(ValueError, match="Unknown sharding tactic"):
    sharding.param_spec((8, 8), "shard_all", sharding.make_mesh([("fsdp", -1)]))


def test_parameters_and_optimizer_state_are_born_sharded():
  import optax
  params = shapes()
  mesh = sharding.make_mesh([("fsdp", -1)])
  p_sh = sharding.param_shardings(params, mesh, fsdp_min_size=0)
  tx = optax.adamw(1e-3)
  model = VisionTransformer(num_classes=10, patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=256)

  def init(rng):
    p = model.init(rng, jnp.zeros((1, 16, 16, 3)))["params"]
    return {"params": p, "opt": tx.init(p)}
  state_shape = jax.eval_shape(init, jax.random.key(0))
  st_sh = sharding.tree_shardings(state_shape, params, p_sh, mesh)
  state = jax.jit(init, out_shardings=st_sh)(jax.random.key(0))
  kernel = state["params"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp") and kernel.addressable_shards[0].data.shape == (64, 32)
  mu = state["opt"][0].mu["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert mu.sharding.spec == P(None, "fsdp")
  assert state["opt"][0].count.sharding.spec == P()


MESHES = {"one_device": dict(num_devices=1), "data_parallel": dict(mesh=(("data", -1),)),
          "fsdp": dict(mesh=(("fsdp", -1),), fsdp_min_size=0),
          "data_x_tensor": dict(mesh=(("data", 2), ("tensor", 4)))}


@pytest.mark.slow
def test_every_mesh_trains_like_one_device(tmp_path):
  """One test for all meshes (a shared module fixture would be rebuilt on each xdist worker)."""
  data_dir = str(tmp_path / "tfds")
  losses = {}
  for name, kw in MESHES.items():
    config = tiny(data_dir, **{"total_steps": 5, "log_steps": 1, "checkpoint_steps": 5, "eval_steps": 5,
                               "model.num_heads": 4, "num_devices": None, **kw})
    trainer.train_and_evaluate(config, str(tmp_path / name))
    with open(tmp_path / name / "metrics.jsonl") as f:
      losses[name] = [e["train/loss"] for e in map(json.loads, f) if "train/loss" in e]
  ref = np.array(losses["one_device"])
  assert len(ref) == 5 and ref[-1] != ref[0]
  for name in ("data_parallel", "fsdp", "data_x_tensor"):
    np.testing.assert_allclose(losses[name], ref, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  """accumulate=2: two half-batches, one update; the same training as the whole batch at once."""
  runs = {}
  for acc in (1, 2):
    config = tiny(str(tmp_path / "tfds"), **{"total_steps": 4, "log_steps": 1, "checkpoint_steps": 4,
                                             "eval_steps": 4, "accumulate": acc, "model.stem": "patch",
                                             "model.drop_path_rate": 0.0})
    trainer.train_and_evaluate(config, str(tmp_path / f"acc{acc}"))
    with open(tmp_path / f"acc{acc}" / "metrics.jsonl") as f:
      runs[acc] = [e["train/loss"] for e in map(json.loads, f) if "train/loss" in e]
  np.testing.assert_allclose(runs[2], runs[1], rtol=1e-5)
  assert runs[1][0] != runs[1][-1]
