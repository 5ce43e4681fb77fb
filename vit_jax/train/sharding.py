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
    (r"MlpBlock_0/Dense_(0|gate)/bias$", "tensor(-1)|fsdp"),         # [M]: as its kernel's output
    (r"MlpBlock_0/Dense_1/kernel$", "tensor(-2)|fsdp"),              # [M, D]: split M
    # ViT's MultiHeadDotProductAttention_0, Swin's attention: the same [D, H, dh] / [H, dh, D] layout.
    (r"(MultiHeadDotProductAttention_0|/attention)/(query|key|value)/kernel$", "tensor(-2)|fsdp"),  # split H
    (r"(MultiHeadDotProductAttention_0|/attention)/(query|key|value)/bias$", "tensor(-2)|fsdp"),  # [H, dh]
    (r"(MultiHeadDotProductAttention_0|/attention)/out/kernel$", "tensor(-3)|fsdp"),  # split H
    (r".*", "fsdp"),
)


def _axis_sizes(spec: Sequence[Sequence[Any]], num_devices: int, what: str) -> dict[str, int]:
  """{axis: size} for every axis in AXES from [(axis, size)] pairs, one size may be -1 (the rest)."""
  if not all(isinstance(a, (tuple, list)) and len(a) == 2 for a in spec):
    raise ValueError(f"{what} must be (axis, size) pairs such as (('data', -1),), got {spec!r}.")
  sizes = dict((str(name), int(size)) for name, size in spec)
  unknown = set(sizes) - set(AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}: use {AXES}.")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"Only one mesh axis may be -1, got {free}.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"{num_devices} devices cannot be split into {sizes} (the fixed axes need a multiple of "
                       f"{fixed}).")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"Mesh {sizes} needs {math.prod(sizes.values())} devices, but there are {num_devices}.")
  return {a: sizes.get(a, 1) for a in AXES}


def make_mesh(spec: Sequence[Sequence[Any]] = (("data", -1),), devices=None,
              dcn: Sequence[Sequence[Any]] | None = None) -> jax.sharding.Mesh:
  """A mesh over all devices (or `devices`) from [(axis, size)]; one size may be -1 (the rest).

  Every axis in AXES exists in the mesh (size 1 unless given), so rules and
  batch specs can name them all.  Axes are Auto (compiler-propagated) shardings.

  `dcn` says how the axes are split *across* hosts (TPU slices, or processes
  where there are no slices), e.g. (("data", 2),) for two hosts that each hold
  half of the batch; each axis of `spec` then has `spec / dcn` devices inside a
  host.  Without it the devices are laid out by `jax.make_mesh` (topology-aware
  on TPU, in process order elsewhere).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = _axis_sizes(spec, len(devices), "config.mesh")
  if not dcn:
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
  # The units joined by the slow network: TPU slices where there are several, else processes (hosts).
  by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
  granules = len({d.process_index for d in devices} if by_process else {d.slice_index for d in devices})
  across = _axis_sizes(dcn, granules, "config.mesh_dcn")
  inside = {}
  for a in AXES:
    if sizes[a] % across[a]:
      raise ValueError(f"config.mesh_dcn splits axis {a!r} {across[a]} ways across hosts, which does not divide "
                       f"its size {sizes[a]} in config.mesh.")
    inside[a] = sizes[a] // across[a]
  from jax.experimental import mesh_utils  # noqa: PLC0415
  grid = mesh_utils.create_hybrid_device_mesh(tuple(inside.values()), tuple(across.values()), devices,
                                              process_is_granule=by_process)
  return jax.sharding.Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


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


class BatchPlacement:
  """Which rows of every global batch this process loads, and how they become one global array.

  The batch axis is split over ("data", "fsdp"); a process loads the rows of the
  shards that its own devices hold.  When devices of *different* processes hold
  the same shard (a `tensor` axis that spans hosts), each of those processes
  loads the same rows, so nothing depends on processes holding disjoint rows.

    rows: [local_rows] indices into the global batch, ascending
  """

  def __init__(self, mesh: jax.sharding.Mesh, global_batch: int):
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
      raise ValueError(f"A batch of {global_batch} cannot be split evenly over the {shards} batch shards of the "
                       f"mesh {dict(mesh.shape)}: use a multiple of {shards}.")
    self.mesh, self.global_batch = mesh, global_batch
    self.sharding = batch_sharding(mesh)
    spans = set()
    for index in self.sharding.addressable_devices_indices_map((global_batch,)).values():
      start, stop, _ = index[0].indices(global_batch)
      spans.add((start, stop))
    self._offsets, rows = {}, []
    for start, stop in sorted(spans):
      self._offsets[start] = len(rows)
      rows.extend(range(start, stop))
    self.rows = np.asarray(rows, np.int64)
    if len(set(rows)) != len(rows):
      raise AssertionError(f"Overlapping batch shards {sorted(spans)}.")

  def put(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows (in `rows` order) -> global arrays of `global_batch` rows."""
    def place(x):
      x = np.asarray(x)
      if x.shape[:1] != (len(self.rows),):
        raise ValueError(f"Expected the {len(self.rows)} rows this process loads, got an array of shape {x.shape}.")

      def rows_of(index):
        start, stop, _ = index[0].indices(self.global_batch)
        first = self._offsets[start]
        return x[(slice(first, first + stop - start),) + tuple(index[1:])]
      return jax.make_array_from_callback((self.global_batch, *x.shape[1:]), self.sharding, rows_of)
    return {k: place(v) for k, v in local.items()}
