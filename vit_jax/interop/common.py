"""What every exporter shares: model settings, the patch grid, and torch tensor layouts.

A model is described by its `VisionTransformer` settings (the keyword arguments
that `vit_jax.models.variants.get_config` returns); `model_settings` fills in the
defaults.  `infer_settings` recovers those that a parameter tree determines,
so a published `.npz` converts without any configuration.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from vit_jax.interop.posemb import square_grid
from vit_jax.models.encoder import scan_to_unrolled, unrolled_to_scan

_BLOCK = re.compile(r"^encoderblock_(\d+)$")


def model_settings(config: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
  """`VisionTransformer` settings with defaults filled in; unknown keys fail with the closest names."""
  from vit_jax.models.vit import VisionTransformer

  fields = {k: f.default for k, f in VisionTransformer.__dataclass_fields__.items()
            if k not in ("parent", "name")}
  given = dict(config.to_dict() if hasattr(config, "to_dict") else (config or {}), **overrides)
  unknown = sorted(set(given) - set(fields))
  if unknown:
    import difflib
    hints = {k: difflib.get_close_matches(k, fields, n=3) for k in unknown}
    raise ValueError(f"Unknown model setting(s) {unknown}; closest valid names: {hints}.")
  settings = dict(fields, **given)
  settings["patch_size"] = _pair(settings["patch_size"])
  if settings["mlp_dim"] is None:
    settings["mlp_dim"] = 4 * settings["width"]
  return settings


def dataclass_settings(module_class, settings: Mapping[str, Any], name: str,
                       ignore: Sequence[str] = ("family",)) -> dict[str, Any]:
  """A model class's settings with its defaults filled in; keys in `ignore` are dropped, others it does
  not know are refused."""
  fields = {k: f.default for k, f in module_class.__dataclass_fields__.items() if k not in ("parent", "name")}
  given = {k: v for k, v in settings.items() if k not in ignore}
  unknown = sorted(set(given) - set(fields))
  if unknown:
    raise ValueError(f"Unknown {name} setting(s) {unknown}.")
  return dict(fields, **given)


def _pair(v) -> tuple[int, int]:
  return (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(a) for a in v)  # type: ignore[return-value]


def num_prefix_tokens(settings: Mapping[str, Any]) -> int:
  """Class and distillation tokens in front of the patch tokens."""
  from vit_jax.models.vit import has_class_token

  cls = has_class_token(settings["pool_type"], settings.get("class_token"))
  return int(cls) + int(bool(settings["distilled"]))


def has_final_norm(settings: Mapping[str, Any]) -> bool:
  """Whether the encoder ends with `Transformer/encoder_norm` (see `VisionTransformer.final_norm`)."""
  if settings.get("final_norm") is not None:
    return bool(settings["final_norm"])
  return settings.get("norm", "pre") == "pre" and not settings.get("fc_norm")


def unrolled(params: Mapping[str, Any]) -> dict[str, Any]:
  """A plain nested dict of numpy arrays with `encoderblock_{i}` entries (scanned trees are split)."""
  return scan_to_unrolled(host(params))


def scanned(params: Mapping[str, Any]) -> dict[str, Any]:
  """A plain nested dict of numpy arrays with the blocks stacked under `encoderblock`."""
  return unrolled_to_scan(unrolled(params))


def host(tree: Mapping[str, Any]) -> dict[str, Any]:
  """A plain nested dict with numpy leaves."""
  return {k: host(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in tree.items()}


def learned_posemb(params: Mapping[str, Any]):
  """`Transformer/posembed_input/pos_embedding`, or None when the tree has no learned table."""
  return params.get("Transformer", {}).get("posembed_input", {}).get("pos_embedding")


def blocks(params: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The encoder blocks of an unrolled tree, in order."""
  tr = params["Transformer"]
  found = sorted((int(m.group(1)), k) for k in tr if (m := _BLOCK.match(k)))
  return [tr[k] for _, k in found]


