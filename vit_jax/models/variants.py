"""The ViT family by variant string: "Ti/16", "B/16", "L/14", "g/14", ...

A variant is `<size>/<patch>`: the size fixes width, depth, MLP width and heads
(ViT paper, Table 1, and the later S, M, g, G sizes of big_vision / "Scaling
Vision Transformers"); the patch is any positive integer, or `HxW` for
rectangular patches ("B/16x8").  The published vit_jax names ("ViT-B_16") are
accepted too.

    >>> cfg = get_config("B/16", num_classes=10)
    >>> model = create_model("B/16", num_classes=10)

Named family members are accepted as well: "DeiT-Ti" / "DeiT-S" / "DeiT-B" (the
ViT sizes at patch 16; "DeiT-B-distilled" adds the distillation token) and
"LV-ViT-T" / "-S" / "-M" / "-L" (conv stem, MLP ratio 3, no qkv bias, residual
scaling, LayerNorm eps 1e-5 and the token-labeling head), and "CPVT-Ti" / "-S" / "-B" (DeiT's
sizes with CPVT's position encoding generator; "-GAP": mean pooling without a class token).  Swin names ("Swin-T", "SwinV2-B-w16",
...; `swin_settings`) give `SwinTransformer` settings with `family="swin"`, and CaiT names
("CaiT-XXS-24" ... "CaiT-M-48"; `cait_settings`) `CaiT` settings with `family="cait"`.

`python -m configs.models` prints the model-zoo table of the README.  The table lives in the
package (configs import it from here), so an installed vit_jax resolves variant names without the
repository's configs/.
"""

from __future__ import annotations

import re
from typing import Any

import ml_collections

SIZES: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16),
}

# LV-ViT (Jiang et al. 2021, reference code lvvit_*): patch 16 through the conv stem.
LVVIT: dict[str, dict[str, Any]] = {
    "T": dict(width=240, depth=12, num_heads=4, residual_scale=1.0, stem_width=64),
    "S": dict(width=384, depth=16, num_heads=6, residual_scale=2.0, stem_width=64),
    "M": dict(width=512, depth=20, num_heads=8, residual_scale=2.0, stem_width=64),
    "L": dict(width=768, depth=24, num_heads=12, residual_scale=3.0, stem_width=128),
}
DEIT = {"Ti": "Ti/16", "S": "S/16", "B": "B/16"}

# Swin (Liu et al. 2021, Table 1 / reference configs) and Swin V2 (2022): C, depths, heads.
SWIN: dict[str, dict[str, Any]] = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
SWIN_DROP_PATH = {"T": 0.2, "S": 0.3, "B": 0.5, "L": 0.2}  # the ImageNet-1k recipes (L: its 22k recipe)
_SWIN = re.compile(r"^Swin(?P<v2>V2)?-(?P<size>[TSBL])(?:-w(?P<window>\d+))?$")


def swin_settings(variant: str) -> dict[str, Any] | None:
  """`SwinTransformer` settings of "Swin-T" / "-S" / "-B" / "-L" (window 7; "-w12": window 12, for 384 px)
  and "SwinV2-T" / "-S" / "-B" (window 8 at 256 px; "-w16"), with `family="swin"`; None for other names."""
  m = _SWIN.match(variant.strip())
  if not m:
    if variant.strip().startswith("Swin"):
      raise ValueError(f"Unknown variant {variant!r}: choose Swin-T/S/B/L or SwinV2-T/S/B, optionally with a "
                       "window suffix such as '-w12'.")
    return None
  v2, size = bool(m.group("v2")), m.group("size")
  if v2 and size == "L":
    raise ValueError("SwinV2-L was released only pre-trained at window 12 on ImageNet-22k; build it with "
                     "family='swin', version=2 and the Swin-L sizes.")
  window = int(m.group("window") or (8 if v2 else 7))
  return dict(SWIN[size], family="swin", version=2 if v2 else 1, window_size=window, patch_size=4,
              drop_path_rate=SWIN_DROP_PATH[size])

# CaiT (Touvron et al. 2021, timm's cait_*): width, depth, heads, LayerScale init, released resolution.
CAIT: dict[str, dict[str, Any]] = {
    "XXS-24": dict(width=192, depth=24, num_heads=4, layer_scale_init=1e-5, resolution=224),
    "XXS-36": dict(width=192, depth=36, num_heads=4, layer_scale_init=1e-5, resolution=224),
    "XS-24": dict(width=288, depth=24, num_heads=6, layer_scale_init=1e-5, resolution=384),
    "S-24": dict(width=384, depth=24, num_heads=8, layer_scale_init=1e-5, resolution=224),
    "S-36": dict(width=384, depth=36, num_heads=8, layer_scale_init=1e-6, resolution=384),
    "M-36": dict(width=768, depth=36, num_heads=16, layer_scale_init=1e-6, resolution=384),
    "M-48": dict(width=768, depth=48, num_heads=16, layer_scale_init=1e-6, resolution=448),
}


