"""Resize a learned position embedding to a new patch grid (fine-tuning at a new resolution).

Two modes, because the ecosystem uses two different bilinear interpolations and
they do not agree (on random tables they differ by O(1) per element):

* `"vit_jax"`: `scipy.ndimage.zoom(order=1)`, as in vit_jax's `load_pretrained`
  and big_vision's `resample_posemb`.  Corner samples map onto corner samples
  (torch's bilinear with `align_corners=True`).  Use it to reproduce the
  official fine-tuning runs.
* `"timm"`: `jax.image.resize(..., "bilinear", antialias=False)`, which equals
  torch's bilinear with `align_corners=False` and timm's `_load_weights`.

Prefix rows (class / distillation tokens) are never interpolated.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MODES = ("vit_jax", "timm")


def square_grid(tokens: int, what: str = "position embedding") -> tuple[int, int]:
  """The (side, side) grid of `tokens` patches; fails for non-squares (pass the grid explicitly)."""
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f"The {what} has {tokens} patch tokens, which is not a square grid: pass the grid "
                     "(rows, columns) explicitly, e.g. from the image size divided by the patch size.")
  return side, side


def resize_posemb(posemb, grid: Sequence[int], *, num_prefix_tokens: int = 0,
                  source_grid: Sequence[int] | None = None, mode: str = "vit_jax") -> np.ndarray:
  """`posemb: [1, prefix + h * w, width]` -> `[1, prefix + grid[0] * grid[1], width]`.

  `source_grid` is (h, w) of the input (default: square).  Patch tokens are
  row-major (h outer).  The result keeps the input's dtype; the arithmetic is
  float32 (float64 for the scipy mode).
  """
  if mode not in MODES:
    raise ValueError(f"Unknown position-embedding resize mode {mode!r}: choose one of {MODES}.")
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"Expected a position embedding of shape [1, tokens, width], got {posemb.shape}.")
  prefix, patches = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  h, w = tuple(source_grid) if source_grid is not None else square_grid(len(patches))
  if h * w != len(patches):
    raise ValueError(f"source_grid {h}x{w} has {h * w} tokens but the position embedding has {len(patches)} "
                     f"after {num_prefix_tokens} prefix token(s).")
  nh, nw = (int(g) for g in grid)
  table = patches.reshape(h, w, -1)
  if (nh, nw) != (h, w):
    if mode == "vit_jax":
      import scipy.ndimage
      table = scipy.ndimage.zoom(table.astype(np.float64), (nh / h, nw / w, 1), order=1)
    else:
      import jax
      table = np.asarray(jax.image.resize(table.astype(np.float32), (nh, nw, table.shape[-1]), "bilinear",
                                          antialias=False))
    if table.shape[:2] != (nh, nw):  # zoom rounds the output size; guard against a surprise
      raise AssertionError(f"resize produced {table.shape[:2]}, wanted {(nh, nw)}")
  table = table.reshape(1, nh * nw, -1).astype(posemb.dtype)
  return np.concatenate([prefix, table], axis=1)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 from floor (torch's A = -0.75)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _cubic_resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
  """Resize one axis as torch's `interpolate(mode="bicubic", align_corners=False)` does (borders clamped)."""
  n = x.shape[axis]
  src = (np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5
  base = np.floor(src).astype(int)
  weights = _cubic_weights(src - base)  # [size, 4]
  taps = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)  # [size, 4]
  moved = np.moveaxis(x, axis, 0)
  out = np.einsum("sk,sk...->s...", weights, moved[taps])
  return np.moveaxis(out, 0, axis)


def resize_relative_bias_table(table, window: int) -> np.ndarray:
  """Swin V1's `[(2w - 1)², heads]` relative position bias table for a new `window`, by bicubic
  interpolation of each head's `(2w - 1) x (2w - 1)` offset grid (torch's bicubic, as the Swin
  reference code resizes it when fine-tuning at another window size)."""
  table = np.asarray(table)
  side = math.isqrt(table.shape[0])
  if table.ndim != 2 or side * side != table.shape[0] or side % 2 == 0:
    raise ValueError(f"Expected a [(2w - 1)^2, heads] table, got shape {table.shape}.")
  new = 2 * int(window) - 1
  grid = table.astype(np.float64).reshape(side, side, -1)
  if new != side:
    grid = _cubic_resize_axis(_cubic_resize_axis(grid, new, 0), new, 1)
  return grid.reshape(new * new, -1).astype(table.dtype)
