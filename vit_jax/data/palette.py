"""Colour palettes for pixels as tokens (Image GPT): quantise, learn with k-means, and map back.

Pixels and palette colours live in [-1, 1] (`value_range(-1, 1)`), as in iGPT's release and Hugging
Face's processor.  A pixel's token is its nearest palette colour in squared Euclidean distance.

    palette = kmeans(train_pixels, 512)                 # [512, 3], the paper's 9-bit palette
    ids = quantize(images, palette)                     # [B, H, W, 3] -> [B, H, W]
    images = to_uint8(dequantize(ids, palette))         # back to pictures

The digits need no learning: their 17 grey levels (0..16, stored as round(v * 255 / 16)) are the
palette `grey_palette(17)`, and `quantize` gives back the level of every pixel exactly.
"""

from __future__ import annotations

import numpy as np


def grey_palette(levels: int) -> np.ndarray:
  """`[levels, 1]`: the grey values round(i * 255 / (levels - 1)), i = 0..levels-1, in [-1, 1]."""
  if levels < 2:
    raise ValueError(f"A grey palette needs at least 2 levels, got {levels}.")
  return (np.round(np.arange(levels) * 255.0 / (levels - 1)) / 127.5 - 1.0).astype(np.float32)[:, None]


def quantize(pixels, palette) -> np.ndarray:
  """`[..., C]` pixels in [-1, 1] -> `[...]` int32 ids of the nearest of the `[K, C]` palette colours."""
  x = np.asarray(pixels, np.float32)
  p = np.asarray(palette, np.float32)
  if p.ndim != 2 or x.shape[-1] != p.shape[1]:
    raise ValueError(f"Pixels with {x.shape[-1]} channels cannot be matched to a palette of shape {p.shape}.")
  flat = x.reshape(-1, p.shape[1])
  ids = np.empty(len(flat), np.int32)
  for start in range(0, len(flat), 1 << 16):  # bounded memory: 65536 x K distances at a time
    chunk = flat[start:start + (1 << 16)]
    d = (chunk ** 2).sum(1, keepdims=True) - 2.0 * chunk @ p.T + (p ** 2).sum(1)[None]
    ids[start:start + len(chunk)] = np.argmin(d, axis=1)
  return ids.reshape(x.shape[:-1])


def dequantize(ids, palette) -> np.ndarray:
  """`[...]` ids -> `[..., C]` palette colours in [-1, 1]."""
  return np.asarray(palette, np.float32)[np.asarray(ids)]


def to_uint8(pixels) -> np.ndarray:
  """[-1, 1] -> uint8 0..255, as iGPT decodes its samples: rint(127.5 * (x + 1))."""
  return np.clip(np.rint(127.5 * (np.asarray(pixels, np.float32) + 1.0)), 0, 255).astype(np.uint8)


def kmeans(pixels, k: int, *, iterations: int = 50, sample: int = 200_000, seed: int = 0) -> np.ndarray:
  """A `[k, C]` palette by k-means (k-means++ seeding, then Lloyd's iterations) on up to `sample` pixels.

  Colours that lose all their pixels are re-seeded at the pixel farthest from its colour.  The result
  is sorted by brightness (the mean over channels), so palettes of one seed compare by index.
  """
  rng = np.random.default_rng(seed)
  x = np.asarray(pixels, np.float32).reshape(-1, np.shape(pixels)[-1])
  if len(x) > sample:
    x = x[rng.choice(len(x), sample, replace=False)]
  if len(np.unique(x, axis=0)) < k:
    raise ValueError(f"{len(np.unique(x, axis=0))} distinct colours cannot make a palette of {k}.")
  centers = x[rng.integers(len(x))][None]
  dist = ((x - centers[0]) ** 2).sum(1)
  for _ in range(1, k):  # k-means++: each new colour drawn in proportion to the squared distance
    nxt = x[rng.choice(len(x), p=dist / dist.sum())]
    centers = np.concatenate([centers, nxt[None]])
    dist = np.minimum(dist, ((x - nxt) ** 2).sum(1))
  for _ in range(iterations):
    ids = quantize(x, centers)
    sums = np.zeros_like(centers)
    np.add.at(sums, ids, x)
    counts = np.bincount(ids, minlength=k)
    new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers)
    for empty in np.flatnonzero(counts == 0):
      far = np.argmax(((x - new[quantize(x, new)]) ** 2).sum(1))
      new[empty] = x[far]
    if np.allclose(new, centers, atol=1e-7):
      centers = new
      break
    centers = new
  return centers[np.argsort(centers.mean(1), kind="stable")].astype(np.float32)