def explicit_posemb(params: Mapping[str, Any], settings: Mapping[str, Any],
                    grid: Sequence[int]) -> np.ndarray:
  """The position embedding as a `[1, prefix + h * w, width]` table in vit_jax's layout.

  Learned tables are returned as stored; fixed sin-cos tables are computed, and
  "none" gives zeros, so formats that always hold a table can represent the model.
  """
  from vit_jax.models.vit import posemb_sincos_2d

  prefix, width = num_prefix_tokens(settings), settings["width"]
  if settings["posemb"] == "learn":
    return np.asarray(learned_posemb(params))
  if settings["posemb"] == "sincos2d":
    return np.asarray(posemb_sincos_2d(grid[0], grid[1], width, prefix_tokens=prefix))
  return np.zeros((1, prefix + grid[0] * grid[1], width), np.float32)


def grid_of(settings: Mapping[str, Any], image_size: Sequence[int] | int) -> tuple[int, int]:
  """The patch grid of `image_size` (int or (h, w)) under the settings' patch size."""
  ph, pw = settings["patch_size"]
  h, w = _pair(image_size)
  if h % ph or w % pw:
    raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {ph}x{pw}.")
  return h // ph, w // pw


def patch_grid(params: Mapping[str, Any], settings: Mapping[str, Any],
               image_size: Sequence[int] | int | None = None) -> tuple[int, int]:
  """The (rows, columns) patch grid: from the image size, or else from a square position embedding."""
  if image_size is not None:
    grid = grid_of(settings, image_size)
    h, w = _pair(image_size)
    if settings["posemb"] == "learn":
      rows = np.shape(learned_posemb(params))[1]
      if rows != num_prefix_tokens(settings) + grid[0] * grid[1]:
        raise ValueError(f"Image size {h}x{w} gives a {grid[0]}x{grid[1]} patch grid, but the position "
                         f"embedding has {rows} rows ({num_prefix_tokens(settings)} prefix tokens): give the "
                         "image size the model was trained at.")
    return grid
  if settings["posemb"] != "learn":
    raise ValueError("The model has no learned position embedding, so the image size cannot be read from "
                     "the weights: give it explicitly (image_size / --image_size).")
  rows = np.shape(learned_posemb(params))[1]
  return square_grid(rows - num_prefix_tokens(settings))


def infer_settings(params: Mapping[str, Any]) -> dict[str, Any]:
  """The model settings that a parameter tree (ours, scanned or not) determines.

  Read from shapes: width, depth, heads, MLP width, patch size, channels, stem,
  pooling (`fc_norm`: "gap" after the norm, keeping any class token; class
  token: "token"; MAP head; else "gap"), distillation, representation
  size, classes, qkv bias, LayerScale, gated MLP, token head, the position encoding (learned table,
  PEG, else sin-cos) and the block options (parallel, QK-norm, RMSNorm, output biases, talking
  heads).  What weights cannot tell
  (activation, norm placement, LayerNorm epsilon) keeps the model defaults,
  which are those of the published vit_jax / big_vision checkpoints.
  """
  p = unrolled(params)
  bl = blocks(p)
  if "embedding" not in p or not bl:
    raise ValueError("Not a ViT parameter tree: expected 'embedding' and 'Transformer/encoderblock_*'; "
                     f"found top-level keys {sorted(p)}.")
  kh, kw, cin, width = p["embedding"]["kernel"].shape
  attn, mlp = bl[0]["MultiHeadDotProductAttention_0"], bl[0]["MlpBlock_0"]
  s: dict[str, Any] = dict(width=int(width), depth=len(bl), num_heads=int(attn["query"]["kernel"].shape[1]),
                           mlp_dim=int(mlp["Dense_0"]["kernel"].shape[1]), patch_size=(int(kh), int(kw)),
                           channels=int(cin), qkv_bias="bias" in attn["query"])
  if "stem" in p:
    convs = sorted(k for k in p["stem"] if k.startswith("Conv_"))
    s.update(stem="conv", stem_width=int(p["stem"][convs[-1]]["kernel"].shape[-1]), channels=int(
        p["stem"][convs[0]]["kernel"].shape[2]), patch_size=(2 * int(kh), 2 * int(kw)))
  if "fc_norm" in p:
    s.update(pool_type="gap", fc_norm=True, class_token="cls" in p)
  else:
    s["pool_type"] = "token" if "cls" in p else "map" if "MAPHead_0" in p else "gap"
  s["distilled"] = "dist_token" in p
  if "encoder_norm" not in p["Transformer"] and not s.get("fc_norm"):
    s["final_norm"] = False
  s["posemb"] = "learn" if learned_posemb(p) is not None else "peg" if "posembed_peg" in p["Transformer"] \
      else "sincos2d"
  s["parallel"] = "LayerNorm_1" not in bl[0]
  s["norm_type"] = "layernorm" if "bias" in bl[0]["LayerNorm_0"] else "rmsnorm"
  s["proj_bias"] = "bias" in attn["out"]
  s["talking_heads"] = "talking_heads_pre" in attn
  if "query_norm" in attn:
    s["qk_norm"] = "layernorm" if "bias" in attn["query_norm"] else "rmsnorm"
  if "kernel" in p.get("pre_logits", {}):
    s["representation_size"] = int(p["pre_logits"]["kernel"].shape[1])
  s["num_classes"] = int(p["head"]["kernel"].shape[1]) if "head" in p else None
  s["token_head"] = "aux_head" in p
  if "LayerScale_0" in bl[0]:
    s["layer_scale_init"] = 1e-5  # any value: it only sets the initial gamma
  if "Dense_gate" in mlp:
    s["activation"] = "swiglu"
  return model_settings(s)


