"""Swin V1 / V2 to and from Hugging Face (`SwinForImageClassification`, `Swinv2ForImageClassification`).

Keys use the hub's legacy names, which every transformers release loads (transformers 5 renames
them in memory: `attention.q_proj`, `mlp.fc1`, ...; both are read back):

| ours | Hugging Face (prefix `swin.` / `swinv2.`) |
|---|---|
| `embedding`, `embedding_norm` | `embeddings.patch_embeddings.projection`, `embeddings.norm` |
| `stage_i/block_j/LayerNorm_0`, `LayerNorm_1` | `encoder.layers.i.blocks.j.layernorm_before`, `layernorm_after` |
| `.../attention/{query,key,value}`, `out` | `....attention.self.{query,key,value}`, `....attention.output.dense` |
| `.../relative_position_bias/table` (V1) | `....attention.self.relative_position_bias_table` |
| `.../attention/logit_scale` [heads] (V2) | `....attention.self.logit_scale` [heads, 1, 1] |
| `.../relative_position_bias/Dense_0`, `Dense_1` (V2) | `....attention.self.continuous_position_bias_mlp.0`, `.2` |
| `.../MlpBlock_0/Dense_0`, `Dense_1` | `....intermediate.dense`, `....output.dense` |
| `stage_i/merge/{norm, reduction}` | `encoder.layers.i.downsample.{norm, reduction}` |
| `norm`, `head` | `layernorm`, `classifier` (unprefixed) |

The config sets `layer_norm_eps`, `hidden_act` and (V2) `pretrained_window_sizes` to the model's.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from vit_jax.interop.common import contiguous, dataclass_settings, named, torch_conv, torch_heads_in, torch_heads_out, torch_linear, torch_norm
from vit_jax.interop.tree import ParamMismatchError


def settings_of(settings: Mapping[str, Any]) -> dict[str, Any]:
  """`SwinTransformer` settings with defaults filled in."""
  from vit_jax.models.swin import SwinTransformer

  return dataclass_settings(SwinTransformer, settings, "Swin", ignore=())


def _prefix(s: Mapping[str, Any]) -> str:
  return "swinv2." if s["version"] == 2 else "swin."


def hf_config(settings: Mapping[str, Any], image_size: Sequence[int] | int,
              labels: Sequence[str] | None = None) -> dict[str, Any]:
  """The `config.json` of the Hugging Face model."""
  from vit_jax.interop.hf_export import HF_ACT

  s = settings_of(settings)
  if s["activation"] not in HF_ACT:
    raise ValueError(f"Hugging Face Swin cannot represent activation={s['activation']!r}.")
  size = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
  v2 = s["version"] == 2
  depths = [int(d) for d in s["depths"]]
  heads = [int(h) for h in (s["num_heads"] if np.ndim(s["num_heads"]) else [s["num_heads"]] * len(depths))]
  cfg: dict[str, Any] = dict(
      model_type="swinv2" if v2 else "swin",
      architectures=["Swinv2ForImageClassification" if v2 else "SwinForImageClassification"],
      image_size=int(size[0]) if size[0] == size[1] else [int(v) for v in size], patch_size=int(s["patch_size"]),
      num_channels=int(s["channels"]), embed_dim=int(s["embed_dim"]), depths=depths, num_heads=heads,
      window_size=int(s["window_size"]), mlp_ratio=float(s["mlp_ratio"]), qkv_bias=bool(s["qkv_bias"]),
      hidden_act=HF_ACT[s["activation"]], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      drop_path_rate=0.0, use_absolute_embeddings=False, layer_norm_eps=float(s["layer_norm_eps"]),
      initializer_range=0.02, dtype="float32")
  if v2:
    pre = s["pretrained_window_size"]
    cfg["pretrained_window_sizes"] = [int(p) for p in (pre if np.ndim(pre) else [pre] * len(depths))]
  if s["num_classes"]:
    names = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(s["num_classes"])]
    if len(names) != s["num_classes"]:
      raise ValueError(f"{len(names)} label names for {s['num_classes']} classes.")
    cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
    cfg["label2id"] = {n: i for i, n in enumerate(names)}
  return cfg


def hf_state_dict(params: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our `SwinTransformer` tree -> the Hugging Face state dict (legacy names, float32)."""
  s = settings_of(settings)
  pre = _prefix(s)
  sd = named(f"{pre}embeddings.patch_embeddings.projection", torch_conv(params["embedding"]))
  sd.update(named(f"{pre}embeddings.norm", torch_norm(params["embedding_norm"])))
  for i, depth in enumerate(s["depths"]):
    stage = params[f"stage_{i}"]
    for j in range(depth):
      blk, p = stage[f"block_{j}"], f"{pre}encoder.layers.{i}.blocks.{j}"
      att = blk["attention"]
      for name in ("query", "key", "value"):
        sd.update(named(f"{p}.attention.self.{name}", torch_heads_in(att[name])))
      sd.update(named(f"{p}.attention.output.dense", torch_heads_out(att["out"])))
      rel = blk["relative_position_bias"]
      if s["version"] == 1:
        sd[f"{p}.attention.self.relative_position_bias_table"] = contiguous(rel["table"])
      else:
        sd[f"{p}.attention.self.logit_scale"] = contiguous(np.asarray(att["logit_scale"]).reshape(-1, 1, 1))
        sd.update(named(f"{p}.attention.self.continuous_position_bias_mlp.0", torch_linear(rel["Dense_0"])))
        sd.update(named(f"{p}.attention.self.continuous_position_bias_mlp.2", torch_linear(rel["Dense_1"])))
      sd.update(named(f"{p}.layernorm_before", torch_norm(blk["LayerNorm_0"])))
      sd.update(named(f"{p}.layernorm_after", torch_norm(blk["LayerNorm_1"])))
      sd.update(named(f"{p}.intermediate.dense", torch_linear(blk["MlpBlock_0"]["Dense_0"])))
      sd.update(named(f"{p}.output.dense", torch_linear(blk["MlpBlock_0"]["Dense_1"])))
    if "merge" in stage:
      sd.update(named(f"{pre}encoder.layers.{i}.downsample.norm", torch_norm(stage["merge"]["norm"])))
      sd.update(named(f"{pre}encoder.layers.{i}.downsample.reduction", torch_linear(stage["merge"]["reduction"])))
  sd.update(named(f"{pre}layernorm", torch_norm(params["norm"])))
  if s["num_classes"]:
    sd.update(named("classifier", torch_linear(params["head"])))
  return sd


