"""The papers' own PyTorch releases: MAE (He et al. 2021) and LV-ViT (Jiang et al. 2021).

Their files use timm's ViT names (the releases were built on timm 0.3.2 / 0.4.5) plus their
own modules, wrapped in `{"model": ...}` (MAE, DeiT) or saved bare / under "state_dict" (LV-ViT):

| file | keys besides timm's ViT names | becomes |
|---|---|---|
| `mae_pretrain_vit_{base,large,huge}.pth` | none; `pos_embed` is the fixed sin-cos table, `norm.*` may be absent, no head | a headless ViT encoder: posemb="sincos2d" (final_norm=False without `norm`) |
| `mae_pretrain_vit_*_full.pth`, `mae_visualize_vit_*.pth` | `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.{i}`, `decoder_norm`, `decoder_pred` | a `MaskedAutoencoder` (norm_pix_loss: True for `_full`, False for `visualize`; not in the weights) |
| `mae_finetuned_vit_*.pth` | `fc_norm` instead of `norm` | a ViT with pool_type="gap", fc_norm=True, class_token=True |
| `deit_*_patch16_224-*.pth` | `dist_token`, `head_dist` (distilled) | a ViT (distilled=True) |
| `lvvit_{t,s,m,l}-*.pth.tar` | `patch_embed.{conv1,bn1,conv2,bn2,conv3,bn3}` (BatchNorm with running statistics), `aux_head`; no qkv bias | an LV-ViT: stem="conv", token_head=True, LayerNorm eps 1e-5, exact GELU |

What the weights cannot show comes from the architecture's published table, or from `args`:
heads (`num_heads`; ViT: 64 per head, H: 16; LV-ViT: 4 / 6 / 8 / 12), LV-ViT's residual scaling
(`residual_scale` = the reference code's `skip_lam`: T 1, S 2, M 2, L 3), MAE's decoder heads
(`decoder_heads`, 16 in every released model) and `norm_pix_loss`.

The exporters here write those names (`mae_state_dict`, `lvvit_state_dict`), and importing is
their traced inverse (`torch_import.import_state_dict`), as for timm and Hugging Face.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from vit_jax.interop import common, timm_export
from vit_jax.interop.common import contiguous, named, torch_conv, torch_linear, torch_norm
from vit_jax.interop.tree import ParamMismatchError

# ------------------------------------------------------------------------------------------ MAE

MAE_DECODER_HEADS = 16  # every released MAE decoder: 512 wide, 8 blocks, 16 heads


def mae_encoder_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
  """The `VisionTransformer` settings of a `MaskedAutoencoder`'s encoder (what its names share)."""
  return common.model_settings(
      width=settings["width"], depth=settings["depth"], num_heads=settings["num_heads"],
      mlp_dim=settings.get("mlp_dim") or 4 * settings["width"], patch_size=settings["patch_size"],
      channels=settings.get("channels", 3), activation=settings.get("activation", "gelu"),
      layer_norm_eps=settings.get("layer_norm_eps", 1e-6), posemb="sincos2d", pool_type="token", num_classes=None)


def mae_state_dict(params: Mapping[str, Any], settings: Mapping[str, Any], grid: Sequence[int]) -> dict:
  """Our `MaskedAutoencoder` tree -> the MAE release's names (`mae_visualize_vit_*.pth`), tables included."""
  from vit_jax.models.vit import posemb_sincos_2d

  p = common.unrolled(params)
  sd = timm_export.names(p, mae_encoder_settings(settings), grid)
  sd.update(named("decoder_embed", torch_linear(p["decoder_embed"])))
  sd["mask_token"] = contiguous(p["mask_token"])
  width = int(np.shape(p["decoder_embed"]["kernel"])[1])
  sd["decoder_pos_embed"] = contiguous(posemb_sincos_2d(grid[0], grid[1], width, prefix_tokens=1))
  for i, blk in enumerate(common.blocks({"Transformer": p["Decoder"]})):
    sd.update(timm_export.block_names(f"decoder_blocks.{i}", blk))
  sd.update(named("decoder_norm", torch_norm(p["Decoder"]["encoder_norm"])))
  sd.update(named("decoder_pred", torch_linear(p["decoder_pred"])))
  return sd


