"""Load any supported checkpoint into a model's parameter tree, for inference or fine-tuning.

    init = model.init(rng, images)["params"]
    params = load_pretrained("ViT-B_16.npz", init, reinit_head=True)  # fine-tune with a new head

Sources: a vit_jax or big_vision `.npz` (any published layout), a native orbax
checkpoint directory, or PyTorch weights read without torch (`torch_file`): a timm
state dict (`.pth`, `.bin`, `.safetensors`; a timm folder), or a Hugging Face ViT /
DeiT folder (config.json + weights).  The key diff is strict: every missing,
unexpected or mis-shaped parameter is listed unless a `dont_load` regular
expression keeps the model's own value for it.  A position embedding for a
different patch grid is resized (see `posemb.resize_posemb`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from vit_jax.interop import common, npz
from vit_jax.interop.posemb import resize_posemb, square_grid
from vit_jax.interop.tree import merge_params

HEAD_PATTERNS = ("^head/", "^head_dist/")


def load_params(path: str | os.PathLike, *, scan: bool = False,
                hints: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(params, config)` from an `.npz` file, a native checkpoint directory or PyTorch weights.

  `config` is the checkpoint's saved config (native) or `{"model": settings}` inferred from the
  weights (`.npz`, PyTorch; with "image_size" where the weights or their config.json show it,
  and "task": "mae" for a masked autoencoder with its decoder).  `hints`: what PyTorch weights
  cannot show (`torch_import.read`): num_heads, image_size, residual_scale, decoder_heads,
  norm_pix_loss.
  """
  variables, config = load_variables(path, scan=scan, hints=hints)
  return variables["params"], config


