"""Export to timm: a `state_dict` in safetensors plus timm's `config.json`, in one directory.

The directory is what timm's own hub exports look like, so it loads offline with

    model = timm.create_model("local-dir:OUT", pretrained=True)

or, with the arguments from `config.json`'s "model_args",
`VisionTransformer(**model_args).load_state_dict(safetensors.torch.load_file("OUT/model.safetensors"), strict=True)`.

Pooling maps to timm's `VisionTransformer` as:

| ours | timm |
|---|---|
| pool_type="token" | `class_token=True, global_pool="token"` |
| pool_type="gap" | `global_pool="avg", fc_norm=False` (norm before the mean of the patch tokens) |
| pool_type="gap", fc_norm=True | `global_pool="avg", fc_norm=True` (MAE fine-tuning: norm after the mean) |
| class_token | `class_token` (default: pool_type="token") |
| pool_type="map" | `class_token=False, global_pool="map"` (`attn_pool.*`) |
| pool_type="none" | `global_pool=""` (head on every token) |
| distilled=True | `VisionTransformerDistilled` (`deit_*_distilled_*`), `dist_token`, `head_dist` |

ViT-22B's block options map to timm's arguments of the same names: `qk_norm` (`attn.q_norm`,
`attn.k_norm`; timm builds them with `norm_layer`, so `qk_norm` must be the blocks' `norm_type`),
`qkv_bias`, `proj_bias`, `norm_type="rmsnorm"` (`norm_layer="rmsnorm"`), and `parallel=True`
(`ParallelScalingBlock`, through the registered `vit_base_patch16_xp_224` with its defaults
overridden: one `in_norm`, `in_proj` = [MLP input, q, k, v], `mlp_bias` without a qkv bias,
`attn_out_proj`, `mlp_out_proj`, `ls`).

timm's ViT has no representation layer (`pre_logits`), no post-norm blocks,
gated MLPs, conv stem or talking heads; such models fail with a message naming the setting.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from vit_jax.interop import common
from vit_jax.interop.common import contiguous, named, torch_conv, torch_heads_in, torch_heads_out, torch_linear, torch_norm
from vit_jax.models.vit import has_class_token

TIMM_POOL = {"token": "token", "gap": "avg", "map": "map", "none": ""}
TIMM_ACT = {"gelu": None, "gelu_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}


def check_supported(settings: Mapping[str, Any]) -> None:
  common.require(settings, "timm's VisionTransformer", norm=("pre",), stem=("patch",), residual_scale=(1.0,),
                 activation=tuple(TIMM_ACT), representation_size=(None, 0), layer_norm_eps=(1e-6,),
                 token_head=(False,), talking_heads=(False,), qk_norm=(None, settings["norm_type"]),
                 posemb=("learn", "sincos2d", "none"))
  if settings["parallel"] and settings["distilled"]:
    raise ValueError("timm cannot represent this model: its distilled ViT has no parallel blocks.")
  if common.has_final_norm(settings) == bool(settings["fc_norm"]):
    raise ValueError("timm's VisionTransformer ends with either `norm` or `fc_norm`: this model has "
                     f"{'both' if settings['fc_norm'] else 'neither'} (final_norm={settings['final_norm']}).")
  if settings["pool_type"] == "map" and not settings["qkv_bias"]:
    raise ValueError("timm's VisionTransformer cannot represent this model: its attention-pooling head drops "
                     "the q/kv biases when qkv_bias=False, ours keeps them.")
  if settings["mlp_dim"] != int(settings["width"] * (settings["mlp_dim"] / settings["width"])):
    raise ValueError(f"timm cannot express mlp_dim={settings['mlp_dim']} for width={settings['width']} as an "
                     "mlp_ratio exactly.")


def model_args(settings: Mapping[str, Any], grid: Sequence[int]) -> tuple[str, dict[str, Any]]:
  """`(architecture, model_args)`: a registered timm model name and the arguments that override it."""
  s = common.model_settings(settings)
  check_supported(s)
  ph, pw = s["patch_size"]
  args: dict[str, Any] = dict(
      img_size=[grid[0] * ph, grid[1] * pw], patch_size=ph if ph == pw else [ph, pw], in_chans=s["channels"],
      num_classes=s["num_classes"] or 0, embed_dim=s["width"], depth=s["depth"], num_heads=s["num_heads"],
      mlp_ratio=s["mlp_dim"] / s["width"], qkv_bias=bool(s["qkv_bias"]),
      class_token=has_class_token(s["pool_type"], s["class_token"]), global_pool=TIMM_POOL[s["pool_type"]],
      fc_norm=bool(s["fc_norm"]), no_embed_class=False,
      pos_embed="none" if s["posemb"] == "none" else "learn", qk_norm=bool(s["qk_norm"]),
      proj_bias=bool(s["proj_bias"]), norm_layer=s["norm_type"])
  if s["layer_scale_init"] is not None:
    args["init_values"] = float(s["layer_scale_init"])
  if TIMM_ACT[s["activation"]]:
    args["act_layer"] = TIMM_ACT[s["activation"]]
  # Registered names whose defaults `args` fully overrides; only the class (and block) they build matters.
  if s["parallel"]:
    args["pre_norm"] = False
    return "vit_base_patch16_xp_224", args
  return ("deit_base_distilled_patch16_224" if s["distilled"] else "vit_base_patch16_224"), args


def state_dict(params: Mapping[str, Any], settings: Mapping[str, Any],
               grid: Sequence[int]) -> dict[str, np.ndarray]:
  """Our tree -> timm `VisionTransformer` / `VisionTransformerDistilled` state dict (float32)."""
  s = common.model_settings(settings)
  check_supported(s)
  return names(common.unrolled(params), s, grid)


def names(p: Mapping[str, Any], s: Mapping[str, Any], grid: Sequence[int]) -> dict[str, np.ndarray]:
  """timm's names for an unrolled tree, without the check that timm can build the model (MAE's
  released encoders use these names without a final norm)."""
  sd = named("patch_embed.proj", torch_conv(p["embedding"]))
  if has_class_token(s["pool_type"], s["class_token"]):
    sd["cls_token"] = contiguous(p["cls"])
  if s["distilled"]:
    sd["dist_token"] = contiguous(p["dist_token"])
  if s["posemb"] != "none":
    sd["pos_embed"] = contiguous(common.explicit_posemb(p, s, grid))
  for i, blk in enumerate(common.blocks(p)):
    sd.update(parallel_block_names(f"blocks.{i}", blk) if s["parallel"] else block_names(f"blocks.{i}", blk))
  if s["fc_norm"]:
    sd.update(named("fc_norm", torch_norm(p["fc_norm"])))
  if common.has_final_norm(s):
    sd.update(named("norm", torch_norm(p["Transformer"]["encoder_norm"])))
  if s["pool_type"] == "map":
    head = p["MAPHead_0"]
    sd["attn_pool.latent"] = contiguous(head["probe"])
    sd.update(_attention("attn_pool", head["MultiHeadDotProductAttention_0"], fused=False))
    sd.update(named("attn_pool.norm", torch_norm(head["LayerNorm_0"])))
    sd.update(named("attn_pool.mlp.fc1", torch_linear(head["MlpBlock_0"]["Dense_0"])))
    sd.update(named("attn_pool.mlp.fc2", torch_linear(head["MlpBlock_0"]["Dense_1"])))
  if s["num_classes"]:
    sd.update(named("head", torch_linear(p["head"])))
    if s["distilled"]:
      sd.update(named("head_dist", torch_linear(p["head_dist"])))
  return sd


def block_names(pre: str, blk: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """One pre-norm block under timm's names (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1/2`, `ls1/2`)."""
  sd = _attention(f"{pre}.attn", blk["MultiHeadDotProductAttention_0"], fused=True)
  sd.update(named(f"{pre}.norm1", torch_norm(blk["LayerNorm_0"])))
  sd.update(named(f"{pre}.norm2", torch_norm(blk["LayerNorm_1"])))
  sd.update(named(f"{pre}.mlp.fc1", torch_linear(blk["MlpBlock_0"]["Dense_0"])))
  sd.update(named(f"{pre}.mlp.fc2", torch_linear(blk["MlpBlock_0"]["Dense_1"])))
  for j in (0, 1):
    if f"LayerScale_{j}" in blk:
      sd[f"{pre}.ls{j + 1}.gamma"] = contiguous(blk[f"LayerScale_{j}"]["gamma"])
  return sd


