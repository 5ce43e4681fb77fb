"""Supervised ViT training (any variant, any image dataset).

The default is the demo: a small ViT with a convolutional stem (LV-ViT style) on
scikit-learn's bundled digits, fully offline.

    python main.py --workdir workdirs/demo
    python main.py --config configs/vit.py:dataset=digits --workdir workdirs/demo   # the same
  Expected: eval/accuracy ~0.98 on the 360 test digits after 800 steps, about a minute on 2 CPU cores.

    python main.py --config configs/vit.py:variant=Ti/16,dataset=cifar10 --workdir workdirs/ti16_cifar10
  Needs cifar10 prepared in the TFDS data dir (array_record).  224 px, AdamW, 10k steps at batch 512:
  hours on one GPU.  Add `runlocal` to shrink everything for a laptop smoke test.

    python main.py --config configs/vit.py:variant=B/16,dataset=oxford_iiit_pet,init=ViT-B_16.npz \
        --config.data.image_size=384 --workdir workdirs/b16_pets
  Fine-tunes a published checkpoint at a new resolution (head reset, position embedding resized).

AugReg ("How to train your ViT?", Steiner et al. 2021): `aug=` one of the named settings of the released
checkpoints (RandAugment layers and magnitude with AugReg's policy, mixup alpha), `do=` dropout and
`sd=` stochastic depth:

    python main.py --config configs/vit.py:aug=medium2 --workdir workdirs/digits_medium2
    python main.py --config configs/vit.py:variant=B/16,dataset=imagenet2012,aug=medium2,do=0.1,sd=0.1 ...
  ImageNet variants default to AugReg's ImageNet-1k choice (Ti/16 light0, S/32 light1, S/16, B/32, B/16,
  L/16 medium2; others light1), the digits to none.

Any field can be overridden: `--config.optim.lr=1e-3`, `--config.total_steps=2000`,
`--config.mesh="(('fsdp', -1),)"`.  Unknown names fail with the closest valid ones.
"""

from __future__ import annotations

import ml_collections

from configs.common import durations, parse_arg
from configs.models import decode_variant

PP_IMAGENET = dict(pp_train="decode|inception_crop({s})|flip_lr|{randaug}value_range(-1, 1)",
                   pp_eval="decode|resize({r})|central_crop({s})|value_range(-1, 1)")

# DeiT's training images (timm's rand-m9-mstd0.5-inc1 and random erasing 0.25 after normalisation), which
# Swin and MAE's fine-tuning use as well.  random_erase works on the normalised floats, so these images reach
# the device as float32 rather than uint8.
PP_DEIT_TRAIN = ("decode|inception_crop({s}, area_min=8)|flip_lr|randaug(2, 9, magnitude_std=0.5, policy='timm')"
                 "|value_range(-1, 1)|random_erase(0.25)")

# AugReg's named settings: (RandAugment (layers, magnitude) or None, mixup alpha).  "light0" is RandAugment
# at magnitude 0, which AugReg's policy does not make the identity (enhance factor 0.1, posterize to 0 bits).
AUGREG = {
    "none": (None, 0.0),
    "light0": ((2, 0), 0.0),
    "light1": ((2, 10), 0.2),
    "medium1": ((2, 15), 0.2),
    "medium2": ((2, 15), 0.5),
    "strong1": ((2, 20), 0.5),
    "strong2": ((2, 20), 0.8),
}
AUGREG_I1K = {"Ti/16": "light0", "S/32": "light1", "S/16": "medium2", "B/32": "medium2", "B/16": "medium2",
              "L/16": "medium2"}