# ---------------------------------------------------------------------------
# torch tensor layouts: Linear.weight is (out, in), Conv2d.weight is OIHW.
# ---------------------------------------------------------------------------

def contiguous(a) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a, np.float32))


def torch_linear(dense: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """flax Dense {kernel [in, out], bias} -> torch Linear {weight [out, in], bias}."""
  out = {"weight": contiguous(np.asarray(dense["kernel"]).T)}
  if "bias" in dense:
    out["bias"] = contiguous(dense["bias"])
  return out


def torch_heads_in(proj: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Per-head projection {kernel [D, H, Dh], bias [H, Dh]} -> Linear {weight [H*Dh, D], bias [H*Dh]}."""
  k = np.asarray(proj["kernel"])
  out = {"weight": contiguous(k.reshape(k.shape[0], -1).T)}
  if "bias" in proj:
    out["bias"] = contiguous(np.asarray(proj["bias"]).reshape(-1))
  return out


def torch_heads_out(proj: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Output projection {kernel [H, Dh, D], bias [D]} -> Linear {weight [D, H*Dh], bias [D]}."""
  k = np.asarray(proj["kernel"])
  out = {"weight": contiguous(k.reshape(-1, k.shape[-1]).T)}
  if "bias" in proj:
    out["bias"] = contiguous(proj["bias"])
  return out


def torch_norm(ln: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """LayerNorm {scale, bias} -> {weight, bias}; RMSNorm {scale} -> {weight}."""
  out = {"weight": contiguous(ln["scale"])}
  if "bias" in ln:
    out["bias"] = contiguous(ln["bias"])
  return out


def torch_conv(conv: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """flax Conv {kernel HWIO, bias} -> torch Conv2d {weight OIHW, bias}."""
  out = {"weight": contiguous(np.asarray(conv["kernel"]).transpose(3, 2, 0, 1))}
  if "bias" in conv:
    out["bias"] = contiguous(conv["bias"])
  return out


def write_folder(out_dir, state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> str:
  """`out_dir/model.safetensors` (torch names, float32) + `out_dir/config.json`; returns out_dir.

  `out_dir` may be local or on an object store (gs://...); each file is written atomically.
  """
  import json
  import os

  from safetensors.numpy import save

  from vit_jax.files import path, write_atomic

  out = path(out_dir)
  write_atomic(out / "model.safetensors", save(dict(state_dict), metadata={"format": "pt"}))
  write_atomic(out / "config.json", json.dumps(config, indent=2))
  return os.fspath(out)


def named(prefix: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {f"{prefix}.{k}": v for k, v in tensors.items()}


# The block options of ViT-22B and CaiT, at the values of the plain ViT block (for `require`).
PLAIN_BLOCKS = dict(qk_norm=(None,), talking_heads=(False,), parallel=(False,), proj_bias=(True,),
                    norm_type=("layernorm",))


def require(settings: Mapping[str, Any], target: str, **allowed: Sequence[Any]) -> None:
  """Fail naming every setting whose value `target` cannot represent."""
  bad = [f"{k}={settings[k]!r} (supported: {', '.join(map(repr, v))})" for k, v in allowed.items()
         if settings[k] not in v]
  if bad:
    raise ValueError(f"{target} cannot represent this model: {'; '.join(bad)}.")
