"""PyTorch state dicts (timm, Hugging Face) into our parameter tree: the exact inverse of the exporters.

Every exporter (`timm_export.state_dict`, `hf_export.state_dict`) only moves values: transposes,
reshapes, splits and concatenations.  So instead of a second, hand-written mapping per family
(which could drift from the exporter), the import *traces* the exporter once: it exports a
template tree whose every element holds its own index (as the bits of a float32), reads in each
exported tensor which of our elements went where, and gathers the torch values back along the
same paths.  Import is thereby the inverse of export by construction: export-then-import is
bit-exact, and the exporters' tested parity with timm and transformers carries over.  Tensors
that the exporter computes rather than copies (a fixed sin-cos table) are recognised by the
trace and not read.

    params, settings, grid = torch_import.from_timm(torch_file.load("vit.pth"))
    params, settings, grid = torch_import.from_hf(state_dict, config_json)
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vit_jax.interop import common
from vit_jax.interop.tree import CheckpointError, ParamMismatchError, flatten, unflatten

_MAX_ELEMENTS = 0x7F000000  # ids stay finite positive float32 bit patterns (no NaN payloads to carry)


def _shapes(settings: Mapping[str, Any], grid: Sequence[int], *, model=None,
            collections: Sequence[str] = ("params",)) -> dict[str, tuple[int, ...]]:
  """Flat shapes of the model's variables: of "params" alone (paths without the collection), or of
  several collections (paths "params/...", "batch_stats/...")."""
  import jax
  import jax.numpy as jnp

  from vit_jax.models.vit import VisionTransformer

  ph, pw = common.model_settings(settings)["patch_size"] if model is None else (settings["patch_size"],) * 2
  model = model or VisionTransformer(**dict(settings, scan=False))
  images = jnp.zeros((1, grid[0] * ph, grid[1] * pw, settings["channels"]))
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  tree = tree["params"] if tuple(collections) == ("params",) else {c: tree[c] for c in collections}
  return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def trace(export: Callable[[Mapping[str, Any]], Mapping[str, np.ndarray]],
          shapes: Mapping[str, tuple[int, ...]]
          ) -> tuple[dict[str, np.ndarray], set[str], dict[str, tuple[int, int]]]:
  """`(ids per exported name, computed names, {our path: (first id, size)})`; ids are uint32, 1-based.

  Exported tensors that are computed rather than copied (a sin-cos table) carry no ids: they are
  the computed names.
  """
  spans, start = {}, 1
  for path, shape in shapes.items():
    size = int(np.prod(shape, dtype=np.int64))
    spans[path] = (start, size)
    start += size
  if start > _MAX_ELEMENTS:
    raise ValueError(f"{start - 1} parameters are too many to trace for import.")
  template = {p: np.arange(s, s + n, dtype=np.uint32).view(np.float32).reshape(shapes[p])
              for p, (s, n) in spans.items()}
  exported = export(unflatten(template))
  ids = {}
  for name, value in exported.items():
    bits = np.ascontiguousarray(value, np.float32).view(np.uint32)
    if bits.size and bits.min() >= 1 and bits.max() < start:
      ids[name] = bits
  return ids, set(exported) - set(ids), spans


COMPUTED_ATOL = 1e-5  # a stored table recomputed here (sin-cos) must agree with ours this closely


def import_state_dict(state_dict: Mapping[str, np.ndarray], export: Callable, shapes: Mapping[str, tuple[int, ...]],
                      *, what: str = "state dict", ignore: str | None = None) -> dict[str, Any]:
  """Our tree (float32) from `state_dict`, read along the traced `export`.

  Keys the exporter copies but the file lacks, keys the file has but the exporter does not write,
  and shape differences fail together in one `ParamMismatchError`.  A table the exporter computes
  (sin-cos) may be in the file or not; where it is, it must equal ours (`COMPUTED_ATOL`), or the
  model it came from was not the one these settings describe.  `ignore`: a regular expression
  of keys the file may hold that carry nothing to read (BatchNorm's batch counter).
  """
  ids, computed, spans = trace(export, shapes)
  names = set(ids)
  skipped = {k for k in state_dict if ignore and re.search(ignore, k)}
  missing = sorted(names - set(state_dict))
  unexpected = sorted(set(state_dict) - names - computed - skipped)
  wrong = sorted(f"{k}: {tuple(np.shape(state_dict[k]))} in the file, {ids[k].shape} expected"
                 for k in names & set(state_dict) if tuple(np.shape(state_dict[k])) != ids[k].shape)
  if missing or unexpected or wrong:
    parts = [f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}" if missing else "",
             f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}" if unexpected else "",
             f"shapes {wrong[:4]}" if wrong else ""]
    raise ParamMismatchError(f"The {what} does not match the model its settings describe: "
                             + "; ".join(p for p in parts if p) + ".")
  if computed & set(state_dict):
    template = unflatten({p: np.zeros(shape, np.float32) for p, shape in shapes.items()})
    exported = export(template)
    for name in sorted(computed & set(state_dict)):
      stored, ours = np.asarray(state_dict[name], np.float32), np.asarray(exported[name], np.float32)
      gap = float(np.max(np.abs(stored - ours))) if stored.shape == ours.shape else np.inf
      if not gap <= COMPUTED_ATOL:
        raise ParamMismatchError(f"The {what} holds {name!r} with other values than the fixed sin-cos table "
                                 f"this model computes (largest difference {gap:.3g}): it comes from a model with "
                                 "a learned table, which this architecture does not have.")
  total = sum(n for _, n in spans.values()) + 1
  flat = np.zeros(total, np.float32)
  seen = np.zeros(total, bool)
  for name, where in ids.items():
    values = np.asarray(state_dict[name]).astype(np.float32).ravel()
    where = where.ravel()
    if np.any(seen[where] & (flat[where] != values)):
      raise ParamMismatchError(f"The {what} holds two different values for one parameter (at {name!r}).")
    flat[where], seen[where] = values, True
  unread = [p for p, (s, n) in spans.items() if not seen[s:s + n].all()]
  if unread:
    raise ParamMismatchError(f"The {what} does not set {unread[:6]}.")
  return unflatten({p: flat[s:s + n].reshape(shapes[p]) for p, (s, n) in spans.items()})


def count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
  """How many `prefix{i}.` blocks the state dict has (0, 1, ... without gaps)."""
  found = {k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)}
  n = len(found)
  if found != {str(i) for i in range(n)}:
    raise ParamMismatchError(f"The {prefix}* blocks are not numbered 0..{n - 1}: {sorted(found)[:6]}.")
  return n


# ---------------------------------------------------------------------------- timm

def heads_of(width: int, given: int | None) -> int:
  """Heads are not visible in the weights: the config's, else the ViT family's (64 per head; H/14: 16)."""
  if given:
    return int(given)
  return 16 if width == 1280 else max(width // 64, 1)


def timm_settings(sd: Mapping[str, np.ndarray], model_args: Mapping[str, Any] | None = None
                  ) -> tuple[dict[str, Any], tuple[int, int]]:
  """Our settings and patch grid for a timm `VisionTransformer(Distilled)` state dict (+ its model_args)."""
  args = dict(model_args or {})
  if "patch_embed.proj.weight" not in sd:
    raise ParamMismatchError("Not a timm VisionTransformer state dict: no patch_embed.proj.weight.")
  width, channels, ph, pw = np.shape(sd["patch_embed.proj.weight"])
  for key, what in (("blocks.0.gamma_1", "DeiT-III's layer scale and class-token-free position table (gamma_1)"),
                    ("blocks.0.norm1.running_mean", "BatchNorm in the blocks")):
    if key in sd:
      raise ParamMismatchError(f"The file has {what}, which this package's ViT does not implement.")
  depth = count_blocks(sd, "blocks.")
  parallel = "blocks.0.in_proj.weight" in sd  # ParallelScalingBlock (ViT-22B)
  attn = "blocks.0." if parallel else "blocks.0.attn."
  norm = "blocks.0.in_norm" if parallel else "blocks.0.norm1"
  fc2 = "blocks.0.mlp_out_proj" if parallel else "blocks.0.mlp.fc2"
  if parallel:
    mlp_dim = int(np.shape(sd[fc2 + ".weight"])[1])
  else:
    mlp_dim = int(np.shape(sd["blocks.0.mlp.fc1.weight"])[0]) if depth else None
  cls, dist = "cls_token" in sd, "dist_token" in sd
  pool = "map" if "attn_pool.latent" in sd else ("token" if cls and "fc_norm.weight" not in sd else "gap")
  if args.get("global_pool") in ("avg", "token", "map", ""):
    pool = {"avg": "gap", "token": "token", "map": "map", "": "none"}[args["global_pool"]]
  act = {"gelu_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}.get(str(args.get("act_layer")), "gelu")
  heads = args.get("num_heads")
  if not heads and attn + "q_norm.weight" in sd:  # QK-norm is per head: its width is the head width
    heads = int(width) // int(np.shape(sd[attn + "q_norm.weight"])[0])
  settings = common.model_settings(
      width=int(width), depth=depth, num_heads=heads_of(int(width), heads), channels=int(channels),
      mlp_dim=mlp_dim, patch_size=(int(ph), int(pw)),
      num_classes=int(np.shape(sd["head.weight"])[0]) if "head.weight" in sd else None, pool_type=pool,
      class_token=cls, distilled=dist, fc_norm="fc_norm.weight" in sd,
      qkv_bias=("blocks.0.in_proj.bias" if parallel else "blocks.0.attn.qkv.bias") in sd,
      layer_scale_init=1e-5 if {"blocks.0.ls1.gamma", "blocks.0.ls.gamma"} & set(sd) else None, activation=act,
      parallel=parallel, qk_norm=None if attn + "q_norm.weight" not in sd else
      "layernorm" if attn + "q_norm.bias" in sd else "rmsnorm",
      norm_type="rmsnorm" if depth and norm + ".bias" not in sd else "layernorm",
      proj_bias=not depth or (("blocks.0.attn_out_proj" if parallel else "blocks.0.attn.proj") + ".bias") in sd,
      posemb="learn" if "pos_embed" in sd else "none", layer_norm_eps=1e-6,
      final_norm=False if "norm.weight" not in sd and "fc_norm.weight" not in sd else None)
  prefix = int(cls) + int(dist)
  if "pos_embed" in sd:
    grid = square_grid_of(np.shape(sd["pos_embed"])[1] - prefix, args.get("img_size"), (ph, pw))
    if grid is not None and is_sincos(sd["pos_embed"], grid, prefix):
      settings["posemb"] = "sincos2d"  # MAE's pre-training encoders: a fixed table, not a learned one
  else:
    grid = tuple(int(v) // p for v, p in zip(args.get("img_size") or (224, 224), (ph, pw)))
  return settings, grid


def is_sincos(table, grid: Sequence[int], prefix: int) -> bool:
  """Whether a stored position table is the fixed 2-D sin-cos one (zero prefix rows), to `COMPUTED_ATOL`."""
  from vit_jax.models.vit import posemb_sincos_2d

  table = np.asarray(table, np.float32)
  if table.ndim != 3 or table.shape[1] != prefix + grid[0] * grid[1] or table.shape[2] % 4:
    return False
  ours = np.asarray(posemb_sincos_2d(grid[0], grid[1], table.shape[2], prefix_tokens=prefix), np.float32)
  return bool(np.allclose(table, ours, rtol=0, atol=COMPUTED_ATOL))


def square_grid_of(tokens: int, img_size, patch) -> tuple[int, int] | None:
  """The patch grid from the image size, else a square one; None when neither fits `tokens`."""
  if img_size:
    size = (img_size, img_size) if np.ndim(img_size) == 0 else tuple(img_size)
    grid = (int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1]))
    if grid[0] * grid[1] == tokens:
      return grid
  side = int(round(np.sqrt(tokens)))
  return (side, side) if side * side == tokens else None


def from_timm(sd: Mapping[str, np.ndarray], model_args: Mapping[str, Any] | None = None, *,
              what: str = "timm state dict") -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
  """`(params, settings, grid)` from a timm `VisionTransformer` / `VisionTransformerDistilled` state dict.

  `grid` is None when neither `model_args["img_size"]` nor a square position embedding gives it.
  """
  from vit_jax.interop import timm_export

  settings, grid = timm_settings(sd, model_args)
  # Without the image size, a non-square table is read as one row of patches: the same shapes and
  # values; the grid is then None (give the image size where it matters).
  shape_grid = grid or (1, int(np.shape(sd["pos_embed"])[1]) - int(settings["class_token"]) - int(settings["distilled"]))
  export = lambda p: timm_export.names(common.unrolled(p), settings, shape_grid)
  return import_state_dict(sd, export, _shapes(settings, shape_grid), what=what), settings, grid


# ---------------------------------------------------------------------------- Hugging Face

def hf_settings(config: Mapping[str, Any], sd: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], tuple[int, int]]:
  """Our settings and grid for a Hugging Face ViT / DeiT folder (its config.json and weights)."""
  from vit_jax.interop.hf_export import HF_ACT

  model_type = config.get("model_type", "vit")
  if model_type not in ("vit", "deit"):
    raise ParamMismatchError(f"Hugging Face model_type {model_type!r} is not a ViT or DeiT classifier.")
  act = {v: k for k, v in HF_ACT.items()}.get(config.get("hidden_act", "gelu"))
  if act is None:
    raise ParamMismatchError(f"hidden_act={config.get('hidden_act')!r} has no equivalent here.")
  patch = config.get("patch_size", 16)
  patch = (patch, patch) if np.ndim(patch) == 0 else tuple(patch)
  size = config.get("image_size", 224)
  size = (size, size) if np.ndim(size) == 0 else tuple(size)
  heads_key = "cls_classifier.weight" if model_type == "deit" else "classifier.weight"
  num_classes = int(np.shape(sd[heads_key])[0]) if heads_key in sd else None
  pooler = "pooler.dense.weight" in sd or "vit.pooler.dense.weight" in sd
  settings = common.model_settings(
      width=int(config["hidden_size"]), depth=int(config["num_hidden_layers"]),
      num_heads=int(config["num_attention_heads"]), mlp_dim=int(config["intermediate_size"]),
      patch_size=patch, channels=int(config.get("num_channels", 3)), num_classes=num_classes,
      representation_size=int(config.get("pooler_output_size") or config["hidden_size"]) if pooler else None,
      distilled=model_type == "deit", qkv_bias=bool(config.get("qkv_bias", True)), activation=act,
      layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)), pool_type="token")
  return settings, (size[0] // patch[0], size[1] // patch[1])


_HF_BLOCK = re.compile(r"^(.*?)(?:(decoder_layers)|layers)\.(\d+)\.(.*)$")  # transformers 5 block names
_HF_LEGACY = [(re.compile(r"^attention\.([qkv])_proj\."),
               lambda m: f"attention.attention.{dict(q='query', k='key', v='value')[m[1]]}."),
              (re.compile(r"^attention\.o_proj\."), lambda m: "attention.output.dense."),
              (re.compile(r"^mlp\.fc1\."), lambda m: "intermediate.dense."),
              (re.compile(r"^mlp\.fc2\."), lambda m: "output.dense."),
              (re.compile(r"^(layernorm_before|layernorm_after)\."), lambda m: f"{m[1]}.")]


def hf_legacy_names(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A Hugging Face ViT / DeiT / ViTMAE state dict under the hub's legacy key names, whichever it was
  saved with (transformers 5 writes `layers.{i}.attention.q_proj`, `mlp.fc1`, ...)."""
  out = {}
  for k, v in sd.items():
    # transformers 5's save_pretrained writes ViTMAE's decoder blocks as `decoder_encoder.layer.{i}`.
    k = k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers.")
    m = _HF_BLOCK.match(k)
    if m and "encoder.layer." not in k:
      for pattern, replace in _HF_LEGACY:
        rest, n = pattern.subn(replace, m[4], count=1)
        if n:
          block = f"decoder_layers.{m[3]}." if m[2] else f"encoder.layer.{m[3]}."
          k = m[1] + block + rest
          break
    out[k] = v
  return out


def from_hf(sd: Mapping[str, np.ndarray], config: Mapping[str, Any], *,
            what: str = "Hugging Face checkpoint") -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
  """`(params, settings, grid)` from a Hugging Face ViT / DeiT state dict and its config.json."""
  from vit_jax.interop import hf_export

  sd = hf_legacy_names(sd)
  settings, grid = hf_settings(config, sd)
  # A head model saved from ViTModel weights lacks the "vit." prefix, and the reverse: accept both.
  _, _, base = hf_export.architecture(settings)
  if base and not any(k.startswith(base) for k in sd):
    sd = {(k if k.startswith(("classifier", "cls_classifier", "distillation_classifier")) else base + k): v
          for k, v in sd.items()}
  export = lambda p: hf_export.state_dict(p, settings, grid)
  return import_state_dict(sd, export, _shapes(settings, grid), what=what), settings, grid


def from_hf_mae(sd: Mapping[str, np.ndarray], config: Mapping[str, Any], *,
                what: str = "Hugging Face checkpoint") -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
  """`(params, settings, grid)` of a `MaskedAutoencoder` from a `ViTMAEForPreTraining` folder."""
  from vit_jax.interop import hf_export
  from vit_jax.interop.hf_export import HF_ACT
  from vit_jax.models.mae import MaskedAutoencoder

  act = {v: k for k, v in HF_ACT.items()}.get(config.get("hidden_act", "gelu"))
  if act is None:
    raise ParamMismatchError(f"hidden_act={config.get('hidden_act')!r} has no equivalent here.")
  if not config.get("qkv_bias", True):
    raise ParamMismatchError("A ViTMAE without qkv biases has no equivalent here (our MAE keeps them).")
  patch, size = int(config.get("patch_size", 16)), int(config.get("image_size", 224))
  settings = dict(
      patch_size=patch, width=int(config["hidden_size"]), depth=int(config["num_hidden_layers"]),
      num_heads=int(config["num_attention_heads"]), mlp_dim=int(config["intermediate_size"]),
      decoder_width=int(config["decoder_hidden_size"]), decoder_depth=int(config["decoder_num_hidden_layers"]),
      decoder_heads=int(config["decoder_num_attention_heads"]),
      decoder_mlp_dim=int(config["decoder_intermediate_size"]), mask_ratio=float(config.get("mask_ratio", 0.75)),
      norm_pix_loss=bool(config.get("norm_pix_loss", False)), channels=int(config.get("num_channels", 3)),
      activation=act, layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)))
  grid = (size // patch, size // patch)
  sd = hf_legacy_names(sd)
  export = lambda p: hf_export.mae_state_dict(p, settings, grid)
  shapes = _shapes(settings, grid, model=MaskedAutoencoder(**settings))
  return import_state_dict(sd, export, shapes, what=what), settings, grid


def from_mae(sd: Mapping[str, np.ndarray], args: Mapping[str, Any] | None = None, *,
             what: str = "MAE checkpoint") -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
  """`(params, settings, grid)` of a `MaskedAutoencoder` from an MAE release with its decoder."""
  from vit_jax.interop import official
  from vit_jax.models.mae import MaskedAutoencoder

  settings, grid = official.mae_settings(sd, args)
  if grid is None:
    raise ParamMismatchError(f"The {what} has a position table for no square patch grid: give the image size.")
  export = lambda p: official.mae_state_dict(p, settings, grid)
  shapes = _shapes(settings, grid, model=MaskedAutoencoder(**settings))
  return import_state_dict(sd, export, shapes, what=what), settings, grid


def from_lvvit(sd: Mapping[str, np.ndarray], args: Mapping[str, Any] | None = None, *,
               what: str = "LV-ViT checkpoint") -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
  """`(variables, settings, grid)` from an LV-ViT release: {"params", "batch_stats"} (the stem's running statistics)."""
  from vit_jax.interop import official

  settings, grid = official.lvvit_settings(sd, args)
  if grid is None:
    raise ParamMismatchError(f"The {what} has a position table for no square patch grid: give the image size.")
  export = lambda v: official.lvvit_state_dict(v, settings, grid)
  shapes = _shapes(settings, grid, collections=("params", "batch_stats"))
  return import_state_dict(sd, export, shapes, what=what, ignore=official.LVVIT_IGNORED), settings, grid


def read(sd: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None,
         hints: Mapping[str, Any] | None = None, *, what: str = "checkpoint"
         ) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(variables, saved config)` from any PyTorch state dict this package reads, told apart by its names.

  `config`: the folder's config.json (Hugging Face: required; timm: its model_args are used).
  `hints`: what the weights cannot show (num_heads, image_size, residual_scale, decoder_heads,
  norm_pix_loss; weights_only=True when only the weights will be used, so unknown settings default).
  The saved config is {"model": settings, "image_size": [h, w], "task": "mae"
  for a MaskedAutoencoder}.
  """
  config, hints = dict(config or {}), {k: v for k, v in dict(hints or {}).items() if v is not None}
  args = dict(config.get("model_args") or {})
  args.update(hints)
  if "image_size" in hints:
    args["img_size"] = hints["image_size"]
  task = None
  if "model_type" in config:  # a Hugging Face folder
    if config["model_type"] in ("swin", "swinv2"):
      from vit_jax.interop import swin
      params, settings, size = swin.from_hf(sd, config, what=what)
      return {"params": params}, {"model": dict(settings, family="swin"), "image_size": list(size)}
    if config["model_type"] == "vit_mae":
      params, settings, grid = from_hf_mae(sd, config, what=what)
      task = "mae"
    else:
      params, settings, grid = from_hf(sd, config, what=what)
    variables = {"params": params}
  elif any(k.endswith("blocks_token_only.0.attn.q.weight") for k in sd):  # CaiT (timm, the release)
    from vit_jax.interop import cait
    params, settings, grid = cait.from_timm(sd, {"num_heads": args["num_heads"]} if args.get("num_heads") else None,
                                            image_size=args.get("img_size"), what=what)
    return {"params": params}, {"model": settings, "image_size": [grid[0] * settings["patch_size"],
                                                                  grid[1] * settings["patch_size"]]}
  elif "patch_embed.conv1.weight" in sd:  # LV-ViT's conv stem
    variables, settings, grid = from_lvvit(sd, args, what=what)
  elif "decoder_embed.weight" in sd:  # an MAE release with its decoder
    params, settings, grid = from_mae(sd, args, what=what)
    variables, task = {"params": params}, "mae"
  elif "patch_embed.proj.weight" in sd:  # timm names: timm, DeiT, MAE encoders and fine-tuned MAE
    params, settings, grid = from_timm(sd, args, what=what)
    variables = {"params": params}
  elif any(".embeddings.patch_embeddings." in k or k.startswith("embeddings.patch_embeddings.") for k in sd):
    raise CheckpointError(f"The {what} holds Hugging Face weights: give the folder with its config.json.")
  else:
    raise CheckpointError(f"The {what} is not a ViT state dict this package reads (timm, Hugging Face, "
                             f"MAE, LV-ViT or CaiT names); its first keys are {sorted(sd)[:5]}.")
  ph, pw = (settings["patch_size"],) * 2 if task == "mae" else settings["patch_size"]
  saved: dict[str, Any] = {"model": settings}
  if task:
    saved["task"] = task
  if grid is not None:
    saved["image_size"] = [grid[0] * ph, grid[1] * pw]
  return variables, saved
