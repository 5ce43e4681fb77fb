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

import functools
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


@functools.lru_cache(maxsize=None)
def _summer(out_sharding) -> Any:
  """The jitted per-array sums (one compilation per shape, dtype and sharding, shared by every leaf)."""
  return jax.jit(_array_sums, out_shardings=out_sharding)


def _host_bits(x: np.ndarray) -> np.ndarray:
  """numpy's `_bits`: the same words in the same order."""
  if x.dtype == np.bool_:
    return x.astype(np.uint32)
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]).astype(np.uint32) \
      if x.dtype.itemsize != 8 else x.reshape(*x.shape, 1).view(np.uint32)


def _host_sums(block: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
  """[2] uint32 sums of `block`, the part of an array of `shape` that begins at `start` (same terms as
  `_array_sums`, so the parts of an array add up to its sums)."""
  u = _host_bits(np.asarray(block))
  if u.ndim > len(shape):  # 64-bit values: a trailing axis of two words
    shape, start = (*shape, 2), (*start, 0)
  index = np.zeros(u.shape, np.uint32)
  stride = 1
  for axis in reversed(range(u.ndim)):
    coord = (np.arange(u.shape[axis], dtype=np.uint64) + start[axis]).astype(np.uint32)
    index += (coord * np.uint32(stride % 2 ** 32)).reshape([-1 if a == axis else 1 for a in range(u.ndim)])
    stride *= shape[axis]
  with np.errstate(over="ignore"):
    return np.array([np.sum(u * ((index * np.uint32(m) + np.uint32(o)) | np.uint32(1)), dtype=np.uint32)
                     for m, o in zip(_MULTIPLIERS, _OFFSETS)], np.uint32)


def _on_host(x) -> bool:
  """Whether `x` is in host memory already: numpy, or a jax array on CPU devices."""
  return not isinstance(x, jax.Array) or all(d.platform == "cpu" for d in x.sharding.device_set)


def _partial_sums(x) -> np.ndarray:
  """This process's share of `x`'s sums: its shards that are the first copy of their region."""
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
    return _host_sums(x, (0,) * x.ndim, x.shape)
  total = np.zeros(2, np.uint32)
  for shard in x.addressable_shards:
    if shard.replica_id == 0:
      start = tuple(i.start or 0 for i in shard.index)
      with np.errstate(over="ignore"):
        total += _host_sums(np.asarray(shard.data), start, x.shape)
  return total


def tree_checksums(tree: Any) -> dict[str, list[int]]:
  """`{path: [sum0, sum1]}` for every array leaf of `tree` (jax arrays of any sharding, or numpy).

  Every process gets the same result.  Arrays in host memory (numpy, CPU devices) are summed
  there, shard by shard, and the processes add their parts; arrays on accelerators are summed on
  their devices by a small program per distinct shape (compiled once, dispatched per array).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not flat:
    return {}
  sums = np.zeros((len(flat), 2), np.uint32)
  host = [i for i, (_, x) in enumerate(flat) if _on_host(x)]
  for i, (_, x) in enumerate(flat):
    if not _on_host(x):
      sharding = x.sharding
      out = jax.NamedSharding(sharding.mesh, jax.P()) if isinstance(sharding, jax.NamedSharding) else None
      sums[i] = np.asarray(jax.device_get(_summer(out)(x)))  # replicated: readable on every process
  if host:
    parts = np.stack([_partial_sums(flat[i][1]) for i in host])
    distributed = any(isinstance(flat[i][1], jax.Array) and not flat[i][1].is_fully_addressable for i in host)
    if distributed:  # every process holds part of some array: add the parts of all processes
      from jax.experimental import multihost_utils
      with np.errstate(over="ignore"):
        parts = np.asarray(multihost_utils.process_allgather(parts)).astype(np.uint32).sum(0, dtype=np.uint32)
    sums[host] = parts
  return {path_name(p): [int(a), int(b)] for (p, _), (a, b) in zip(flat, sums)}


def mismatches(saved: Mapping[str, Any], tree: Any) -> list[str]:
  """Paths of `tree` whose checksum differs from `saved` (paths missing from `saved` are not checked)."""
  now = tree_checksums(tree)
  return [k for k, v in now.items() if k in saved and list(saved[k]) != v]
