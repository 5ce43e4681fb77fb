"""CaiT to and from timm's `Cait` (`timm.models.cait`), the layout of the released `cait_*` weights.

| ours | timm |
|---|---|
| `embedding` | `patch_embed.proj` |
| `cls`, `Transformer/posembed_input/pos_embedding` | `cls_token`, `pos_embed` (patches only) |
| `Transformer/encoderblock_{i}/LayerNorm_0`, `_1` | `blocks.{i}.norm1`, `norm2` |
| `.../MultiHeadDotProductAttention_0/{query, key, value}` | `blocks.{i}.attn.qkv` (rows q, k, v) |
| `.../talking_heads_pre`, `talking_heads_post`, `out` | `blocks.{i}.attn.proj_l`, `proj_w`, `proj` |
| `.../LayerScale_0/gamma`, `LayerScale_1/gamma` | `blocks.{i}.gamma_1`, `gamma_2` |
| `.../MlpBlock_0/Dense_0`, `Dense_1` | `blocks.{i}.mlp.fc1`, `fc2` |
| `class_block_{j}/...` (`attention/{query, key, value, out}`) | `blocks_token_only.{j}.*` (`attn.q`, `k`, `v`, `proj`) |
| `norm`, `head` | `norm`, `head` |

The papers' own checkpoints (facebookresearch/deit) hold the same names under `module.`; timm strips
the prefix, and so does `from_timm`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from vit_jax.interop import common
from vit_jax.interop.common import contiguous, dataclass_settings, named, torch_conv, torch_heads_in, torch_heads_out, torch_linear, torch_norm


def settings_of(settings: Mapping[str, Any]) -> dict[str, Any]:
  """`CaiT` settings with defaults filled in (no `family`)."""
  from vit_jax.models.cait import CaiT

  return dataclass_settings(CaiT, settings, "CaiT")


def timm_model_args(settings: Mapping[str, Any], image_size: Sequence[int] | int) -> dict[str, Any]:
  """Keyword arguments of timm's `Cait` for a model with these settings."""
  s = settings_of(settings)
  common.require(s, "timm's Cait", activation=("gelu",), layer_norm_eps=(1e-6,), talking_heads=(True,))
  size = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
  mlp_dim = s["mlp_dim"] or 4 * s["width"]
  return dict(img_size=[int(v) for v in size], patch_size=int(s["patch_size"]), in_chans=int(s["channels"]),
              num_classes=int(s["num_classes"] or 0), embed_dim=int(s["width"]), depth=int(s["depth"]),
              num_heads=int(s["num_heads"]), mlp_ratio=mlp_dim / s["width"], qkv_bias=bool(s["qkv_bias"]),
              init_values=float(s["layer_scale_init"]), depth_token_only=int(s["class_depth"]))


