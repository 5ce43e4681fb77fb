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
  weights (`.npz`, PyTorch; with "image_size" where the weights or their config.json show it).
  `hints`: what PyTorch weights cannot show, `num_heads` and `image_size` (timm files without
  their config.json).
  """
  from vit_jax.files import path as as_path

  root = as_path(path)
  if root.is_dir() and _torch_folder(root) is None:  # local or gs://...
    from vit_jax import checkpoint
    params, config = checkpoint.load(path)
  elif root.is_dir() or not os.fspath(root).endswith(".npz"):
    params, config = _load_torch(root, dict(hints or {}))
  else:
    params = npz.load_npz(path, scan=scan)
    return params, {"model": common.infer_settings(params)}
  return (common.scanned(params) if scan else common.unrolled(params)), config


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
  sd = torch_file.load(weights)
  what = f"checkpoint {os.fspath(weights)!r}"
  if "model_type" in config:  # a Hugging Face folder
    params, settings, grid = torch_import.from_hf(sd, config, what=what)
  elif "patch_embed.proj.weight" in sd:  # timm names (timm, DeiT, MAE fine-tuned)
    args = dict(config.get("model_args") or {})
    args.update({k: v for k, v in (("num_heads", hints.get("num_heads")),
                                   ("img_size", hints.get("image_size"))) if v})
    params, settings, grid = torch_import.from_timm(sd, args, what=what)
  elif any(".embeddings.patch_embeddings." in k or k.startswith("embeddings.patch_embeddings.") for k in sd):
    raise CheckpointError(f"{what} holds Hugging Face weights: give the folder with its config.json.")
  else:
    raise CheckpointError(f"{what} is not a ViT state dict this package reads (timm or Hugging Face names); "
                          f"its first keys are {sorted(sd)[:5]}.")
  ph, pw = settings["patch_size"]
  config = {"model": settings, "source": os.fspath(weights)}
  if grid is not None:
    config["image_size"] = [grid[0] * ph, grid[1] * pw]
  return params, config


def _hints(init_params: Mapping[str, Any], grid: Sequence[int] | None) -> dict[str, Any]:
  """The model's head count, read from its query kernel [width, heads, head_dim] (for PyTorch weights)."""
  tree = common.unrolled(init_params) if "encoderblock" in init_params.get("Transformer", {}) else init_params
  blocks = common.blocks(tree) if "Transformer" in tree else []
  if blocks and "MultiHeadDotProductAttention_0" in blocks[0]:
    return {"num_heads": int(np.shape(blocks[0]["MultiHeadDotProductAttention_0"]["query"]["kernel"])[1])}
  return {}


def _prefix_count(tree: Mapping[str, Any]) -> int:
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
  scan = "encoderblock" in init_params.get("Transformer", {})
  if isinstance(source, Mapping):
    loaded = common.scanned(source) if scan else common.unrolled(source)
  else:
    loaded, _ = load_params(source, scan=scan, hints=_hints(init_params, grid))
  patterns = [dont_load] if isinstance(dont_load, str) else list(dont_load)
  if reinit_head:
    patterns += HEAD_PATTERNS
  if posemb_resize is not None:
    loaded = adapt_posemb(loaded, init_params, mode=posemb_resize, grid=grid, source_grid=source_grid)
  what = f"checkpoint {os.fspath(source)!r}" if not isinstance(source, Mapping) else "checkpoint"
  return merge_params(loaded, init_params, dont_load=patterns, what=what)
