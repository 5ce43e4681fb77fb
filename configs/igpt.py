"""Image GPT (Chen et al. 2020): generative pre-training from pixels with the one trainer.

    python main.py --config configs/igpt.py --workdir workdirs/igpt_digits
  Pre-trains a small causal transformer (width 64, 4 blocks, 4 heads; 64 positions) on the bundled
  8x8 digits, one token per pixel from their 17 grey levels (`palette="grey:17"`): next-pixel
  negative log-likelihood in raster order, reported as `bits_per_dim` for train and test.  Reaches
  1.828 bits per pixel on the 360 test digits (seed 0; uniform over the 17 levels is 4.087), in 2000
  steps at batch 64: 4 to 8 minutes on 2 CPU cores.

    python main.py --config configs/igpt.py:mode=finetune,init=workdirs/igpt_digits,split=train[:10%] \
        --workdir workdirs/igpt_digits_ft10
  Fine-tunes it as a classifier (the paper's: the final norm's output averaged over the sequence, a new
  linear `head`, every weight trained) on 10% of the digits labels; without `init` it is the same model
  from scratch.  Per-layer linear probes and the comparison over seeds: `bench/igpt_digits.py`.

The paper's recipe: Adam (0.9, 0.95), one epoch of warmup then cosine decay to 0, no dropout (the
digits are small enough to be memorised: this config shifts them by up to a pixel and drops out 10%); its
ImageNet models use the 512-colour palette learned by k-means (`palette=` a `.npy` from
`vit_jax.data.palette.kmeans`) at 32x32 (1024 positions).
"""

from __future__ import annotations

import ml_collections

from configs import vit
from configs.common import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dataset="digits", palette="grey:17", runlocal=False, mode="pretrain", init="", split="train")
  c = vit.get_config(f"variant=digits,dataset={a.dataset}" + (",runlocal" if a.runlocal else ""))
  c.data.train_split = a.split
  if a.mode == "finetune":
    return _finetune(c, a)
  if a.mode != "pretrain":
    raise ValueError(f"Unknown mode {a.mode!r}: choose 'pretrain' or 'finetune'.")
  c.task = "igpt"
  c.palette = a.palette
  c.label_smoothing = 0.0
  c.model = ml_collections.ConfigDict(dict(family="igpt", num_positions=64, width=64, depth=4, num_heads=4,
                                           dropout_rate=0.1, attention_dropout_rate=0.0))
  c.optim.update(dict(name="adamw", b1=0.9, b2=0.95, weight_decay=0.0, lr=3e-3, clip_norm=1.0))
  c.optim.schedule.update(dict(decay="cosine", min_lr=0.0))
  # configs/vit.py's one-pixel shifts (the padding is the background level) and dropout 0.1: the 1437
  # digits are 92k tokens, and without them the model memorises the training set.
  if not a.runlocal:
    c.total_steps, c.eval_steps, c.checkpoint_steps = 2000, 1000, 1000
  return c


def _finetune(c: ml_collections.ConfigDict, a) -> ml_collections.ConfigDict:
  """The pre-trained model as a classifier: the same parameter names, a new `head`."""
  pre = get_config(f"dataset={a.dataset},palette={a.palette}")
  channels = 1 if a.palette.startswith("grey:") else 3  # a .npy palette from k-means on RGB pixels
  c.model = ml_collections.ConfigDict(dict(pre.model.to_dict(), palette=a.palette, channels=channels,
                                           head_zeroinit=True))
  c.init.path = a.init
  c.init.reinit_head = True
  c.label_smoothing = 0.1
  c.optim.update(dict(name="adamw", b1=0.9, b2=0.999, weight_decay=0.01, lr=1e-3, clip_norm=1.0))
  c.optim.schedule.update(dict(decay="cosine", min_lr=0.0))
  c.mixup.mixup_alpha = 0.0
  if not a.runlocal:
    c.total_steps, c.eval_steps, c.checkpoint_steps = 300, 300, 300
  return c