def cait_settings(variant: str) -> dict[str, Any] | None:
  """`CaiT` settings of "CaiT-XXS-24" ... "CaiT-M-48" (patch 16) with `family="cait"`; None for other names.
  The released resolution is `CAIT[size]["resolution"]`."""
  name = variant.strip()
  if not name.startswith("CaiT"):
    return None
  size = name[len("CaiT-"):]
  if size not in CAIT:
    raise ValueError(f"Unknown variant {variant!r}: choose one of {', '.join('CaiT-' + k for k in CAIT)}.")
  return dict({k: v for k, v in CAIT[size].items() if k != "resolution"}, family="cait", patch_size=16)


_VARIANT = re.compile(r"^(?:ViT-)?(?P<size>[A-Za-z]+)[/_](?P<ph>\d+)(?:x(?P<pw>\d+))?$")


def decode_variant(variant: str) -> dict[str, Any]:
  """`"B/16"` -> `{"width": 768, "depth": 12, "mlp_dim": 3072, "num_heads": 12, "patch_size": (16, 16)}`."""
  m = _VARIANT.match(variant.strip())
  valid = ", ".join(f"{s}/16" for s in SIZES)
  if not m or m.group("size") not in SIZES:
    raise ValueError(f"Unknown variant {variant!r}: choose one of {valid} (any patch size, e.g. "
                     f"'L/14', 'B/32', 'S/16x8').")
  ph = int(m.group("ph"))
  pw = int(m.group("pw") or ph)
  if ph <= 0 or pw <= 0:
    raise ValueError(f"Variant {variant!r} has a non-positive patch size.")
  return dict(SIZES[m.group("size")], patch_size=(ph, pw))


def family_settings(variant: str) -> dict[str, Any]:
  """Model settings of a ViT size ("B/16") or a named DeiT / CPVT / LV-ViT member."""
  name = variant.strip()
  m = re.match(r"^DeiT-(Ti|S|B)(-distilled)?$", name)
  if m:
    return dict(decode_variant(DEIT[m.group(1)]), distilled=bool(m.group(2)))
  m = re.match(r"^CPVT-(Ti|S|B)(-GAP)?$", name)
  if m:  # DeiT's sizes with the PEG instead of a position table; -GAP: no class token, mean pooling
    return dict(decode_variant(DEIT[m.group(1)]), posemb="peg", activation="gelu",
                pool_type="gap" if m.group(2) else "token")
  m = re.match(r"^LV-ViT-(T|S|M|L)$", name)
  if m:
    size = LVVIT[m.group(1)]
    return dict(size, mlp_dim=3 * size["width"], patch_size=(16, 16), stem="conv", qkv_bias=False,
                layer_norm_eps=1e-5, activation="gelu", token_head=True)
  if name.startswith(("DeiT", "LV-ViT", "CPVT")):
    raise ValueError(f"Unknown variant {variant!r}: choose DeiT-Ti/S/B (optionally '-distilled'), "
                     "CPVT-Ti/S/B (optionally '-GAP') or LV-ViT-T/S/M/L.")
  return decode_variant(name)


def get_config(variant: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The `VisionTransformer` keyword arguments of a variant, as a locked ConfigDict.

  Overrides must name real model fields; a typo fails with the closest names.
  """
  from vit_jax.models.vit import VisionTransformer

  fields = set(VisionTransformer.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    import difflib
    hints = {k: difflib.get_close_matches(k, fields, n=3) for k in unknown}
    raise ValueError(f"Unknown model setting(s) {unknown}; closest valid names: {hints}.")
  cfg = ml_collections.ConfigDict(dict(family_settings(variant), **overrides))
  cfg.lock()
  return cfg


def create_model(variant: str, **overrides: Any):
  """A `VisionTransformer` for `variant` (see `get_config`), a `SwinTransformer` for a Swin name, or a
  `CaiT` for a CaiT name."""
  from vit_jax.models.vit import VisionTransformer

  swin = swin_settings(variant)
  if swin is not None:
    from vit_jax.models.swin import SwinTransformer
    swin.pop("family")
    return SwinTransformer(**dict(swin, **overrides))
  cait = cait_settings(variant)
  if cait is not None:
    from vit_jax.models.cait import CaiT
    cait.pop("family")
    return CaiT(**dict(cait, **overrides))
  return VisionTransformer(**get_config(variant, **overrides).to_dict())


ZOO = ("Ti/16", "S/16", "M/16", "B/16", "B/32", "L/16", "L/14", "H/14", "g/14", "G/14")


def count_params(variant: str, resolution: int = 224, **overrides: Any) -> int:
  """Parameters of `variant` at `resolution` px, from shapes only (nothing is allocated)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  model = create_model(variant, **overrides)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, resolution, resolution, 3))))
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes["params"]))


def zoo_table() -> str:
  """The README's Markdown table: every `ZOO` variant with its size and parameter count."""
  rows = ["| variant | width | depth | MLP | heads | params (224 px, 1000 classes) |",
          "|---|---|---|---|---|---|"]
  for v in ZOO:
    c = decode_variant(v)
    rows.append(f"| {v} | {c['width']} | {c['depth']} | {c['mlp_dim']} | {c['num_heads']} | "
                f"{count_params(v, num_classes=1000):,} |")
  return "\n".join(rows)

