"""Swin Transformer V1 / V2 (Liu et al. 2021, 2022) with the one trainer.

    python main.py --config configs/swin.py --workdir workdirs/swin_digits
  A small Swin on the bundled 8x8 digits: one pixel per patch (an 8x8 map), window 4, three stages
  (2 + 2 + 2 blocks, 2 / 4 / 8 heads, 32 / 64 / 128 channels on 8x8 / 4x4 / 2x2 maps; the last two
  are one unshifted window each), shifted windows in every second block of the first stage, 2000
  steps (about 5 minutes on 2 CPU cores).
  `version=2` trains the V2 block (residual post-norm, cosine attention, continuous position bias).

    python main.py --config configs/swin.py:teacher=workdirs/teacher,distill=hard --workdir workdirs/swin_kd
  DeiT-style distillation (`distill=hard` or `soft`) from any classifier our loaders read, trained on
  the same labels (here the demo ViT of `python main.py --workdir workdirs/teacher`).  Swin has no
  distillation token, so its one class head takes both terms: 1/2 cross-entropy with the labels plus
  1/2 with the teacher's argmax (hard), or (1 - alpha) CE + alpha tau^2 KL (soft), as DeiT's
  class-token-only ablation.  The teacher may itself be a Swin.

    python main.py --config configs/swin.py:variant=Swin-T,dataset=imagenet2012 --workdir workdirs/swin_t
  The paper's ImageNet-1k recipe: AdamW, lr 1e-3 at batch 1024 (5e-4 x batch / 512), weight decay
  0.05, 20 warmup epochs then cosine to 5e-6, 300 epochs, gradient clipping at 5, label smoothing
  0.1, RandAugment (timm's rand-m9-mstd0.5-inc1), random erasing 0.25, mixup 0.8 / CutMix 1.0,
  drop path 0.2 / 0.3 / 0.5 (T / S / B).  Reported top-1 at 224 px: Swin-T 81.3, Swin-S 83.0, Swin-B
  83.5 (Swin-B at 384 px, `variant=Swin-B-w12`: 84.5).  SwinV2 names (`SwinV2-T`, `-S`, `-B`, window 8; `-w16`)
  train at 256 px.
"""

from __future__ import annotations

import ml_collections

from configs import vit
from configs.common import distillation, parse_arg
from configs.models import swin_settings


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, variant="digits", dataset="digits", version=1, teacher="", distill="none", runlocal=False)
  if a.variant == "digits":
    c = vit.get_config(f"variant=digits,dataset={a.dataset}" + (",runlocal" if a.runlocal else ""))
    distillation(c, a.teacher, a.distill, "configs/swin.py")
    if int(a.version) not in (1, 2):
      raise ValueError(f"version={a.version!r}: choose 1 or 2.")
    c.model = ml_collections.ConfigDict(dict(
        family="swin", version=int(a.version), patch_size=1, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8),
        window_size=4, channels=1, drop_path_rate=0.1))
    if not a.runlocal:
      c.total_steps, c.eval_steps, c.checkpoint_steps = 2000, 1000, 1000
    return c
  settings = swin_settings(a.variant)
  if settings is None:
    raise ValueError(f"configs/swin.py takes a Swin variant (Swin-T, SwinV2-B, ...) or 'digits', got {a.variant!r}.")
  c = vit.get_config(f"variant=B/16,dataset={a.dataset}" + (",runlocal" if a.runlocal else ""))
  distillation(c, a.teacher, a.distill, "configs/swin.py")
  c.model = ml_collections.ConfigDict(settings)
  size = 384 if settings["window_size"] == 12 else 256 if settings["version"] == 2 else 224
  c.data.image_size = size
  c.data.pp_train = vit.PP_DEIT_TRAIN.format(s=size)  # Swin trains with DeiT's augmentation
  c.data.pp_eval = vit.PP_IMAGENET["pp_eval"].format(s=size, r=size * 8 // 7)
  c.batch_size = c.eval_batch_size = 1024
  c.total_epochs, c.total_steps = 300, None
  c.optim.update(dict(name="adamw", lr=2.5e-4, scale_lr_by_batch=True, weight_decay=0.05, clip_norm=5.0))
  c.optim.schedule.update(dict(warmup_epochs=20, warmup_steps=None, decay="cosine", min_lr=5e-6))
  c.label_smoothing = 0.1
  c.mixup.update(dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5))
  return c
