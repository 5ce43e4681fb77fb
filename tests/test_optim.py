"""Schedules against their formulas, and the optimizer's masks, multipliers and freezing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.train import optim

PARAMS = {
    "embedding": {"kernel": jnp.ones((2, 2, 1, 4)), "bias": jnp.ones(4)},
    "Transformer": {f"encoderblock_{i}": {"MlpBlock_0": {"Dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}}
                    for i in range(3)} | {"encoder_norm": {"scale": jnp.ones(4), "bias": jnp.ones(4)}},
    "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
}


@pytest.mark.parametrize("decay", ["cosine", "mae_cosine", "linear", "rsqrt", "constant"])
def test_schedule_values_follow_the_formulas(decay):
  lr, total, warm, min_lr, ts = 0.1, 1000, 100, 1e-3, 300
  fn = optim.schedule(lr, total, warm, decay, min_lr, ts)
  for step in (0, 1, 50, 99, 100, 101, 250, 500, 999, 1000):
    if step < warm:
      want = lr * step / warm
    else:
      t = (step - warm) / (total - warm)
      want = {"cosine": min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t)),
              "linear": lr + (min_lr - lr) * t, "rsqrt": lr * math.sqrt(ts / max(step, ts)),
              "constant": lr}.get(decay, min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t)))
    assert float(fn(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step


def test_mae_schedule_matches_the_paper_recipe():
  """MAE: lr = base_lr * batch / 256, 40 warmup epochs, half-cycle cosine to min_lr, per step."""
  cfg = dict(name="adamw", lr=1.5e-4, scale_lr_by_batch=True, b2=0.95, weight_decay=0.05,
             schedule=dict(warmup_epochs=40, decay="mae_cosine", min_lr=0.0))
  _, fn = optim.build(cfg, PARAMS, total_steps=800 * 10, steps_per_epoch=10, batch_size=4096)
  peak = 1.5e-4 * 4096 / 256
  assert float(fn(400)) == pytest.approx(peak)
  epoch = 420.0  # halfway through the decay
  assert float(fn(int(epoch * 10))) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (epoch - 40) / 760)))


def test_durations_in_steps_epochs_or_examples():
  kw = dict(steps_per_epoch=12.5, batch_size=64)
  assert optim.to_steps({"total_steps": 7}, "total", **kw) == 7
  assert optim.to_steps({"total_epochs": 2}, "total", **kw) == 25
  assert optim.to_steps({"total_examples": 640}, "total", **kw) == 10
  with pytest.raises(ValueError, match="one of total_steps, total_epochs, total_examples"):
    optim.to_steps({"total_steps": 1, "total_epochs": 1}, "total", **kw)


def one_update(cfg, grads=None, params=PARAMS):
  tx, _ = optim.build(dict(cfg, schedule=dict(decay="constant")), params, total_steps=10, steps_per_epoch=1,
                      batch_size=256)
  grads = grads if grads is not None else jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_weight_decay_is_decoupled_and_masked_to_kernels():
  up = one_update(dict(name="adamw", lr=0.1, weight_decay=0.5))  # zero gradients: only the decay moves
  assert np.allclose(up["head"]["kernel"], -0.1 * 0.5)
  assert np.allclose(up["head"]["bias"], 0) and np.allclose(up["Transformer"]["encoder_norm"]["scale"], 0)
  up = one_update(dict(name="adamw", lr=0.1, weight_decay=0.5, wd_mults=[("^head/", 2.0)]))
  assert np.allclose(up["head"]["bias"], -0.1) and np.allclose(up["embedding"]["kernel"], 0)


def test_layer_decay_lr_multipliers_and_freezing():
  grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
  up = one_update(dict(name="sgd", lr=1.0, layer_decay=0.5, lr_mults=[("^head/bias", 3.0)],
                       frozen=["encoderblock_0/"]), grads)
  # sgd: update = -lr * mult * grad; 3 blocks: embeddings 0.5**4, block i 0.5**(3 - i), head 1.
  assert np.allclose(up["embedding"]["kernel"], -(0.5 ** 4))
  assert np.allclose(up["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"], 0)  # frozen
  assert np.allclose(up["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"], -(0.5 ** 2))
  assert np.allclose(up["Transformer"]["encoderblock_2"]["MlpBlock_0"]["Dense_0"]["kernel"], -0.5)
  assert np.allclose(up["head"]["kernel"], -1.0) and np.allclose(up["head"]["bias"], -3.0)


def test_clipping_and_optimizer_choices():
  grads = jax.tree_util.tree_map(lambda p: 10 * jnp.ones_like(p), PARAMS)
  norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(grads))))
  up = one_update(dict(name="sgd", lr=1.0, clip_norm=1.0), grads)
  assert float(jnp.sqrt(sum(jnp.sum(u ** 2) for u in jax.tree_util.tree_leaves(up)))) == pytest.approx(1.0, rel=1e-5)
  assert norm > 1
  for name in ("adam", "adamw", "lars"):
    up = one_update(dict(name=name, lr=0.1, momentum=0.9), grads)
    assert all(np.all(np.isfinite(u)) for u in jax.tree_util.tree_leaves(up))
  with pytest.raises(ValueError, match="Unknown optimizer 'adagrad'"):
    one_update(dict(name="adagrad", lr=0.1))
  with pytest.raises(ValueError, match="freezes every parameter"):
    one_update(dict(name="sgd", lr=0.1, frozen=[".*"]))
