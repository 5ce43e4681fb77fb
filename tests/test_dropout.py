"""The hashed dropout mask: the keep rate, independence (neighbours, keys), determinism, scaling and
gradients, broadcasting, and the same mask for a sharded array."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models.dropout import Dropout, dropout, keep_mask, random_bits


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_rate(rate):
  n = 1 << 20
  for seed in range(3):
    mask = np.asarray(keep_mask(jax.random.key(seed), 1 - rate, (n,)))
    assert abs(mask.mean() - (1 - rate)) < 4 * math.sqrt(rate * (1 - rate) / n)


def test_bits_are_uniform_and_independent():
  n = 1 << 20
  bits = np.asarray(random_bits(jax.random.key(0), (1024, 1024))).ravel()
  ones = np.unpackbits(bits.view(np.uint8)).reshape(n, 32).mean(0)
  assert np.all(np.abs(ones - 0.5) < 4 * 0.5 / math.sqrt(n))  # every bit fair
  counts = np.bincount(bits >> 24, minlength=256)  # top byte: chi-square, 255 degrees of freedom
  chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
  assert chi2 < 255 + 6 * math.sqrt(2 * 255)
  mask = np.asarray(keep_mask(jax.random.key(1), 0.5, (1024, 1024))).astype(np.float64) - 0.5
  for a, b in [(mask[:, :-1], mask[:, 1:]), (mask[:-1], mask[1:])]:  # along rows and columns
    assert abs((a * b).mean() / 0.25) < 4 / math.sqrt(a.size)
  other = np.asarray(keep_mask(jax.random.key(2), 0.5, (1024, 1024))).astype(np.float64) - 0.5
  assert abs((mask * other).mean() / 0.25) < 4 / math.sqrt(mask.size)  # another key: another mask
  shifted = np.asarray(keep_mask(jax.random.key(2), 0.5, (1024 * 1024 + 7,)))[7:].astype(np.float64) - 0.5
  assert abs((other.ravel() * shifted).mean() / 0.25) < 4 / math.sqrt(mask.size)  # no index shift repeats


def test_values_scaling_and_gradient():
  x = jnp.full((512, 512), 2.0)
  key = jax.random.key(3)
  y = dropout(x, 0.25, key)
  np.testing.assert_array_equal(y, dropout(x, 0.25, key))  # a pure function of the key
  assert set(np.unique(np.asarray(y)).tolist()) == {0.0, float(np.float32(2.0) / np.float32(0.75))}
  assert abs(float(y.mean()) - 2.0) < 4 * 2.0 * math.sqrt(0.25 / 0.75 / x.size)
  grad = jax.grad(lambda a: dropout(a, 0.25, key).sum())(x)
  np.testing.assert_array_equal(grad, (y != 0) / 0.75)
  assert dropout(x, 0.0, key) is x and float(dropout(x, 1.0, key).max()) == 0.0


def test_module_matches_flax_interface():
  x = jnp.ones((4, 6, 8))
  m = Dropout(0.5, broadcast_dims=(1,))
  assert m.apply({}, x, deterministic=True) is x
  y = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(y != 0)
  assert (kept == kept[:, :1]).all() and 0 < kept.mean() < 1  # one mask shared along axis 1
  with pytest.raises(flax.errors.InvalidRngError):
    m.apply({}, x, deterministic=False)


def test_sharded_array_gets_the_same_mask():
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
  x = jnp.ones((64, 24))
  key = jax.random.key(5)
  sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
  out = jax.jit(lambda a: dropout(a, 0.3, key))(sharded)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(dropout(x, 0.3, key)))