def timm_state_dict(params: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our CaiT tree -> timm's `Cait` state dict (float32)."""
  s = settings_of(settings)
  p = common.unrolled(params)
  sd = named("patch_embed.proj", torch_conv(p["embedding"]))
  sd["cls_token"] = contiguous(p["cls"])
  sd["pos_embed"] = contiguous(p["Transformer"]["posembed_input"]["pos_embedding"])
  for i, blk in enumerate(common.blocks(p)):
    pre, mha = f"blocks.{i}", blk["MultiHeadDotProductAttention_0"]
    q, k, v = (torch_heads_in(mha[n]) for n in ("query", "key", "value"))
    sd.update(named(f"{pre}.attn.qkv", {n: contiguous(np.concatenate([q[n], k[n], v[n]])) for n in q}))
    sd.update(named(f"{pre}.attn.proj_l", torch_linear(mha["talking_heads_pre"])))
    sd.update(named(f"{pre}.attn.proj_w", torch_linear(mha["talking_heads_post"])))
    sd.update(named(f"{pre}.attn.proj", torch_heads_out(mha["out"])))
    sd.update(_common_block(pre, blk))
  for j in range(s["class_depth"]):
    pre, blk = f"blocks_token_only.{j}", p[f"class_block_{j}"]
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      sd.update(named(f"{pre}.attn.{theirs}", torch_heads_in(blk["attention"][ours])))
    sd.update(named(f"{pre}.attn.proj", torch_heads_out(blk["attention"]["out"])))
    sd.update(_common_block(pre, blk))
  sd.update(named("norm", torch_norm(p["norm"])))
  if s["num_classes"]:
    sd.update(named("head", torch_linear(p["head"])))
  return sd


def _common_block(pre: str, blk: Mapping[str, Any]) -> dict[str, np.ndarray]:
  sd = named(f"{pre}.norm1", torch_norm(blk["LayerNorm_0"]))
  sd.update(named(f"{pre}.norm2", torch_norm(blk["LayerNorm_1"])))
  sd.update(named(f"{pre}.mlp.fc1", torch_linear(blk["MlpBlock_0"]["Dense_0"])))
  sd.update(named(f"{pre}.mlp.fc2", torch_linear(blk["MlpBlock_0"]["Dense_1"])))
  sd[f"{pre}.gamma_1"] = contiguous(blk["LayerScale_0"]["gamma"])
  sd[f"{pre}.gamma_2"] = contiguous(blk["LayerScale_1"]["gamma"])
  return sd


def timm_settings(sd: Mapping[str, np.ndarray], num_heads: int | None = None,
                  image_size: Sequence[int] | int | None = None) -> tuple[dict[str, Any], tuple[int, int]]:
  """`(settings, patch grid)` of a timm / released CaiT state dict; the heads are the released ones for
  the released widths (192: 4, 288: 6, 384: 8, 768: 16), else give `num_heads`; the grid is square
  unless `image_size` says otherwise."""
  from vit_jax.interop.torch_import import count_blocks
  from vit_jax.interop.tree import ParamMismatchError

  if "blocks_token_only.0.attn.q.weight" not in sd or "patch_embed.proj.weight" not in sd:
    raise ParamMismatchError("Not a CaiT state dict: no blocks_token_only.0.attn.q.weight / patch_embed.proj.weight.")
  width, channels, patch, _ = np.shape(sd["patch_embed.proj.weight"])
  heads = num_heads or {192: 4, 288: 6, 384: 8, 768: 16}.get(int(width))
  if not heads:
    raise ParamMismatchError(f"A CaiT of width {width} is not a released size: give its num_heads.")
  tokens = int(np.shape(sd["pos_embed"])[1])
  if image_size is not None:
    size = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
    grid = (int(size[0]) // int(patch), int(size[1]) // int(patch))
  else:
    side = int(round(np.sqrt(tokens)))
    grid = (side, side)
  if grid[0] * grid[1] != tokens:
    raise ParamMismatchError(f"The CaiT position table has {tokens} rows, not a {grid[0]}x{grid[1]} grid: give the "
                             "image size the model was trained at.")
  gamma = float(np.asarray(sd["blocks.0.gamma_1"]).ravel()[0]) if "blocks.0.gamma_1" in sd else 1e-5
  settings = dict(
      width=int(width), depth=count_blocks(sd, "blocks."), num_heads=int(heads), channels=int(channels),
      patch_size=int(patch), mlp_dim=int(np.shape(sd["blocks.0.mlp.fc1.weight"])[0]),
      class_depth=count_blocks(sd, "blocks_token_only."), qkv_bias="blocks.0.attn.qkv.bias" in sd,
      num_classes=int(np.shape(sd["head.weight"])[0]) if "head.weight" in sd else None,
      layer_scale_init=1e-6 if abs(gamma) < 1e-5 else 1e-5)  # only the initial value: the weights are read
  return settings, grid


def from_timm(sd: Mapping[str, np.ndarray], settings: Mapping[str, Any] | None = None, *,
              image_size: Sequence[int] | int | None = None,
              what: str = "timm CaiT state dict") -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
  """`(params, settings, grid)` from timm's / the release's CaiT state dict (the inverse of
  `timm_state_dict`); the settings are those the weights show (plus `settings`), with `family="cait"`,
  and `grid` the patch grid of the position table (at `image_size` when given)."""
  import jax
  import jax.numpy as jnp

  from vit_jax.interop.torch_import import import_state_dict
  from vit_jax.interop.tree import flatten
  from vit_jax.models.cait import CaiT

  sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
  found, grid = timm_settings(sd, (settings or {}).get("num_heads"), image_size)
  found.update({k: v for k, v in (settings or {}).items() if k != "family"})
  s = settings_of(found)
  size = (grid[0] * s["patch_size"], grid[1] * s["patch_size"])
  shapes = jax.eval_shape(lambda: CaiT(**s).init(jax.random.key(0), jnp.zeros((1, *size, s["channels"]))))
  shapes = {k: tuple(v.shape) for k, v in flatten(shapes["params"]).items()}
  params = import_state_dict(sd, lambda p: timm_state_dict(p, s), shapes, what=what)
  return params, dict(found, family="cait"), tuple(grid)


def save_timm(params: Mapping[str, Any], settings: Mapping[str, Any], out_dir, image_size: Sequence[int] | int) -> str:
  """Write a timm folder (`model.safetensors`, `config.json`) that `timm.create_model("local-dir:OUT",
  pretrained=True)` builds and loads; returns out_dir."""
  s = settings_of(settings)
  args = timm_model_args(s, image_size)
  c = s["channels"]
  config = {
      "architecture": "cait_xxs24_224", "num_classes": args["num_classes"], "num_features": s["width"],
      "model_args": args,  # overrides every size setting of the registered name
      "pretrained_cfg": {"input_size": [c, *args["img_size"]], "fixed_input_size": True, "interpolation": "bicubic",
                         "crop_pct": 1.0, "crop_mode": "center", "mean": [0.5] * c, "std": [0.5] * c,
                         "num_classes": args["num_classes"], "first_conv": "patch_embed.proj", "classifier": "head"},
  }
  return common.write_folder(out_dir, timm_state_dict(params, s), config)
