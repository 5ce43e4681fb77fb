"""Attention maps of a ViT: per-head maps and attention rollout (Abnar & Zuidema, 2020).

    logits, out = model.apply(variables, images, return_attention=True)
    weights = out["attention_weights"]                   # [layers, batch, heads, tokens, tokens]
    heads = token_maps(weights[-1], grid)                # [batch, heads, h, w]: last layer, class-token row
    rollout = token_maps(attention_rollout(weights), grid)  # [batch, h, w]

Rollout follows attention through the residual stream: each layer's head-averaged attention is mixed
with the identity (A' = (A + I) / 2, rows renormalised) and the layers' matrices are multiplied from
the first to the last, so row i says how much of token i's final representation came from each
input token.  A map is the class token's row over the patch tokens, in the patch grid.

Swin attends within windows: `window_maps` stitches one query's row of every window (its centre by
default) over the feature map, with the block's shift undone, and `window_groups` labels the positions
that attend each other in a block (its windows, and in a shifted block the regions a window's mask
keeps apart).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

HEAD_FUSIONS = ("mean", "max", "min")


def attention_rollout(weights, *, head_fusion: str = "mean", residual: bool = True,
                      discard_ratio: float = 0.0):
  """`[layers, batch, heads, T, T]` attention weights -> `[batch, T, T]` rollout.

  `head_fusion` combines the heads of a layer (mean, max or min); `discard_ratio` zeroes that fraction
  of the smallest fused weights of each row (never a row's largest) before the identity is added,
  which sharpens the maps of deep models; `residual=False` multiplies the raw matrices.
  """
  if head_fusion not in HEAD_FUSIONS:
    raise ValueError(f"Unknown head_fusion {head_fusion!r}: choose one of {HEAD_FUSIONS}.")
  if not 0.0 <= discard_ratio < 1.0:
    raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}.")
  weights = jnp.asarray(weights, jnp.float32)
  if weights.ndim != 5 or weights.shape[-1] != weights.shape[-2]:
    raise ValueError(f"Expected attention weights [layers, batch, heads, T, T], got shape {weights.shape}.")
  fused = getattr(jnp, head_fusion)(weights, axis=2)  # [layers, batch, T, T]
  tokens = fused.shape[-1]
  if discard_ratio > 0:
    k = int(tokens * discard_ratio)
    if k:
      kth = jnp.sort(fused, axis=-1)[..., k - 1:k]  # the k-th smallest of each row
      keep = (fused > kth) | (fused == fused.max(-1, keepdims=True))
      fused = jnp.where(keep, fused, 0.0)
  if residual:
    fused = 0.5 * fused + 0.5 * jnp.eye(tokens)
  fused = fused / fused.sum(-1, keepdims=True)
  rollout = fused[0]
  for layer in fused[1:]:
    rollout = layer @ rollout
  return rollout


def token_maps(matrix, grid: Sequence[int], *, prefix_tokens: int = 1, query: int | str = 0) -> np.ndarray:
  """One row (`query`: a token index, or "mean" over all tokens) of `[..., T, T]` as `[..., h, w]` maps
  over the patch tokens, which follow `prefix_tokens` class / distillation tokens."""
  matrix = np.asarray(matrix)
  h, w = grid
  if matrix.shape[-1] != prefix_tokens + h * w:
    raise ValueError(f"{matrix.shape[-1]} tokens do not make {prefix_tokens} prefix tokens and a {h}x{w} grid.")
  if query == "mean":
    row = matrix.mean(-2)
  elif isinstance(query, int):
    row = matrix[..., query, :]
  else:
    raise ValueError(f"query must be a token index or 'mean', got {query!r}.")
  return row[..., prefix_tokens:].reshape(*row.shape[:-1], h, w)


def window_maps(weights, size: Sequence[int], window: int, shift: int = 0, *, query: str | int = "center") -> np.ndarray:
  """Swin's per-window attention stitched over the feature map: `[batch, windows, heads, N, N]` -> `[batch, heads, h, w]`.

  Every window contributes the attention row of one of its query positions (`"center"`, or an index
  into its `window * window` positions) over its own positions, so each window shows where that
  query looks; the shift is undone and the padding cropped, so the map lies on the `size` (h, w)
  feature map.  `window` and `shift` are the block's (`swin.clip_window(size, window_size, shift)`).
  """
  w = np.asarray(weights, np.float32)
  b, n_windows, heads, n, _ = w.shape
  if n != window * window:
    raise ValueError(f"The weights hold windows of {n} positions, not {window}x{window}.")
  h, wd = (int(v) for v in size)
  hp, wp = h + (-h) % window, wd + (-wd) % window
  if n_windows != (hp // window) * (wp // window):
    raise ValueError(f"{n_windows} windows do not tile a {h}x{wd} map padded to {hp}x{wp}.")
  q = (window // 2) * window + window // 2 if query == "center" else int(query)
  rows = w[:, :, :, q, :]  # [B, windows, heads, N]
  grid = rows.reshape(b, hp // window, wp // window, heads, window, window)
  grid = grid.transpose(0, 3, 1, 4, 2, 5).reshape(b, heads, hp, wp)
  if shift:
    grid = np.roll(grid, (shift, shift), axis=(2, 3))
  return grid[:, :, :h, :wd]


def window_groups(size: Sequence[int], window: int, shift: int = 0) -> np.ndarray:
  """`[h, w]` integer labels of a Swin block's attention groups on a `size` (h, w) feature map: two
  positions attend each other exactly when their labels are equal.

  The map is padded on the right and bottom to whole windows, rolled by `-shift`, cut into windows,
  and (when shifted) each window split into the regions its mask keeps apart; the labels are rolled
  back and the padding cropped, so they lie where the positions are.  `window` and `shift` are the
  block's (`swin.clip_window(size, window_size, shift)`).
  """
  from vit_jax.models.swin import shift_regions

  h, w = (int(v) for v in size)
  hp, wp = h + (-h) % window, w + (-w) % window
  rows, cols = np.meshgrid(np.arange(hp) // window, np.arange(wp) // window, indexing="ij")
  labels = (rows * (wp // window) + cols) * 9  # the window, in the rolled frame
  if shift:
    labels = labels + shift_regions(hp, wp, window, shift)
    labels = np.roll(labels, (shift, shift), axis=(0, 1))
  _, labels = np.unique(labels[:h, :w], return_inverse=True)
  return labels.reshape(h, w)
