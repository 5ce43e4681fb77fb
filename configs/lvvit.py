"""LV-ViT (Jiang et al. 2021): token labeling from a teacher's dense score maps, with MixToken.

    python main.py --workdir workdirs/teacher                 # the teacher: the demo ViT on the digits
    python -m vit_jax.data.score_maps --teacher workdirs/teacher --out workdirs/teacher/score_maps
    python main.py --config configs/lvvit.py:score_maps=workdirs/teacher/score_maps --workdir workdirs/lvvit
  Trains a small LV-ViT (conv stem, 2x2 patches, width 64, depth 4, MLP ratio 3, no qkv bias, residual
  scaling 2, token head) on the digits with the class-token loss plus 0.5 x the token-labeling loss and
  MixToken.  Without `score_maps` the same model (without the token head) trains on the labels only.

    python main.py --config configs/lvvit.py:variant=LV-ViT-S,dataset=imagenet2012,score_maps=DIR \
        --workdir workdirs/lvvit_s
  The reference recipe: AdamW, lr 1.6e-3 x batch / 1024, weight decay 0.05, 5 warmup epochs then cosine to
  1e-5 over 300 epochs, batch 1024, drop path 0.1 (T, S) / 0.2 (M) / 0.3 (L), label smoothing 0.1 on the
  targets, EMA 0.99992, no mixup / CutMix (MixToken replaces them), token-loss weight 0.5.
"""

from __future__ import annotations

import ml_collections

from configs import vit
from configs.common import parse_arg
from configs.models import family_settings

DROP_PATH = {"T": 0.1, "S": 0.1, "M": 0.2, "L": 0.3}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, variant="digits", dataset="digits", score_maps="", runlocal=False)
  base = "digits" if a.variant == "digits" else "B/16"
  c = vit.get_config(f"variant={base},dataset={a.dataset}" + (",runlocal" if a.runlocal else ""))
  labeled = bool(a.score_maps)
  c.task = "token_label" if labeled else "classification"
  c.data.score_maps = a.score_maps
  c.token_label = ml_collections.ConfigDict(dict(beta=0.5, mixtoken=True, ground_truth=False, label_smoothing=0.1))
  if a.variant == "digits":
    c.model = ml_collections.ConfigDict(dict(
        width=64, depth=4, mlp_dim=192, num_heads=4, patch_size=2, stem="conv", stem_width=32, channels=1,
        pool_type="token", qkv_bias=False, residual_scale=2.0, layer_norm_eps=1e-5, activation="gelu",
        token_head=labeled, drop_path_rate=0.1))
    if not a.runlocal:
      c.total_steps, c.eval_steps, c.checkpoint_steps = 800, 800, 800
    return c
  size = a.variant.rsplit("-", 1)[-1]
  c.model = ml_collections.ConfigDict(dict(family_settings(a.variant), drop_path_rate=DROP_PATH.get(size, 0.1)))
  c.model.token_head = labeled
  c.batch_size = c.eval_batch_size = 1024
  c.total_epochs, c.total_steps = 300, None
  c.optim.update(dict(name="adamw", lr=4e-4, scale_lr_by_batch=True, weight_decay=0.05, clip_norm=0.0))
  c.optim.schedule.update(dict(warmup_epochs=5, warmup_steps=None, decay="cosine", min_lr=1e-5))
  c.label_smoothing = 0.1
  c.mixup.update(dict(mixup_alpha=0.0, cutmix_alpha=0.0))
  # The paper's RandAugment warps the score maps with the image; crop boxes (`geometry`) cannot follow a
  # rotation or shear, so with score maps the images get crops, flips and random erasing only.
  randaug = "" if labeled else "randaug(2, 9, magnitude_std=0.5, policy='timm')|"
  c.data.pp_train = (f"decode|inception_crop({c.data.image_size}, area_min=8)|flip_lr|{randaug}"
                     "value_range(-1, 1)|random_erase(0.25)")
  c.ema_decay = 0.99992
  return c
