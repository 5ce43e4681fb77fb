"""DeiT (Touvron et al. 2021): distillation from a teacher through a distillation token.

    python main.py --workdir workdirs/teacher                 # the teacher: the demo ViT on the digits
    python main.py --config configs/deit.py:teacher=workdirs/teacher --workdir workdirs/deit_digits
  Distils a DeiT student (the demo's size without its conv stem: 2x2 patches, width 64, depth 4; class
  and distillation tokens, two heads) from that teacher with hard distillation, 1200 steps with the
  paper's mixup / CutMix (RandAugment and random erasing belong to the ImageNet recipe below; the
  8x8 digits keep the demo's 1-pixel shifts); `distill=soft` uses the soft (KL, temperature) form,
  and `distill=none` trains the same student without a distillation token or teacher.

    python main.py --config configs/deit.py:variant=DeiT-S,dataset=imagenet2012,teacher=TEACHER.npz \
        --workdir workdirs/deit_s
  The paper's recipe: AdamW, lr 5e-4 x batch / 512, weight decay 0.05, 5 warmup epochs then cosine to
  1e-5, 300 epochs at batch 1024, drop path 0.1, label smoothing 0.1, RandAugment (timm's
  rand-m9-mstd0.5-inc1), random erasing 0.25, mixup 0.8 / CutMix 1.0, repeated augmentation x3, EMA
  0.99996.  The teacher is any classifier our code loads (our checkpoint or a published .npz) trained
  on the same labels; it sees the same augmented, mixed batch in inference mode.  The paper's
  RegNetY-16GF teacher is a convnet this code base does not implement.
"""

from __future__ import annotations

import ml_collections

from configs import vit
from configs.common import distillation, parse_arg
from configs.models import family_settings


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, variant="digits", dataset="digits", teacher="", distill="hard", runlocal=False)
  base = "digits" if a.variant == "digits" else "B/16"
  c = vit.get_config(f"variant={base},dataset={a.dataset}" + (",runlocal" if a.runlocal else ""))
  distilled = distillation(c, a.teacher, a.distill, "configs/deit.py")
  if a.variant == "digits":
    c.model = ml_collections.ConfigDict(dict(
        width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=2, channels=1, pool_type="token",
        distilled=distilled, activation="gelu", drop_path_rate=0.1))
    c.mixup.update(dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5))  # as in the paper's recipe
    if a.distill == "soft":  # with 10 classes and a ~98% teacher, alpha 0.1 barely moves the loss
      c.distill.update(alpha=0.5, tau=2.0)
    if not a.runlocal:
      c.total_steps, c.eval_steps, c.checkpoint_steps = 1200, 1200, 1200
    return c
  c.model = ml_collections.ConfigDict(dict(family_settings(a.variant), activation="gelu", drop_path_rate=0.1))
  c.model.distilled = distilled
  c.batch_size = c.eval_batch_size = 1024
  c.total_epochs, c.total_steps = 300, None
  c.optim.update(dict(name="adamw", lr=2.5e-4, scale_lr_by_batch=True, weight_decay=0.05, clip_norm=0.0))
  c.optim.schedule.update(dict(warmup_epochs=5, warmup_steps=None, decay="cosine", min_lr=1e-5))
  c.label_smoothing = 0.1
  c.mixup.update(dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5))
  c.data.repeated_augmentation = 3
  c.data.pp_train = vit.PP_DEIT_TRAIN.format(s=c.data.image_size)
  c.ema_decay = 0.99996
  return c
