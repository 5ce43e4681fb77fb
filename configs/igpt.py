"""Image GPT (Chen et al. 2020): generative pre-training from pixels with the one trainer.

    python main.py --config configs/igpt.py --workdir workdirs/igpt_digits
  Pre-trains a small causal transformer (width 64, 4 blocks, 4 heads; 64 positions) on the bundled
  8x8 digits, one token per pixel from their 17 grey levels (`palette="grey:17"`): next-pixel
  negative log-likelihood in raster order, reported as `bits_per_dim` for train and test.

The paper's recipe: Adam (0.9, 0.95), one epoch of warmup then cosine decay to 0, no dropout; its
ImageNet models use the 512-colour palette learned by k-means (`palette=` a `.npy` from
`vit_jax.data.palette.kmeans`) at 32x32 (1024 positions).
"""

from __future__ import annotations

import ml_collections

from configs import vit
from configs.common import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dataset="digits", palette="grey:17", runlocal=False)
  c = vit.get_config(f"variant=digits,dataset={a.dataset}" + (",runlocal" if a.runlocal else ""))
  c.task = "igpt"
  c.palette = a.palette
  c.label_smoothing = 0.0
  c.model = ml_collections.ConfigDict(dict(family="igpt", num_positions=64, width=64, depth=4, num_heads=4))
  c.optim.update(dict(name="adamw", b1=0.9, b2=0.95, weight_decay=0.0, lr=3e-3, clip_norm=1.0))
  c.optim.schedule.update(dict(decay="cosine", min_lr=0.0))
  c.data.pp_train = "decode|value_range(-1, 1)"  # shifts would move the palette's zero background in
  if not a.runlocal:
    c.total_steps, c.eval_steps, c.checkpoint_steps = 2000, 1000, 1000
  return c