def augreg(name: str) -> tuple[str, float]:
  """(the `randaug(...)|` step for pp_train, or "", mixup alpha) of an AugReg setting."""
  if name not in AUGREG:
    raise ValueError(f"Unknown AugReg setting aug={name!r}: choose one of {list(AUGREG)}.")
  layers_magnitude, alpha = AUGREG[name]
  step = f"randaug({layers_magnitude[0]}, {layers_magnitude[1]})|" if layers_magnitude else ""
  return step, alpha


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, variant="digits", dataset="digits", init="", aug="", do=-1.0, sd=-1.0, runlocal=False)
  aug = arg.aug or ("none" if arg.variant == "digits" else AUGREG_I1K.get(arg.variant, "light1"))
  randaug, mixup_alpha = augreg(aug)
  c = ml_collections.ConfigDict()
  c.task = "classification"
  c.seed = 0
  c.dtype = "float32"  # compute dtype: "bfloat16" for mixed precision (parameters and optimizer stay float32)

  c.data = ml_collections.ConfigDict(dict(name=arg.dataset, train_split="train", eval_split="test"))
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.repeated_augmentation = 1  # DeiT's repeated augmentation: 3
  c.data.score_maps = ""  # token labeling: a directory written by `python -m vit_jax.data.score_maps`
  c.data.skip_unreadable = False  # image folders: skip files that cannot be decoded (with a warning)
  c.data.workers = 0  # > 0: preprocessing in that many grain worker processes (JPEG decoding); 0: two threads
  durations(c, "total", "log", "eval", "checkpoint")
  c.mesh = (("data", -1),)  # tuples, so that --config.mesh="(('fsdp', -1),)" can override them
  # How mesh axes split across hosts, e.g. (("data", 2),): see vit_jax.train.sharding.make_mesh.
  c.mesh_dcn = ml_collections.config_dict.placeholder(tuple)
  c.num_devices = ml_collections.config_dict.placeholder(int)  # use only the first N devices (tests, debugging)
  c.sharding_rules = ml_collections.config_dict.placeholder(tuple)  # default: sharding.DEFAULT_RULES
  c.fsdp_min_size = 2 ** 14  # parameters with fewer elements stay replicated under FSDP
  c.accumulate = 1
  # Compiled programs kept across starts: "user" (~/.cache/vit_jax/xla), "workdir", a path, or "" for none.
  c.compilation_cache = "user"
  c.keep_checkpoints = 3
  c.keep_every_steps = ml_collections.config_dict.placeholder(int)
  c.label_smoothing = 0.0
  c.ema_decay = 0.0  # > 0: also keep and evaluate (eval_ema/...) a Polyak average of the weights
  c.mixup = dict(mixup_alpha=mixup_alpha, cutmix_alpha=0.0, switch_prob=0.5)
  c.init = dict(path=arg.init, dont_load=(), reinit_head=True, posemb_resize="vit_jax")
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.999, mu_dtype="", weight_decay=0.05, clip_norm=1.0, scale_lr_by_batch=False,
      lr_mults=(), wd_mults=(), frozen=(), schedule=dict(decay="cosine", min_lr=0.0)))
  c.optim.layer_decay = ml_collections.config_dict.placeholder(float)
  durations(c.optim.schedule, "warmup")

  if arg.variant == "digits":  # the demo model: 8x8 images, 16 tokens
    c.model = dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=2, stem="conv", stem_width=32,
                   channels=1, pool_type="gap", activation="gelu")
    c.data.image_size = 8
    # `decode` leaves the TFDS arrays as they are and decodes the PNGs of an image folder.
    c.data.pp_train = f"decode|random_crop_pad(1)|{randaug}value_range(-1, 1)"
    c.data.pp_eval = "decode|value_range(-1, 1)"
    c.batch_size, c.eval_batch_size = 64, 128
    c.total_steps, c.log_steps, c.eval_steps, c.checkpoint_steps = 800, 50, 400, 100
    c.label_smoothing = 0.1
    c.optim.lr = 2e-3
    c.optim.schedule.warmup_steps = 25
    c.optim.schedule.min_lr = 2e-5
  else:
    c.model = dict(decode_variant(arg.variant), pool_type="token", activation="gelu_tanh")
    res = 224
    c.data.image_size = res
    c.data.pp_train = PP_IMAGENET["pp_train"].format(s=res, randaug=randaug)
    c.data.pp_eval = PP_IMAGENET["pp_eval"].format(s=res, r=res * 8 // 7)
    c.batch_size, c.eval_batch_size = 512, 512
    c.total_steps, c.log_steps, c.eval_steps, c.checkpoint_steps = 10_000, 50, 1000, 1000
    c.optim.lr = 1e-3
    c.optim.schedule.warmup_steps = 1000
  c.model = ml_collections.ConfigDict(c.model)
  c.model.dropout_rate = arg.do if arg.do >= 0 else 0.0
  c.model.drop_path_rate = arg.sd if arg.sd >= 0 else (0.1 if arg.variant == "digits" else 0.0)
  # The position encoding ("learn", "sincos2d", CPVT's "peg", "none") and ViT-22B's block options, off;
  # all settable from the command line, e.g. --config.model.posemb=peg --config.model.qk_norm=layernorm.
  c.model.posemb = "learn"
  c.model.update(qk_norm=ml_collections.config_dict.placeholder(str), parallel=False, proj_bias=True,
                 norm_type="layernorm")

  if arg.runlocal:  # a few steps at small batch and resolution, to check that everything runs
    c.batch_size, c.eval_batch_size = 8, 8
    c.total_steps, c.log_steps, c.eval_steps, c.checkpoint_steps = 10, 5, 10, 10
    c.optim.schedule.warmup_steps = 2
  return c
