"""Device mesh, parameter sharding by rules over names, and batch placement.

The mesh has up to three axes, named for what they split (big_vision / MaxText
naming), slowest network first:

  data    the batch (pure data parallelism; replicas of every parameter)
  fsdp    the batch *and* the parameters (each device holds a slice; gathered per layer)
  tensor  the width of MLP and attention layers (Megatron-style)

config.mesh = [("data", -1)]                     -> data parallel over all devices (default)
config.mesh = [("fsdp", -1)]                     -> FSDP
config.mesh = [("data", 2), ("tensor", 4)]       -> 2-way data x 4-way tensor parallel

Parameters are sharded by `config.sharding_rules`: (regex over the `/`-joined
name, tactic) pairs, first match wins, tactics chained with "|":

  "replicate"          keep whole on every device
  "fsdp"               split the largest dimension divisible by the fsdp axis size
                       (tensors under `fsdp_min_size` elements stay replicated)
  "tensor(dim)"        split dimension `dim` (negative counts from the end) over `tensor`

The default rules shard MLP and attention kernels over `tensor` (column-parallel
in, row-parallel out) and then everything large over `fsdp`.  Axes of size 1
shard nothing, so the same rules serve every mesh.  The batch is split over
("data", "fsdp").  Activations carry logical names ("act_batch", "act_len",
"act_emb") that `ACTIVATION_RULES` maps to mesh axes.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vit_jax.interop.tree import flatten, unflatten

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
ACTIVATION_RULES = (("act_batch", BATCH_AXES), ("act_len", None), ("act_emb", None))
DEFAULT_RULES = (
    (r"MlpBlock_0/Dense_(0|gate)/kernel$", "tensor(-1)|fsdp"),       # [D, M]: split M
    (r"MlpBlock_0/Dense_1/kernel$", "tensor(-2)|fsdp"),              # [M, D]: split M
    (r"MultiHeadDotProductAttention_0/(query|key|value)/kernel$", "tensor(-2)|fsdp"),  # [D, H, dh]: split H
    (r"MultiHeadDotProductAttention_0/out/kernel$", "tensor(-3)|fsdp"),  # [H, dh, D]: split H
    (r".*", "fsdp"),
)


def make_mesh(spec: Sequence[Sequence[Any]] = (("data", -1),), devices=None) -> jax.sharding.Mesh:
  """A mesh over all devices (or `devices`) from [(axis, size)]; one size may be -1 (the rest).

  Every axis in AXES exists in the mesh (size 1 unless given), so rules and
  batch specs can name them all.  Axes are Auto (compiler-propagated) shardings.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not all(isinstance(a, (tuple, list)) and len(a) == 2 for a in spec):
    raise ValueError(f"config.mesh must be (axis, size) pairs such as (('data', -1),), got {spec!r}.")
  sizes = dict((str(name), int(size)) for name, size in spec)
  unknown = set(sizes) - set(AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}: use {AXES}.")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"Only one mesh axis may be -1, got {free}.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(f"{len(devices)} devices cannot be split into {sizes} (the fixed axes need a multiple of "
                       f"{fixed}).")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"Mesh {sizes} needs {math.prod(sizes.values())} devices, but there are {len(devices)}.")
  shape = tuple(sizes.get(a, 1) for a in AXES)
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _parse_tactics(tactics: str) -> list[tuple[str, int | None]]:
  out = []
  for t in tactics.split("|"):
    t = t.strip()
    m = re.fullmatch(r"tensor\((-?\d+)\)", t)
    if m:
      out.append(("tensor", int(m.group(1))))
    elif t in ("fsdp", "replicate"):
      out.append((t, None))
    else:
      raise ValueError(f"Unknown sharding tactic {t!r}: use 'replicate', 'fsdp' or 'tensor(dim)'.")
  return out


def param_spec(shape: Sequence[int], tactics: str, mesh: jax.sharding.Mesh, fsdp_min_size: int = 2 ** 14) -> P:
  """The PartitionSpec that `tactics` give a parameter of `shape` on `mesh`."""
  spec: list[Any] = [None] * len(shape)
  for tactic, dim in _parse_tactics(tactics):
    if tactic == "replicate":
      return P()
    size = mesh.shape[tactic]
    if size == 1:
      continue
    if tactic == "tensor":
      if not -len(shape) <= dim < len(shape) or shape[dim] % size or spec[dim] is not None:
        continue  # not divisible (or already split): stays whole along that axis
      spec[dim] = "tensor"
    elif math.prod(shape) >= fsdp_min_size:
      free = [d for d in np.argsort(shape)[::-1] if spec[d] is None and shape[d] % size == 0]
      if free:
        spec[int(free[0])] = "fsdp"
  while spec and spec[-1] is None:  # P(None, None) and P() mean the same: use the short form
    spec.pop()
  return P(*spec)


def param_shardings(params: Mapping[str, Any], mesh: jax.sharding.Mesh, rules=DEFAULT_RULES,
                    fsdp_min_size: int = 2 ** 14) -> Any:
  """A NamedSharding per parameter (shapes suffice), by the first matching rule."""
  out = {}
  for key, leaf in flatten(params).items():
    tactics = next((t for pattern, t in rules if re.search(pattern, key)), "replicate")
    out[key] = NamedSharding(mesh, param_spec(np.shape(leaf), tactics, mesh, fsdp_min_size))
  return unflatten(out)


def tree_shardings(tree: Any, params: Mapping[str, Any], params_sharding: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings for a train state: leaves shaped like a parameter (optimizer moments) follow it.

  A leaf whose path ends with a parameter's path and has that parameter's shape
  takes its sharding; everything else (step counters, RNG keys) is replicated.
  """
  shapes = {k: np.shape(v) for k, v in flatten(params).items()}
  by_path = flatten(params_sharding)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    names = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
    for start in range(len(names)):
      key = "/".join(names[start:])
      if key in by_path and shapes[key] == np.shape(leaf):
        return by_path[key]
    return replicated
  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The leading (batch) axis split over data and fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def put_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's part of the global batch -> global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def maybe_initialize_distributed(enabled: bool) -> None:
  """`jax.distributed.initialize()` for multi-host runs (TPU pods, multi-node GPU); a no-op otherwise."""
  if enabled:
    jax.distributed.initialize()
