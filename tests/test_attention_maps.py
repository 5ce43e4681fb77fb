"""Attention rollout and per-head maps against a plain numpy reading of Abnar & Zuidema (2020)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.evaluate.attention_maps import attention_rollout, token_maps
from vit_jax.models.vit import VisionTransformer


def random_attention(rng, layers=3, batch=2, heads=4, tokens=5):
  logits = rng.normal(size=(layers, batch, heads, tokens, tokens)) * 2
  w = np.exp(logits)
  return w / w.sum(-1, keepdims=True)


def reference_rollout(weights, fusion=np.mean, discard=0.0, residual=True):
  """One example at a time, one layer at a time, with explicit loops."""
  layers, batch, _, tokens, _ = weights.shape
  out = np.zeros((batch, tokens, tokens))
  for b in range(batch):
    result = np.eye(tokens)
    for l in range(layers):
      a = fusion(weights[l, b], axis=0).copy()
      k = int(tokens * discard)
      for i in range(tokens):
        order = np.argsort(a[i])
        for j in order[:k]:
          if a[i, j] < a[i].max():
            a[i, j] = 0.0
      if residual:
        a = 0.5 * a + 0.5 * np.eye(tokens)
      a = a / a.sum(1, keepdims=True)
      result = a @ result
    out[b] = result
  return out


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.4])
def test_rollout_equals_the_reference(fusion, discard):
  w = random_attention(np.random.default_rng(0))
  got = np.asarray(attention_rollout(w, head_fusion=fusion, discard_ratio=discard))
  want = reference_rollout(w, getattr(np, fusion), discard)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)  # rows stay distributions


def test_rollout_without_residual_is_the_product_of_head_means():
  w = random_attention(np.random.default_rng(1), layers=2)
  m = w.mean(2)
  np.testing.assert_allclose(np.asarray(attention_rollout(w, residual=False)), m[1] @ m[0], rtol=1e-5, atol=1e-6)


def test_rollout_of_identity_attention_is_the_identity():
  w = np.broadcast_to(np.eye(6), (4, 1, 2, 6, 6))
  np.testing.assert_allclose(np.asarray(attention_rollout(w))[0], np.eye(6), atol=1e-6)


def test_token_maps_take_the_class_row_over_the_grid():
  m = np.arange(2 * 7 * 7, dtype=np.float32).reshape(2, 7, 7)  # 1 class token + a 2x3 grid
  maps = token_maps(m, (2, 3))
  assert maps.shape == (2, 2, 3)
  np.testing.assert_array_equal(maps[1], m[1, 0, 1:].reshape(2, 3))
  np.testing.assert_allclose(token_maps(m, (2, 3), query="mean")[0], m[0].mean(0)[1:].reshape(2, 3))
  with pytest.raises(ValueError, match="do not make 1 prefix tokens and a 3x3 grid"):
    token_maps(m, (3, 3))


def test_bad_arguments_are_named():
  w = random_attention(np.random.default_rng(2))
  with pytest.raises(ValueError, match="Unknown head_fusion 'median'"):
    attention_rollout(w, head_fusion="median")
  with pytest.raises(ValueError, match=r"Expected attention weights \[layers, batch, heads, T, T\]"):
    attention_rollout(w[0])


def test_maps_of_a_vit_cover_its_patch_grid():
  model = VisionTransformer(num_classes=3, patch_size=(2, 2), width=16, depth=2, mlp_dim=32, num_heads=2,
                            channels=1)
  images = jax.random.normal(jax.random.key(0), (2, 8, 6, 1))
  variables = model.init(jax.random.key(1), images)
  _, out = model.apply(variables, images, return_attention=True)
  weights = out["attention_weights"]
  assert weights.shape == (2, 2, 2, 13, 13)
  heads = token_maps(weights[-1], (4, 3))
  assert heads.shape == (2, 2, 4, 3)
  np.testing.assert_allclose(heads.sum((-1, -2)) + np.asarray(weights[-1, :, :, 0, 0]), 1.0, atol=1e-5)
  rollout = token_maps(attention_rollout(weights), (4, 3))
  assert rollout.shape == (2, 4, 3) and np.all(rollout >= 0)
