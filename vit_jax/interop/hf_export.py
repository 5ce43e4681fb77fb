"""Export to Hugging Face transformers: `config.json` + `model.safetensors` in one directory.

Keys use the hub's (legacy) names, which every transformers release loads:
`vit.encoder.layer.{i}.attention.attention.{query,key,value}`,
`attention.output.dense`, `intermediate.dense`, `output.dense`,
`layernorm_before/after`, `vit.layernorm`, `classifier`.  The config sets
`layer_norm_eps` and `hidden_act` to the model's (the library defaults,
1e-12 and exact GELU, would not reproduce our outputs).

| our model | class to load with |
|---|---|
| pool_type="token" with a head | `ViTForImageClassification` |
| distilled=True | `DeiTForImageClassificationWithTeacher` (cls + distillation heads) |
| a representation layer (`pre_logits`) | `ViTModel` (its `pooler` is our Dense + tanh; `pooler_output` = our `pre_logits`) |
| no head | `ViTModel.from_pretrained(dir, add_pooling_layer=False)` |

transformers has no class with both a representation layer and a classifier,
so the head of such a model is not exported (as in the hub's in21k ViTs).
Hugging Face ViT always classifies from the class token: "gap" and "map"
models export to timm instead.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from vit_jax.interop import common
from vit_jax.interop.common import contiguous, named, torch_conv, torch_heads_in, torch_heads_out, torch_linear, torch_norm

HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}


def architecture(settings: Mapping[str, Any]) -> tuple[str, str, str]:
  """`(model_type, class name, key prefix)` for the model."""
  if settings["distilled"]:
    return "deit", "DeiTForImageClassificationWithTeacher", "deit."
  if settings["num_classes"] and not settings["representation_size"]:
    return "vit", "ViTForImageClassification", "vit."
  return "vit", "ViTModel", ""


def check_supported(settings: Mapping[str, Any]) -> None:
  if settings["pool_type"] != "token":
    raise ValueError(f"Hugging Face ViT classifies from the class token only, so pool_type="
                     f"{settings['pool_type']!r} cannot be represented: export this model to timm instead.")
  common.require(settings, "Hugging Face ViT", norm=("pre",), stem=("patch",), residual_scale=(1.0,),
                 layer_scale_init=(None,), activation=tuple(HF_ACT), token_head=(False,), final_norm=(None, True),
                 posemb=("learn", "sincos2d", "none"), **common.PLAIN_BLOCKS)


def config(settings: Mapping[str, Any], grid: Sequence[int], labels: Sequence[str] | None = None) -> dict:
  """The `config.json` contents."""
  s = common.model_settings(settings)
  check_supported(s)
  model_type, cls, _ = architecture(s)
  ph, pw = s["patch_size"]
  cfg: dict[str, Any] = dict(
      model_type=model_type, architectures=[cls], hidden_size=s["width"], num_hidden_layers=s["depth"],
      num_attention_heads=s["num_heads"], intermediate_size=s["mlp_dim"], hidden_act=HF_ACT[s["activation"]],
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02,
      layer_norm_eps=float(s["layer_norm_eps"]), image_size=[grid[0] * ph, grid[1] * pw],
      patch_size=ph if ph == pw else [ph, pw], num_channels=s["channels"], qkv_bias=bool(s["qkv_bias"]),
      encoder_stride=ph, dtype="float32")
  if s["representation_size"]:
    cfg.update(pooler_output_size=int(s["representation_size"]), pooler_act="tanh")
  if s["num_classes"] and cls != "ViTModel":
    names = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(s["num_classes"])]
    if len(names) != s["num_classes"]:
      raise ValueError(f"{len(names)} label names for {s['num_classes']} classes.")
    cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
    cfg["label2id"] = {n: i for i, n in enumerate(names)}
  return cfg


def state_dict(params: Mapping[str, Any], settings: Mapping[str, Any],
               grid: Sequence[int]) -> dict[str, np.ndarray]:
  """Our tree -> the legacy-named Hugging Face state dict (float32)."""
  s = common.model_settings(settings)
  check_supported(s)
  _, cls, base = architecture(s)
  p = common.unrolled(params)
  emb = base + "embeddings"
  sd = named(f"{emb}.patch_embeddings.projection", torch_conv(p["embedding"]))
  sd[f"{emb}.cls_token"] = contiguous(p["cls"])
  if s["distilled"]:
    sd[f"{emb}.distillation_token"] = contiguous(p["dist_token"])
  sd[f"{emb}.position_embeddings"] = contiguous(common.explicit_posemb(p, s, grid))
  for i, blk in enumerate(common.blocks(p)):
    sd.update(_layer(f"{base}encoder.layer.{i}", blk))
  sd.update(named(f"{base}layernorm", torch_norm(p["Transformer"]["encoder_norm"])))
  if s["representation_size"]:
    sd.update(named("pooler.dense", torch_linear(p["pre_logits"])))
    if s["num_classes"]:
      logging.warning("transformers has no class with a representation layer and a classifier: the head "
                      "(%d classes) is not exported; the ViTModel's pooler_output is our pre_logits.",
                      s["num_classes"])
  elif cls == "ViTForImageClassification":
    sd.update(named("classifier", torch_linear(p["head"])))
  elif cls == "DeiTForImageClassificationWithTeacher":
    sd.update(named("cls_classifier", torch_linear(p["head"])))
    sd.update(named("distillation_classifier", torch_linear(p["head_dist"])))
  return sd


def _layer(prefix: str, blk: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """One encoder block under the hub's legacy layer names."""
  mha = blk["MultiHeadDotProductAttention_0"]
  sd = {}
  for name in ("query", "key", "value"):
    sd.update(named(f"{prefix}.attention.attention.{name}", torch_heads_in(mha[name])))
  sd.update(named(f"{prefix}.attention.output.dense", torch_heads_out(mha["out"])))
  sd.update(named(f"{prefix}.layernorm_before", torch_norm(blk["LayerNorm_0"])))
  sd.update(named(f"{prefix}.layernorm_after", torch_norm(blk["LayerNorm_1"])))
  sd.update(named(f"{prefix}.intermediate.dense", torch_linear(blk["MlpBlock_0"]["Dense_0"])))
  sd.update(named(f"{prefix}.output.dense", torch_linear(blk["MlpBlock_0"]["Dense_1"])))
  return sd


