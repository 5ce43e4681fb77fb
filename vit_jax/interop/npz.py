"""The published `.npz` checkpoints of vit_jax and big_vision: read, convert, write.

A `.npz` holds `/`-joined parameter paths.  Two layouts are in circulation:

* **vit_jax** (google-research/vision_transformer; what timm's `_load_weights`
  reads from un-prefixed files): pre-Linen block names
  `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3}`, the position embedding at
  `Transformer/posembed_input/pos_embedding` *including* the class-token row,
  sometimes everything under `opt/target/` (a saved train state).
* **big_vision**: Linen names (`MultiHeadDotProductAttention_0`, `LayerNorm_1`,
  `MlpBlock_0`), a top-level `pos_embedding` *without* a class-token row (the
  class token gets no position embedding), keys under `params/` or
  `params/img/` (image tower of a two-tower model), blocks either unrolled or
  scanned (`Transformer/encoderblock/...` with a leading depth axis),
  `MAPHead_0` for attention pooling, bfloat16 arrays stored as void `V2`.

In memory we use the Linen names and vit_jax's position-embedding layout, so a
big_vision class token is given an all-zero position-embedding row (exactly the
same function).  Writing the big_vision layout folds that row back into the
class token (`cls + pos_embedding[:, :1]`, again the same function).
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from typing import Any, Mapping

import numpy as np

from vit_jax.interop import common
from vit_jax.interop.tree import CheckpointError, flatten, unflatten

PREFIXES = ("opt/target/", "params/img/", "params/", "")
LAYOUTS = ("vit_jax", "big_vision")
# pre-Linen (one counter shared by all submodules of a block) -> Linen names.
PRE_LINEN = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
             "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
TO_PRE_LINEN = {v: k for k, v in PRE_LINEN.items()}
_BLOCK_CHILD = re.compile(r"^(Transformer/encoderblock(?:_\d+)?/)([^/]+)(/.*)$")


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All arrays of an `.npz` by key; bfloat16 (stored as `V2`) comes back as bfloat16.

  A missing, truncated or non-`.npz` file raises `CheckpointError` naming the problem.
  """
  from vit_jax.files import is_local, path as as_path

  source = as_path(path)
  path = os.fspath(source)
  if not source.is_file():
    raise CheckpointError(f"No checkpoint file at {path!r}.")
  try:
    data = path if is_local(path) else io.BytesIO(source.read_bytes())
    if zipfile.is_zipfile(data):
      with zipfile.ZipFile(data) as archive:
        _check_members(archive, path)
    if not isinstance(data, str):
      data.seek(0)
    f = np.load(data, allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile):
      raise CheckpointError(f"{path!r} holds a single array, not an .npz archive of named parameters.")
    with f:
      flat = {k: f[k] for k in f.files}
  except CheckpointError:
    raise
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"{path!r} is not a readable .npz file ({type(e).__name__}: {e}): it is truncated "
                          "or corrupt; download or export it again.") from None
  if not flat:
    raise CheckpointError(f"{path!r} is an empty .npz archive.")
  return {k: _recover_bfloat16(v) for k, v in flat.items()}


def _check_members(archive: zipfile.ZipFile, path: str) -> None:
  """Every member is a `.npy` array whose header's shape and dtype account for its size exactly.

  Read from the headers alone, before any array is allocated: a damaged or hostile file cannot
  make `np.load` allocate what its header claims.
  """
  for info in archive.infolist():
    name = info.filename
    if not name.endswith(".npy"):
      raise CheckpointError(f"{path!r} holds {name!r}, which is not a .npy array: not a checkpoint .npz.")
    with archive.open(info) as f:
      try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
      except ValueError as e:
        raise CheckpointError(f"{path!r}: the header of {name!r} is malformed ({e}): the file is corrupt.") from None
      header = f.tell()
    if dtype.hasobject:
      raise CheckpointError(f"{path!r}: {name!r} holds Python objects, which a checkpoint never does (and which "
                            "are not loaded, for safety).")
    declared = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if declared != info.file_size:
      raise CheckpointError(f"{path!r}: {name!r} declares shape {tuple(shape)} {dtype} ({declared} bytes) but holds "
                            f"{info.file_size} bytes: the file is truncated or corrupt.")


def _recover_bfloat16(a: np.ndarray) -> np.ndarray:
  if a.dtype.kind == "V" and a.dtype.itemsize == 2:
    import ml_dtypes
    return a.view(ml_dtypes.bfloat16)
  return a


def detect_layout(flat: Mapping[str, Any]) -> dict[str, Any]:
  """`{"prefix", "layout", "pre_linen", "scanned"}` of a flat checkpoint dict."""
  prefix = next((p for p in PREFIXES if p + "embedding/kernel" in flat), None)
  if prefix is None:
    shown = sorted({k.split("/")[0] for k in flat})[:12]
    raise CheckpointError(f"Not a ViT checkpoint: no 'embedding/kernel' under any known prefix "
                          f"{[p or '(none)' for p in PREFIXES]}; top-level keys are {shown}.")
  keys = [k[len(prefix):] for k in flat if k.startswith(prefix)]
  pre_linen = any((m := _BLOCK_CHILD.match(k)) and m.group(2) in ("MultiHeadDotProductAttention_1", "MlpBlock_3")
                  for k in keys)
  scanned = any(k.startswith("Transformer/encoderblock/") for k in keys)
  big_vision = "pos_embedding" in keys or "Transformer/pos_embedding" in keys or (
      not pre_linen and "Transformer/posembed_input/pos_embedding" not in keys)
  return dict(prefix=prefix, layout="big_vision" if big_vision else "vit_jax", pre_linen=pre_linen,
              scanned=scanned)