def load_variables(path: str | os.PathLike, *, scan: bool = False,
                   hints: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(variables, config)` as `load_params`, with the batch statistics where there are any
  ({"params", "batch_stats"}: a native train state, an LV-ViT release)."""
  from vit_jax.files import path as as_path

  root = as_path(path)
  if root.is_dir() and _torch_folder(root) is None:  # local or gs://...
    from vit_jax import checkpoint
    variables, config = checkpoint.load_variables(path)
  elif root.is_dir() or not os.fspath(root).endswith(".npz"):
    variables, config = _load_torch(root, dict(hints or {}))
  else:
    params = npz.load_npz(path, scan=scan)
    return {"params": params}, {"model": common.infer_settings(params)}
  params = variables["params"]
  return dict(variables, params=common.scanned(params) if scan else common.unrolled(params)), config


_TORCH_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _torch_folder(root) -> Any:
  """The weights file of a Hugging Face or timm folder (config.json + weights), else None."""
  if not (root / "config.json").exists():
    return None
  return next((root / n for n in _TORCH_WEIGHTS if (root / n).exists()), None)


def _load_torch(root, hints: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """A PyTorch file (`.pth`, `.bin`, `.safetensors`) or a Hugging Face / timm folder, read without torch."""
  import json

  from vit_jax.interop import torch_file, torch_import
  from vit_jax.interop.tree import CheckpointError

  folder = root if root.is_dir() else None
  weights = _torch_folder(root) if folder is not None else root
  if weights is None:
    raise CheckpointError(f"{os.fspath(root)!r} has no model.safetensors or pytorch_model.bin next to a "
                          "config.json.")
  if folder is None and (root.parent / "config.json").exists():
    folder = root.parent
  config = json.loads((folder / "config.json").read_text()) if folder is not None else {}
  variables, saved = torch_import.read(torch_file.load(weights), config, hints,
                                       what=f"checkpoint {os.fspath(weights)!r}")
  return variables, dict(saved, source=os.fspath(weights))


def _hints(init_params: Mapping[str, Any], grid: Sequence[int] | None) -> dict[str, Any]:
  """What PyTorch weights cannot show, from the model they are loaded into: its head count (from the
  query kernel [width, heads, head_dim]); `weights_only`: other settings (LV-ViT's residual scale)
  are the model's own, so the file's need not be known."""
  tree = common.unrolled(init_params) if "encoderblock" in init_params.get("Transformer", {}) else init_params
  blocks = common.blocks(tree) if "Transformer" in tree else []
  hints: dict[str, Any] = {"weights_only": True}
  if blocks and "MultiHeadDotProductAttention_0" in blocks[0]:
    hints["num_heads"] = int(np.shape(blocks[0]["MultiHeadDotProductAttention_0"]["query"]["kernel"])[1])
  return hints


def _fixed_to_learned(loaded: Mapping[str, Any], saved: Mapping[str, Any], init: Mapping[str, Any],
                      grid: Sequence[int] | None) -> dict[str, Any]:
  """A checkpoint with the fixed sin-cos table (MAE) loaded into a model with a learned one: the
  learned table starts from the sin-cos values at the model's own grid, as MAE fine-tuning does."""
  from vit_jax.models.vit import posemb_sincos_2d

  fixed = saved.get("task") == "mae" or (saved.get("model") or {}).get("posemb") == "sincos2d"
  table = common.learned_posemb(init)
  if not fixed or table is None or common.learned_posemb(loaded) is not None or "Transformer" not in loaded:
    return dict(loaded)
  prefix = _prefix_count(init)
  grid = tuple(grid) if grid is not None else square_grid(np.shape(table)[1] - prefix, "model's position embedding")
  values = np.asarray(posemb_sincos_2d(grid[0], grid[1], np.shape(table)[-1], prefix_tokens=prefix), np.float32)
  logging.info("The checkpoint's fixed sin-cos position table initialises the model's learned one %s.", values.shape)
  return dict(loaded, Transformer=dict(loaded["Transformer"], posembed_input={"pos_embedding": values}))


def _prefix_count(tree: Mapping[str, Any]) -> int:
  """Rows of the position table before the patches: CaiT's class token has none (it joins late)."""
  if "class_block_0" in tree:
    return 0
  return int("cls" in tree) + int("dist_token" in tree)


def adapt_posemb(loaded: Mapping[str, Any], init: Mapping[str, Any], *, mode: str = "vit_jax",
                 grid: Sequence[int] | None = None, source_grid: Sequence[int] | None = None) -> dict[str, Any]:
  """`loaded` with its position embedding resized to `init`'s, when the shapes differ.

  `grid` / `source_grid`: (rows, columns) of the model's / checkpoint's patch
  grid (default: square).  Prefix rows are taken from the checkpoint as far as
  it has them; extra ones (e.g. a new distillation token) come from `init`.
  """
  old, new = common.learned_posemb(loaded), common.learned_posemb(init)
  if old is None or new is None or np.shape(old) == np.shape(new) or np.shape(old)[-1] != np.shape(new)[-1]:
    return dict(loaded)  # nothing to resize, or another width: the key/shape check reports it
  n_old, n_new = _prefix_count(loaded), _prefix_count(init)
  grid = tuple(grid) if grid is not None else square_grid(np.shape(new)[1] - n_new, "model's position embedding")
  resized = resize_posemb(old, grid, num_prefix_tokens=n_old, source_grid=source_grid, mode=mode)
  keep = min(n_old, n_new)
  resized = np.concatenate([resized[:, :keep], np.asarray(new)[:, keep:n_new].astype(resized.dtype),
                            resized[:, n_old:]], axis=1)
  logging.info("Resized the position embedding %s -> %s (%s mode).", np.shape(old), resized.shape, mode)
  out = {k: v for k, v in loaded.items()}
  out["Transformer"] = dict(loaded["Transformer"], posembed_input={"pos_embedding": resized})
  return out


def adapt_relative_tables(loaded: Mapping[str, Any], init: Mapping[str, Any]) -> dict[str, Any]:
  """`loaded` with every Swin V1 relative position bias table resized (bicubic) to the window of
  `init`'s where the two differ; V2's continuous bias takes any window as it is."""
  from vit_jax.interop.posemb import resize_relative_bias_table
  from vit_jax.interop.tree import flatten, unflatten

  flat, want = flatten(loaded), flatten(init)
  changed = {}
  for k, v in flat.items():
    if k.endswith("relative_position_bias/table") and k in want and np.shape(v) != np.shape(want[k]) \
        and np.shape(v)[1:] == np.shape(want[k])[1:]:
      window = (int(np.sqrt(np.shape(want[k])[0])) + 1) // 2
      changed[k] = resize_relative_bias_table(v, window)
  if not changed:
    return dict(loaded)
  logging.info("Resized %d relative position bias tables to window %d.", len(changed),
               (int(np.sqrt(next(iter(changed.values())).shape[0])) + 1) // 2)
  return unflatten({**flat, **changed})


def load_pretrained(source: str | os.PathLike | Mapping[str, Any], init_params: Mapping[str, Any], *,
                    dont_load: Iterable[str] | str = (), reinit_head: bool = False,
                    posemb_resize: str | None = "vit_jax", grid: Sequence[int] | None = None,
                    source_grid: Sequence[int] | None = None) -> dict[str, Any]:
  """`init_params` with every value taken from the checkpoint `source` (a path or a loaded tree).

  reinit_head: keep the model's freshly initialised `head` (and `head_dist`),
    for fine-tuning on new classes.  A checkpoint's `pre_logits` that the model
    does not have must be named in `dont_load` (e.g. `"^pre_logits/"`).
  posemb_resize: "vit_jax" / "timm" to resize a position embedding for another
    grid, None to fail on a size mismatch instead.
  Returns the model's tree (scanned or unrolled) with loaded values as numpy
  arrays in the model's dtypes and kept values as given in `init_params`.
  """
  return load_pretrained_variables(source, {"params": init_params}, dont_load=dont_load, reinit_head=reinit_head,
                                   posemb_resize=posemb_resize, grid=grid, source_grid=source_grid)["params"]


def load_pretrained_variables(source: str | os.PathLike | Mapping[str, Any], init_variables: Mapping[str, Any], *,
                              dont_load: Iterable[str] | str = (), reinit_head: bool = False,
                              posemb_resize: str | None = "vit_jax", grid: Sequence[int] | None = None,
                              source_grid: Sequence[int] | None = None) -> dict[str, Any]:
  """`load_pretrained` for all of a model's variables: {"params", "batch_stats", ...}.

  Collections besides "params" (the conv stem's BatchNorm statistics) are taken from the
  checkpoint where it has them, under the same strict key check and `dont_load` patterns; a
  checkpoint without them (an `.npz`, a params-only directory) leaves the model's own.
  """
  init_params = init_variables["params"]
  scan = "encoderblock" in init_params.get("Transformer", {})
  if isinstance(source, Mapping):
    variables = {"params": common.scanned(source) if scan else common.unrolled(source)}
  else:
    variables, saved = load_variables(source, scan=scan, hints=_hints(init_params, grid))
    variables["params"] = _fixed_to_learned(variables["params"], saved, init_params, grid)
  loaded = variables["params"]
  patterns = [dont_load] if isinstance(dont_load, str) else list(dont_load)
  if reinit_head:
    patterns += HEAD_PATTERNS
  if posemb_resize is not None:
    loaded = adapt_posemb(loaded, init_params, mode=posemb_resize, grid=grid, source_grid=source_grid)
    loaded = adapt_relative_tables(loaded, init_params)
  what = f"checkpoint {os.fspath(source)!r}" if not isinstance(source, Mapping) else "checkpoint"
  out = {"params": merge_params(loaded, init_params, dont_load=patterns, what=what)}
  for collection, init in init_variables.items():
    if collection == "params":
      continue
    if collection in variables:
      out[collection] = merge_params(variables[collection], init, dont_load=patterns, what=f"{what} ({collection})")
    else:
      logging.info("The checkpoint has no %s: the model's own are kept.", collection)
      out[collection] = init
  return out