def mae_config(settings: Mapping[str, Any], grid: Sequence[int]) -> dict:
  """`config.json` of `ViTMAEForPreTraining` for `MaskedAutoencoder` settings."""
  from vit_jax.models.mae import MaskedAutoencoder

  s = {k: f.default for k, f in MaskedAutoencoder.__dataclass_fields__.items() if k not in ("parent", "name")}
  s.update(settings)
  if grid[0] != grid[1]:
    raise ValueError(f"Hugging Face ViTMAE needs a square patch grid, got {grid[0]}x{grid[1]}.")
  if s["activation"] not in HF_ACT:
    raise ValueError(f"Hugging Face ViTMAE cannot represent activation={s['activation']!r}.")
  p = s["patch_size"]
  return dict(
      model_type="vit_mae", architectures=["ViTMAEForPreTraining"], hidden_size=s["width"],
      num_hidden_layers=s["depth"], num_attention_heads=s["num_heads"], intermediate_size=s["mlp_dim"] or 4 * s["width"],
      hidden_act=HF_ACT[s["activation"]], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      initializer_range=0.02, layer_norm_eps=float(s["layer_norm_eps"]), image_size=grid[0] * p, patch_size=p,
      num_channels=s["channels"], qkv_bias=True, decoder_num_attention_heads=s["decoder_heads"],
      decoder_hidden_size=s["decoder_width"], decoder_num_hidden_layers=s["decoder_depth"],
      decoder_intermediate_size=s["decoder_mlp_dim"] or 4 * s["decoder_width"], mask_ratio=float(s["mask_ratio"]),
      norm_pix_loss=bool(s["norm_pix_loss"]), dtype="float32")


def mae_state_dict(params: Mapping[str, Any], settings: Mapping[str, Any], grid: Sequence[int]) -> dict:
  """Our `MaskedAutoencoder` tree -> legacy-named `ViTMAEForPreTraining` state dict, sin-cos tables included."""
  from vit_jax.models.vit import posemb_sincos_2d

  cfg = mae_config(settings, grid)
  p = common.unrolled(params)
  table = lambda width: contiguous(posemb_sincos_2d(grid[0], grid[1], width, prefix_tokens=1))
  sd = named("vit.embeddings.patch_embeddings.projection", torch_conv(p["embedding"]))
  sd["vit.embeddings.cls_token"] = contiguous(p["cls"])
  sd["vit.embeddings.position_embeddings"] = table(cfg["hidden_size"])  # HF does not compute them itself
  for i, blk in enumerate(common.blocks(p)):
    sd.update(_layer(f"vit.encoder.layer.{i}", blk))
  sd.update(named("vit.layernorm", torch_norm(p["Transformer"]["encoder_norm"])))
  sd.update(named("decoder.decoder_embed", torch_linear(p["decoder_embed"])))
  sd["decoder.mask_token"] = contiguous(p["mask_token"])
  sd["decoder.decoder_pos_embed"] = table(cfg["decoder_hidden_size"])
  for i, blk in enumerate(common.blocks({"Transformer": p["Decoder"]})):
    sd.update(_layer(f"decoder.decoder_layers.{i}", blk))
  sd.update(named("decoder.decoder_norm", torch_norm(p["Decoder"]["encoder_norm"])))
  sd.update(named("decoder.decoder_pred", torch_linear(p["decoder_pred"])))
  return sd


def save_mae(params: Mapping[str, Any], settings: Mapping[str, Any], out_dir: str | os.PathLike,
             image_size: int) -> str:
  """Write a `ViTMAEForPreTraining` directory (`config.json` + `model.safetensors`); returns out_dir."""
  p = settings["patch_size"]
  if image_size % p:
    raise ValueError(f"Image size {image_size} is not divisible by the patch size {p}.")
  grid = (image_size // p, image_size // p)
  return common.write_folder(out_dir, mae_state_dict(params, settings, grid), mae_config(settings, grid))


def save(params: Mapping[str, Any], settings: Mapping[str, Any], out_dir: str | os.PathLike,
         image_size: Sequence[int] | int | None = None, labels: Sequence[str] | None = None) -> str:
  """Write `out_dir/{config.json, model.safetensors}`; returns out_dir."""
  s = common.model_settings(settings)
  p = common.unrolled(params)
  grid = common.patch_grid(p, s, image_size)
  cfg = config(s, grid, labels)  # first: it rejects unrepresentable models before any work
  return common.write_folder(out_dir, state_dict(p, s, grid), cfg)
