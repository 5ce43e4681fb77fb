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


def random_params(model, *inputs, rng=0, scale=0.2, **kwargs):
  """Parameters of `model` drawn directly from shapes: N(0, scale), plus 1 for LayerNorm scales.

  Much faster than `model.init` (whose initialisers run op by op) and, like
  `perturb`, leaves no parameter at a trivial value.
  """
  rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))["params"]

  def draw(path, s):
    base = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
    return (base + scale * rng.standard_normal(s.shape)).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def one_device_flags(flags: str) -> str:
  """`XLA_FLAGS` without the simulated device count, for a child process that should run as a user's
  machine does (one CPU device)."""
  return " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