def mae_settings(sd: Mapping[str, np.ndarray], args: Mapping[str, Any] | None = None
                 ) -> tuple[dict[str, Any], tuple[int, int] | None]:
  """`MaskedAutoencoder` settings and patch grid of an MAE release with its decoder."""
  from vit_jax.interop.torch_import import count_blocks, heads_of, square_grid_of

  args = dict(args or {})
  width, channels, ph, pw = np.shape(sd["patch_embed.proj.weight"])
  if ph != pw:
    raise ParamMismatchError(f"MAE uses square patches; the file's are {ph}x{pw}.")
  depth, decoder_depth = count_blocks(sd, "blocks."), count_blocks(sd, "decoder_blocks.")
  if not depth or not decoder_depth:
    raise ParamMismatchError("Not an MAE state dict: it needs blocks.* and decoder_blocks.*.")
  decoder_width = int(np.shape(sd["decoder_embed.weight"])[0])
  settings = dict(
      patch_size=int(ph), width=int(width), depth=depth, num_heads=heads_of(int(width), args.get("num_heads")),
      mlp_dim=int(np.shape(sd["blocks.0.mlp.fc1.weight"])[0]), decoder_width=decoder_width,
      decoder_depth=decoder_depth, decoder_heads=int(args.get("decoder_heads") or MAE_DECODER_HEADS),
      decoder_mlp_dim=int(np.shape(sd["decoder_blocks.0.mlp.fc1.weight"])[0]),
      norm_pix_loss=bool(args.get("norm_pix_loss", False)), channels=int(channels), activation="gelu",
      layer_norm_eps=1e-6)
  if "mask_ratio" in args:
    settings["mask_ratio"] = float(args["mask_ratio"])
  tokens = int(np.shape(sd["pos_embed"])[1]) - 1 if "pos_embed" in sd else 0
  return settings, square_grid_of(tokens, args.get("img_size"), (ph, pw))


# --------------------------------------------------------------------------------------- LV-ViT

LVVIT = {  # (width, depth) -> heads, skip_lam of the reference code's lvvit_t / _s / _m / _l
    (240, 12): (4, 1.0), (384, 16): (6, 2.0), (512, 20): (8, 2.0), (768, 24): (12, 3.0)}


def lvvit_state_dict(variables: Mapping[str, Any], settings: Mapping[str, Any],
                     grid: Sequence[int]) -> dict[str, np.ndarray]:
  """Our LV-ViT variables {"params", "batch_stats"} -> the LV-ViT release's names."""
  s = common.model_settings(settings)
  common.require(s, "The LV-ViT release", stem=("conv",), token_head=(True,), pool_type=("token",),
                 distilled=(False,), norm=("pre",), representation_size=(None, 0), final_norm=(None, True),
                 layer_scale_init=(None,), activation=("gelu",), posemb=("learn",), **common.PLAIN_BLOCKS)
  p, stats = common.unrolled(variables["params"]), variables["batch_stats"]
  sd = timm_export.names(p, s, grid)  # patch_embed.proj, cls_token, pos_embed, blocks, norm, head
  for i in range(3):
    sd[f"patch_embed.conv{i + 1}.weight"] = torch_conv(p["stem"][f"Conv_{i}"])["weight"]
    bn, running = p["stem"][f"BatchNorm_{i}"], stats["stem"][f"BatchNorm_{i}"]
    sd.update(named(f"patch_embed.bn{i + 1}", dict(torch_norm(bn), running_mean=contiguous(running["mean"]),
                                                    running_var=contiguous(running["var"]))))
  sd.update(named("aux_head", torch_linear(p["aux_head"])))
  return sd


LVVIT_IGNORED = r"^patch_embed\.bn\d\.num_batches_tracked$"  # a counter; Flax's BatchNorm keeps none


def lvvit_settings(sd: Mapping[str, np.ndarray], args: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, Any], tuple[int, int] | None]:
  """LV-ViT settings and patch grid of a TokenLabeling state dict."""
  from vit_jax.interop.torch_import import count_blocks, square_grid_of

  args = dict(args or {})
  width, stem_width, kh, kw = np.shape(sd["patch_embed.proj.weight"])
  depth = count_blocks(sd, "blocks.")
  heads, skip = LVVIT.get((int(width), depth), (None, None))
  heads = args.get("num_heads") or heads
  skip = args.get("residual_scale") or skip or (1.0 if args.get("weights_only") else None)
  if heads is None or skip is None:
    raise ParamMismatchError(
        f"An LV-ViT of width {width} and depth {depth} is none of the released T/S/M/L: give num_heads and "
        "residual_scale (the reference code's skip_lam), e.g. --config num_heads=6,residual_scale=2.")
  if "aux_head.weight" not in sd or "head.weight" not in sd:
    raise ParamMismatchError("The LV-ViT file has no head/aux_head: only the released classifiers are read.")
  settings = common.model_settings(
      width=int(width), depth=depth, num_heads=int(heads), residual_scale=float(skip),
      mlp_dim=int(np.shape(sd["blocks.0.mlp.fc1.weight"])[0]), patch_size=(2 * int(kh), 2 * int(kw)),
      channels=int(np.shape(sd["patch_embed.conv1.weight"])[1]), stem="conv", stem_width=int(stem_width),
      qkv_bias="blocks.0.attn.qkv.bias" in sd, layer_norm_eps=1e-5, activation="gelu", token_head=True,
      num_classes=int(np.shape(sd["head.weight"])[0]), pool_type="token")
  tokens = int(np.shape(sd["pos_embed"])[1]) - 1
  return settings, square_grid_of(tokens, args.get("img_size"), (2 * kh, 2 * kw))
