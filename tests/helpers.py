"""Shared test helpers."""

import jax
import numpy as np


def perturb(tree, rng=0, scale=0.2):
  """Add `scale * N(0, 1)` to every leaf, so no parameter sits at its (often trivial) init value.

  `rng` is a seed or a `numpy.random.Generator` (whose stream is consumed leaf by leaf).
  """
  rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
  return jax.tree_util.tree_map(
      lambda a: np.asarray(a) + scale * rng.standard_normal(np.shape(a)).astype(np.float32), tree)