def from_flat(flat: Mapping[str, Any], *, scan: bool = False) -> dict[str, Any]:
  """A flat checkpoint dict (any published layout) -> our parameter tree (numpy leaves)."""
  info = detect_layout(flat)
  prefix = info["prefix"]
  params = {}
  for key, v in flat.items():
    if not key.startswith(prefix):
      continue  # e.g. the optimizer state next to opt/target, or a text tower
    key = key[len(prefix):]
    m = _BLOCK_CHILD.match(key)
    if m and info["pre_linen"]:
      key = m.group(1) + PRE_LINEN.get(m.group(2), m.group(2)) + m.group(3)
    params[key] = np.asarray(v)
  posemb = params.pop("pos_embedding", None)
  if posemb is None:
    posemb = params.pop("Transformer/pos_embedding", None)
  if posemb is not None:  # big_vision: no rows for the prefix tokens; theirs are zeros in our layout
    prefix_rows = int("cls" in params) + int("dist_token" in params)
    pad = np.zeros((1, prefix_rows, posemb.shape[-1]), posemb.dtype)
    params["Transformer/posembed_input/pos_embedding"] = np.concatenate([pad, posemb], axis=1)
  tree = unflatten(params)
  return common.scanned(tree) if scan else common.unrolled(tree)


def load_npz(path: str | os.PathLike, *, scan: bool = False) -> dict[str, Any]:
  """Our parameter tree from a vit_jax or big_vision `.npz` (unrolled blocks, or scanned with `scan`)."""
  flat = read_npz(path)
  try:
    return from_flat(flat, scan=scan)
  except CheckpointError as e:
    raise CheckpointError(f"{os.fspath(path)!r}: {e}") from None


def to_flat(params: Mapping[str, Any], *, layout: str = "vit_jax", prefix: str | None = None,
            scan: bool = False, settings: Mapping[str, Any] | None = None,
            image_size=None) -> dict[str, np.ndarray]:
  """Our parameter tree -> a flat dict in a published layout (float32).

  layout "vit_jax": pre-Linen block names, posemb with prefix rows, unrolled,
  no key prefix by default (what timm's `_load_weights` expects).
  layout "big_vision": Linen names, top-level `pos_embedding` without prefix rows
  (the class token absorbs its row), `params/` prefix by default, blocks
  stacked on a leading axis with `scan=True`.
  A fixed position embedding (sin-cos) is written as a table; that needs
  `settings` (and `image_size` for a non-square grid).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"Unknown .npz layout {layout!r}: choose one of {LAYOUTS}.")
  if layout == "vit_jax" and scan:
    raise ValueError("The vit_jax .npz layout has unrolled blocks only; use layout='big_vision' for a scanned "
                     "file.")
  tree = common.unrolled(params)
  if settings is not None:
    settings = common.model_settings(settings)
    if settings["posemb"] != "learn":
      grid = common.patch_grid(tree, settings, image_size)
      tree["Transformer"]["posembed_input"] = {"pos_embedding": common.explicit_posemb(tree, settings, grid)}
  if layout == "big_vision":
    if "dist_token" in tree:
      raise ValueError("The big_vision layout has no distillation token: write a DeiT model as layout='vit_jax'.")
    pe = tree["Transformer"].pop("posembed_input", {}).get("pos_embedding")
    if pe is not None:
      if "cls" in tree:
        tree["cls"] = tree["cls"] + pe[:, :1]
        pe = pe[:, 1:]
      tree["pos_embedding"] = pe
    if scan:
      tree = common.scanned(tree)
  flat = {}
  for key, v in flatten(tree).items():
    m = _BLOCK_CHILD.match(key)
    if m and layout == "vit_jax":
      key = m.group(1) + TO_PRE_LINEN.get(m.group(2), m.group(2)) + m.group(3)
    flat[key] = np.ascontiguousarray(np.asarray(v, np.float32))
  if prefix is None:
    prefix = "params/" if layout == "big_vision" else ""
  return {prefix + k: v for k, v in flat.items()}


def save_npz(path: str | os.PathLike, params: Mapping[str, Any], **kwargs: Any) -> str:
  """Write `to_flat(params, **kwargs)` to `path` atomically (a crash leaves any old file intact)."""
  return write_npz(path, to_flat(params, **kwargs))


def write_npz(path: str | os.PathLike, flat: Mapping[str, np.ndarray]) -> str:
  """`flat` as an `.npz` at `path` (local or an object store such as gs://), written atomically."""
  import io

  from vit_jax.files import write_atomic

  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  return os.fspath(write_atomic(path, buffer.getvalue()))