def save_hf(params: Mapping[str, Any], settings: Mapping[str, Any], out_dir, image_size: Sequence[int] | int,
            labels: Sequence[str] | None = None) -> str:
  """Write `out_dir/{config.json, model.safetensors}` for `Swin(v2)ForImageClassification`; returns out_dir."""
  from vit_jax.interop.common import host, write_folder

  cfg = hf_config(settings, image_size, labels)
  return write_folder(out_dir, hf_state_dict(host(params), settings), cfg)


_RENAMES = [  # transformers 5 in-memory names -> the hub's legacy names
    (re.compile(r"\.attention\.([qkv])_proj\."), lambda m: f".attention.self.{dict(q='query', k='key', v='value')[m[1]]}."),
    (re.compile(r"\.attention\.o_proj\."), lambda m: ".attention.output.dense."),
    (re.compile(r"\.attention\.relative_position_bias\.relative_position_bias_table$"),
     lambda m: ".attention.self.relative_position_bias_table"),
    (re.compile(r"\.mlp\.fc1\."), lambda m: ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), lambda m: ".output.dense."),
]
_BUFFERS = re.compile(r"(relative_position_index|relative_coords_table|attn_mask)$")  # recomputed here


def hf_legacy_names(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A Hugging Face Swin state dict under the legacy names, without the recomputed buffers."""
  out = {}
  for k, v in sd.items():
    if _BUFFERS.search(k):
      continue
    for pattern, replace in _RENAMES:
      k = pattern.sub(replace, k)
    out[k] = v
  return out


def from_hf(sd: Mapping[str, np.ndarray], config: Mapping[str, Any], *,
            what: str = "Hugging Face checkpoint") -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
  """`(params, settings, image size)` of a Swin / Swin V2 folder's state dict and config.json."""
  import jax
  import jax.numpy as jnp

  from vit_jax.interop.hf_export import HF_ACT
  from vit_jax.interop.torch_import import import_state_dict
  from vit_jax.interop.tree import flatten
  from vit_jax.models.swin import SwinTransformer

  model_type = config.get("model_type")
  if model_type not in ("swin", "swinv2"):
    raise ParamMismatchError(f"Hugging Face model_type {model_type!r} is not Swin.")
  if config.get("use_absolute_embeddings"):
    raise ParamMismatchError("A Swin with absolute position embeddings has no equivalent here.")
  act = {v: k for k, v in HF_ACT.items()}.get(config.get("hidden_act", "gelu"))
  if act is None:
    raise ParamMismatchError(f"hidden_act={config.get('hidden_act')!r} has no equivalent here.")
  sd = hf_legacy_names(sd)
  head = "classifier.weight" in sd
  settings = settings_of(dict(
      num_classes=int(np.shape(sd["classifier.weight"])[0]) if head else None,
      patch_size=int(config.get("patch_size", 4)), embed_dim=int(config["embed_dim"]),
      depths=tuple(int(d) for d in config["depths"]), num_heads=tuple(int(h) for h in config["num_heads"]),
      window_size=int(config.get("window_size", 7)), mlp_ratio=float(config.get("mlp_ratio", 4.0)),
      version=2 if model_type == "swinv2" else 1, qkv_bias=bool(config.get("qkv_bias", True)),
      channels=int(config.get("num_channels", 3)), layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
      activation=act, pretrained_window_size=tuple(  # Hugging Face keeps 4 entries whatever the depth
          int(p) for p in list(config.get("pretrained_window_sizes") or [0] * 4)[:len(config["depths"])])))
  size = config.get("image_size", 224)
  size = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(v) for v in size)
  model = SwinTransformer(**settings)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, settings["channels"]))))
  shapes = {k: tuple(v.shape) for k, v in flatten(shapes["params"]).items()}
  params = import_state_dict(sd, lambda p: hf_state_dict(p, settings), shapes, what=what)
  return params, settings, size


