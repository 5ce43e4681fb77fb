"""Checksums of array trees, computed where the arrays live.

Each array gets two 32-bit sums over its bits, every element weighted by an odd
number derived from its position:

    sum_i bits(x_i) * w(i)  (mod 2**32),   w(i) odd

Changing one element changes `bits(x_i)` by some d != 0 (mod 2**32), and an odd
weight is invertible mod 2**32, so the sum changes: one damaged element (a flipped
byte, a zeroed block inside one value) is always detected; larger damage goes
unnoticed with probability about 2**-64.  Addition mod 2**32 does not depend on
the order of the terms, so the value does not depend on how the array is sharded:
under `jax.jit` each device sums its own shard and one all-reduce of a scalar per
array combines them.  The cost is a few elementwise operations per parameter, a
small fraction of one optimizer update, on the devices that already hold the data.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77)  # odd constants spread the position bits over the word
_OFFSETS = (0x0, 0x27D4EB2F)


def path_name(path) -> str:
  """A tree path as `a/b/0/c` (dict keys, sequence indices and attribute names alike)."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _bits(x: jax.Array) -> jax.Array:
  """The array's bit patterns as uint32 (64-bit values give two words each, in a trailing axis)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_sums(x: jax.Array) -> jax.Array:
  """[2] uint32: the two position-weighted sums of one array's bits."""
  u = _bits(jnp.asarray(x))
  index = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(u.ndim)):  # row-major element index, built elementwise (no reshape of a sharded array)
    index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride % 2 ** 32)
    stride *= u.shape[axis]
  sums = [jnp.sum(u * ((index * jnp.uint32(m) + jnp.uint32(o)) | jnp.uint32(1)), dtype=jnp.uint32)
          for m, o in zip(_MULTIPLIERS, _OFFSETS)]
  return jnp.stack(sums)


def _tree_sums(leaves: list[Any]) -> jax.Array:
  return jnp.stack([_array_sums(x) for x in leaves])


def tree_checksums(tree: Any) -> dict[str, list[int]]:
  """`{path: [sum0, sum1]}` for every array leaf of `tree` (jax arrays of any sharding, or numpy).

  Arrays sharded over a mesh (on any number of processes) are summed in place; every process gets
  the same result.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not flat:
    return {}
  leaves = [x for _, x in flat]
  mesh = next((x.sharding.mesh for x in leaves if isinstance(getattr(x, "sharding", None), jax.NamedSharding)), None)
  out = jax.NamedSharding(mesh, jax.P()) if mesh is not None else None  # replicated: readable on every process
  sums = np.asarray(jax.device_get(jax.jit(_tree_sums, out_shardings=out)(leaves)))
  return {path_name(p): [int(a), int(b)] for (p, _), (a, b) in zip(flat, sums)}


def mismatches(saved: Mapping[str, Any], tree: Any) -> list[str]:
  """Paths of `tree` whose checksum differs from `saved` (paths missing from `saved` are not checked)."""
  now = tree_checksums(tree)
  return [k for k, v in now.items() if k in saved and list(saved[k]) != v]
