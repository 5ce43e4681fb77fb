"""MAE pre-training (He et al. 2021) with the one trainer.

    python main.py --config configs/mae.py --workdir workdirs/mae_digits
  Pre-trains a small MAE (patch 2, 16 patches, 4 visible) on the bundled digits; the evaluation
  reports the reconstruction loss on the test split with a fixed mask. About a minute on 2 CPU cores.

    python main.py --config configs/mae.py:mode=finetune,init=workdirs/mae_digits,split=train[:10%] \
        --workdir workdirs/mae_digits_ft10
  Fine-tunes that encoder as a ViT classifier (mean of the patch tokens + a new `fc_norm`, layer-wise
  lr decay 0.75, drop path 0.1, label smoothing 0.1) on 10% of the digits labels; without `init` it is
  the same model from scratch.  `mode=linear_probe` freezes the encoder and trains BatchNorm (no
  affine) + a linear head on the class token with LARS.

    python main.py --config configs/mae.py:variant=B/16,dataset=imagenet2012 --workdir workdirs/mae_b16
  The paper's recipe: AdamW (0.9, 0.95), weight decay 0.05, lr 1.5e-4 x batch / 256, 40 warmup epochs
  then a half-cycle cosine, 800 epochs at batch 4096, random resized crops of scale (0.2, 1) and flips,
  norm-pix loss, the 512-wide 8-block decoder.  `decoder=512x1` picks the paper's 1-block ablation
  (ViT-L: fine-tuning 84.8 vs 84.9 top-1, linear probing 65.5 vs 73.5) at about half the step cost;
  the published recipe has no Ti / S models, so those default to a 1-block decoder narrower than the
  encoder (Ti 128, S 256), which keeps the step under a third of a supervised one (bench/mae_step.py).
"""

from __future__ import annotations

import ml_collections

from configs import vit
from configs.common import parse_arg
from configs.models import decode_variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, variant="digits", dataset="digits", runlocal=False, mode="pretrain", init="", split="train",
                decoder="")
  c = vit.get_config(f"variant={a.variant},dataset={a.dataset}" + (",runlocal" if a.runlocal else ""))
  c.data.train_split = a.split
  if a.mode in ("finetune", "linear_probe"):
    return _finetune(c, a)
  if a.mode != "pretrain":
    raise ValueError(f"Unknown mode {a.mode!r}: choose 'pretrain', 'finetune' or 'linear_probe'.")
  c.task = "mae"
  c.label_smoothing = 0.0
  c.optim.update(dict(name="adamw", b1=0.9, b2=0.95, weight_decay=0.05, lr=1.5e-4, scale_lr_by_batch=True,
                      clip_norm=0.0))
  c.optim.schedule.decay = "mae_cosine"
  if a.variant == "digits":
    c.model = ml_collections.ConfigDict(dict(
        patch_size=2, width=64, depth=4, num_heads=4, mlp_dim=128, decoder_width=32, decoder_depth=2,
        decoder_heads=4, decoder_mlp_dim=64, channels=1, mask_ratio=0.75, norm_pix_loss=False))
    c.optim.lr = 4e-3  # x 64 / 256: 1e-3 at the demo batch (a model this small takes a higher lr)
    if not a.runlocal:
      c.total_steps, c.eval_steps = 800, 400
  else:
    size = decode_variant(a.variant)
    width, depth = decoder_size(a.decoder or SMALL_DECODERS.get(a.variant.split("/")[0], "512x8"))
    c.model = ml_collections.ConfigDict(dict(
        patch_size=size["patch_size"][0], width=size["width"], depth=size["depth"], num_heads=size["num_heads"],
        mlp_dim=size["mlp_dim"], decoder_width=width, decoder_depth=depth, decoder_heads=max(1, width // 32),
        mask_ratio=0.75, norm_pix_loss=True))
    c.data.pp_train = f"decode|inception_crop({c.data.image_size}, area_min=20)|flip_lr|value_range(-1, 1)"
    c.batch_size = 4096
    c.total_epochs, c.total_steps = 800, None
    c.optim.schedule.warmup_epochs, c.optim.schedule.warmup_steps = 40, None
    c.mixup.mixup_alpha = 0.0
  return c


SMALL_DECODERS = {"Ti": "128x1", "S": "256x1"}


def decoder_size(spec: str) -> tuple[int, int]:
  """"512x8" -> (width 512, depth 8); heads are width / 32 as in the paper's 512 / 16."""
  try:
    width, depth = (int(v) for v in spec.lower().split("x"))
  except ValueError:
    raise ValueError(f"decoder={spec!r}: expected WIDTHxDEPTH, e.g. decoder=512x8.") from None
  if width < 1 or depth < 1:
    raise ValueError(f"decoder={spec!r}: width and depth must be positive.")
  return width, depth


DECODER = ("^decoder_", "^mask_token$", "^Decoder/")
FC_NORM = ("^Transformer/encoder_norm/", "^fc_norm/")  # fine-tuning pools first, then a new norm


def _finetune(c: ml_collections.ConfigDict, a) -> ml_collections.ConfigDict:
  """The MAE encoder as a ViT classifier: same names, the fixed sin-cos table, a new head."""
  pre = get_config(f"variant={a.variant},dataset={a.dataset}").model
  c.model = ml_collections.ConfigDict(dict(
      patch_size=pre.patch_size, width=pre.width, depth=pre.depth, num_heads=pre.num_heads, mlp_dim=pre.mlp_dim,
      channels=pre.get("channels", 3), stem="patch", posemb="sincos2d", pool_type="gap", class_token=True,
      fc_norm=True, activation="gelu", drop_path_rate=0.1, head_zeroinit=True))
  c.init.path = a.init
  c.init.dont_load = DECODER + FC_NORM
  c.init.reinit_head = True
  c.label_smoothing = 0.1
  c.optim.layer_decay = 0.75
  if a.mode == "linear_probe":  # frozen encoder, BatchNorm (no affine) + linear head, LARS
    c.model.update(drop_path_rate=0.0, pool_type="token", fc_norm=False, head_batchnorm=True)
    c.init.dont_load = DECODER
    c.label_smoothing = 0.0
    c.optim.update(dict(name="lars", lr=0.1, momentum=0.9, weight_decay=0.0, scale_lr_by_batch=True,
                        frozen=("^(?!head/)",), clip_norm=0.0))
    c.optim.layer_decay = None
  if a.variant != "digits":  # the paper's fine-tuning augmentation; linear probing: crops and flips only
    probe = a.mode == "linear_probe"
    c.data.pp_train = (f"decode|inception_crop({c.data.image_size}, area_min=8)|flip_lr|value_range(-1, 1)"
                       if probe else vit.PP_DEIT_TRAIN.format(s=c.data.image_size))
    c.mixup.update(dict(mixup_alpha=0.0 if probe else 0.8, cutmix_alpha=0.0 if probe else 1.0, switch_prob=0.5))
  if a.variant == "digits" and not a.runlocal:
    c.total_steps, c.eval_steps, c.checkpoint_steps = 300, 300, 300
  return c
