"""`vit_jax.checksum`: the sums do not depend on where or how an array is held, and see every change."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from vit_jax import checksum


def test_host_and_device_sums_agree_for_every_sharding():
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(8, 16)).astype(np.float32), "b": rng.normal(size=(3,)).astype(ml_dtypes.bfloat16),
          "c": np.int32(5), "d": np.array([True, False]), "e": np.arange(6, dtype=np.uint8).reshape(2, 3),
          "f": rng.normal(size=(4, 6, 8)).astype(np.float32)}
  host = checksum.tree_checksums(tree)
  # The on-device program (what accelerators run) gives the same words.
  assert host == {k: np.asarray(checksum._array_sums(jnp.asarray(v))).tolist() for k, v in tree.items()}
  mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  put = lambda v, *spec: jax.device_put(v, jax.NamedSharding(mesh, jax.P(*spec)))
  sharded = dict(tree, a=put(tree["a"], "x", "y"), f=put(tree["f"], None, None, "x"), b=put(tree["b"]))
  assert checksum.tree_checksums(sharded) == host


def test_every_single_bit_flip_is_detected():
  a = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
  saved = checksum.tree_checksums({"a": a})
  raw = a.view(np.uint8).reshape(-1)
  for pos in range(raw.size):
    for bit in range(8):
      flipped = raw.copy()
      flipped[pos] ^= 1 << bit
      assert checksum.mismatches(saved, {"a": flipped.view(np.float32).reshape(a.shape)}) == ["a"], (pos, bit)
  swapped = a.copy()
  swapped[0, 0], swapped[2, 4] = a[2, 4], a[0, 0]  # the same values elsewhere: positions count too
  assert checksum.mismatches(saved, {"a": swapped}) == ["a"]