# ---------------------------------------------------------------------------------------- timm

def timm_model_args(settings: Mapping[str, Any], image_size: Sequence[int] | int) -> tuple[str, dict[str, Any]]:
  """`(timm class, keyword arguments)`: `swin_transformer.SwinTransformer` or `swin_transformer_v2.SwinTransformerV2`.

  timm rolls the map before padding it and clips the window per side, where Hugging Face and we pad
  first and clip by the smaller side: on maps the window divides and that are larger than it (or
  equal to it on both sides) the two agree exactly.
  """
  s = settings_of(settings)
  size = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
  if s["activation"] != "gelu":
    raise ValueError(f"timm's Swin uses exact GELU; this model has activation={s['activation']!r}.")
  if s["layer_norm_eps"] != 1e-5:
    raise ValueError(f"timm's Swin uses LayerNorm eps 1e-5; this model has {s['layer_norm_eps']}.")
  args: dict[str, Any] = dict(
      img_size=[int(v) for v in size], patch_size=int(s["patch_size"]), in_chans=int(s["channels"]),
      num_classes=int(s["num_classes"] or 0), embed_dim=int(s["embed_dim"]), depths=[int(d) for d in s["depths"]],
      num_heads=[int(h) for h in s["num_heads"]], window_size=int(s["window_size"]), mlp_ratio=float(s["mlp_ratio"]),
      qkv_bias=bool(s["qkv_bias"]))
  if s["version"] == 2:
    pre = s["pretrained_window_size"]
    args["pretrained_window_sizes"] = [int(p) for p in (pre if np.ndim(pre) else [pre] * len(s["depths"]))]
    return "SwinTransformerV2", args
  return "SwinTransformer", args