def parallel_block_names(pre: str, blk: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """One parallel block under timm's `ParallelScalingBlock` names."""
  mha, mlp = blk["MultiHeadDotProductAttention_0"], blk["MlpBlock_0"]
  fc1 = torch_linear(mlp["Dense_0"])
  q, k, v = (torch_heads_in(mha[n]) for n in ("query", "key", "value"))
  sd = named(f"{pre}.in_norm", torch_norm(blk["LayerNorm_0"]))
  sd[f"{pre}.in_proj.weight"] = contiguous(np.concatenate([fc1["weight"], q["weight"], k["weight"], v["weight"]]))
  if "bias" in q:
    sd[f"{pre}.in_proj.bias"] = contiguous(np.concatenate([fc1["bias"], q["bias"], k["bias"], v["bias"]]))
  else:
    sd[f"{pre}.mlp_bias"] = fc1["bias"]
  sd.update(_qk_norms(pre, mha))
  sd.update(named(f"{pre}.attn_out_proj", torch_heads_out(mha["out"])))
  sd.update(named(f"{pre}.mlp_out_proj", torch_linear(mlp["Dense_1"])))
  if "LayerScale_0" in blk:
    sd[f"{pre}.ls.gamma"] = contiguous(blk["LayerScale_0"]["gamma"])
  return sd


def _qk_norms(prefix: str, mha: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for ours, theirs in (("query_norm", "q_norm"), ("key_norm", "k_norm")):
    if ours in mha:
      out.update(named(f"{prefix}.{theirs}", torch_norm(mha[ours])))
  return out


def _attention(prefix: str, mha: Mapping[str, Any], *, fused: bool) -> dict[str, np.ndarray]:
  """timm's attention: blocks fuse q, k, v into `qkv`; the pooling head has `q` and a fused `kv`."""
  q, k, v = (torch_heads_in(mha[n]) for n in ("query", "key", "value"))
  cat = lambda *ts: {n: contiguous(np.concatenate([t[n] for t in ts])) for n in ts[0]}
  out = named(f"{prefix}.qkv", cat(q, k, v)) if fused else {**named(f"{prefix}.q", q),
                                                            **named(f"{prefix}.kv", cat(k, v))}
  out.update(_qk_norms(prefix, mha))
  out.update(named(f"{prefix}.proj", torch_heads_out(mha["out"])))
  return out


def save(params: Mapping[str, Any], settings: Mapping[str, Any], out_dir: str | os.PathLike,
         image_size: Sequence[int] | int | None = None) -> str:
  """Write `out_dir/{model.safetensors, config.json}`; returns out_dir."""
  s = common.model_settings(settings)
  p = common.unrolled(params)
  grid = common.patch_grid(p, s, image_size)
  arch, args = model_args(s, grid)
  c = s["channels"]
  config = {
      "architecture": arch, "num_classes": args["num_classes"], "num_features": s["width"],
      "model_args": args,
      "pretrained_cfg": {
          "input_size": [c, *args["img_size"]], "fixed_input_size": True, "interpolation": "bicubic",
          "crop_pct": 1.0, "crop_mode": "center", "mean": [0.5] * c, "std": [0.5] * c,  # inputs in [-1, 1]
          "num_classes": args["num_classes"], "first_conv": "patch_embed.proj",
          "classifier": ["head", "head_dist"] if s["distilled"] else "head"},
  }
  return common.write_folder(out_dir, state_dict(p, s, grid), config)