def timm_state_dict(params: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our `SwinTransformer` tree -> timm's state dict (its current layout: merging opens stages 1..)."""
  s = settings_of(settings)
  sd = named("patch_embed.proj", torch_conv(params["embedding"]))
  sd.update(named("patch_embed.norm", torch_norm(params["embedding_norm"])))
  for i, depth in enumerate(s["depths"]):
    stage = params[f"stage_{i}"]
    for j in range(depth):
      blk, p = stage[f"block_{j}"], f"layers.{i}.blocks.{j}"
      att, rel = blk["attention"], blk["relative_position_bias"]
      q, k, v = (torch_heads_in(att[n]) for n in ("query", "key", "value"))
      sd[f"{p}.attn.qkv.weight"] = contiguous(np.concatenate([q["weight"], k["weight"], v["weight"]]))
      if s["version"] == 1:
        if "bias" in q:
          sd[f"{p}.attn.qkv.bias"] = contiguous(np.concatenate([q["bias"], k["bias"], v["bias"]]))
        sd[f"{p}.attn.relative_position_bias_table"] = contiguous(rel["table"])
      else:
        if "bias" in q:
          sd[f"{p}.attn.q_bias"], sd[f"{p}.attn.v_bias"] = q["bias"], v["bias"]
        sd[f"{p}.attn.logit_scale"] = contiguous(np.asarray(att["logit_scale"]).reshape(-1, 1, 1))
        sd.update(named(f"{p}.attn.cpb_mlp.0", torch_linear(rel["Dense_0"])))
        sd.update(named(f"{p}.attn.cpb_mlp.2", torch_linear(rel["Dense_1"])))
      sd.update(named(f"{p}.attn.proj", torch_heads_out(att["out"])))
      sd.update(named(f"{p}.norm1", torch_norm(blk["LayerNorm_0"])))
      sd.update(named(f"{p}.norm2", torch_norm(blk["LayerNorm_1"])))
      sd.update(named(f"{p}.mlp.fc1", torch_linear(blk["MlpBlock_0"]["Dense_0"])))
      sd.update(named(f"{p}.mlp.fc2", torch_linear(blk["MlpBlock_0"]["Dense_1"])))
    if "merge" in stage:  # timm: the next stage's downsample
      sd.update(named(f"layers.{i + 1}.downsample.norm", torch_norm(stage["merge"]["norm"])))
      sd.update(named(f"layers.{i + 1}.downsample.reduction", torch_linear(stage["merge"]["reduction"])))
  sd.update(named("norm", torch_norm(params["norm"])))
  if s["num_classes"]:
    sd.update(named("head.fc", torch_linear(params["head"])))
  return sd


def from_timm(sd: Mapping[str, np.ndarray], settings: Mapping[str, Any], image_size: Sequence[int] | int, *,
              what: str = "timm state dict") -> dict[str, Any]:
  """Our tree from a timm Swin / Swin V2 state dict of a model with these `settings` (the inverse of
  `timm_state_dict`; timm's recomputed buffers are ignored)."""
  import jax
  import jax.numpy as jnp

  from vit_jax.interop.torch_import import import_state_dict
  from vit_jax.interop.tree import flatten
  from vit_jax.models.swin import SwinTransformer

  s = settings_of(settings)
  size = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
  model = SwinTransformer(**s)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, s["channels"]))))
  shapes = {k: tuple(v.shape) for k, v in flatten(shapes["params"]).items()}
  return import_state_dict(dict(sd), lambda p: timm_state_dict(p, s), shapes, what=what,
                           ignore=r"(relative_position_index|relative_coords_table|attn_mask|k_bias)$")
