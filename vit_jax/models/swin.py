"""Swin Transformer V1 and V2 (Liu et al. 2021, 2022): windowed attention in hierarchical stages.

    model = SwinTransformer(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
    logits, out = model.apply({"params": params}, images)       # images [B, H, W, C]
    out["stages"]             each stage's feature map [B, h_i, w_i, C_i], before merging (dense tasks)
    out["attention_weights"]  with return_attention: per block [B, windows, heads, N, N]

The image is cut into `patch_size` patches (a strided conv, then a LayerNorm).  Each stage is a
run of blocks that attend within `window_size` x `window_size` windows; every second block shifts
the windows by half a window (a cyclic roll toward the top-left, with a mask that keeps the
wrapped-around regions apart: -100 on their logits).  Between stages, patch merging concatenates
each 2x2 neighbourhood ([x(0,0), x(1,0), x(0,1), x(1,1)]) and halves the channels of that
concatenation with a linear map.  The head is a LayerNorm, the mean over positions and a linear
classifier.

Maps not divisible by the window are padded on the right and bottom before the roll (and cropped
after).  A map no larger than the window in its smaller side is attended as one window of that
side, without shift (the original code's rule, which Hugging Face follows).  V1 indexes a learned
relative position bias table `[(2w - 1)^2, heads]` made for `window_size`; a smaller window reads
the centre of it.

Version 2 changes the block to residual post-norm (`x + LN(attn(x))`, `x + LN(mlp(x))`), the
attention to scaled cosine attention (`MultiHeadAttention(qk_norm="cosine")`, query and value
biases only), the bias to a continuous one: an MLP (2 -> 512 -> heads, ReLU) of the log-spaced
relative coordinates, normalised by `pretrained_window_size - 1` when given (so a model
fine-tuned at a larger window keeps the pre-training scale), then `16 * sigmoid`; and patch
merging to reduction before the norm.

Parameter tree (i: stage, j: block):
  embedding/{kernel, bias}, embedding_norm/{scale, bias}
  stage_{i}/block_{j}/{LayerNorm_0, LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}}
  stage_{i}/block_{j}/attention/{query, key, value, out}    (+ logit_scale [heads] in V2)
  stage_{i}/block_{j}/relative_position_bias/table          V1: [(2w - 1)^2, heads]
  stage_{i}/block_{j}/relative_position_bias/cpb_mlp/{Dense_0, Dense_1}   V2
  stage_{i}/merge/{norm, reduction}                          every stage but the last
  norm/{scale, bias}, head/{kernel, bias}
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models.attention import MultiHeadAttention
from vit_jax.models.dropout import Dropout
from vit_jax.models.encoder import MlpBlock, drop_path

Array = jax.Array
Dtype = Any
MASK_LOGIT = -100.0  # added to the logits between regions that a shift brought together


def clip_window(size: tuple[int, int], window: int, shift: int) -> tuple[int, int]:
  """`(window, shift)` for a `size` (h, w) map: a map no larger than the window in its smaller
  side is one window of that side, unshifted."""
  if min(size) <= window:
    return min(size), 0
  return window, shift


def window_partition(x: Array, window: int) -> Array:
  """`[B, H, W, C]` (H, W multiples of `window`) -> `[B, windows, window * window, C]`, windows row-major
  (jax or numpy arrays)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(windows: Array, window: int, h: int, w: int) -> Array:
  """Inverse of `window_partition` for an `h` x `w` map."""
  b, _, _, c = windows.shape
  x = windows.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def relative_position_index(window: int, table_window: int | None = None) -> np.ndarray:
  """`[N, N]` (N = window²): the row of the `(2t - 1)²` bias table (t = `table_window`, default
  `window`) for each (query, key) pair of a window: `(dh + t - 1) * (2t - 1) + (dw + t - 1)`."""
  t = table_window or window
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (t - 1)
  return rel[0] * (2 * t - 1) + rel[1]


def shift_regions(h: int, w: int, window: int, shift: int) -> np.ndarray:
  """`[h, w]` region labels of a shifted (rolled) `h` x `w` (padded) map: the last window's rows and
  columns split at `shift`, so the positions the roll wrapped around get regions of their own."""
  def regions(n):
    return (np.arange(n) >= n - window).astype(int) + (np.arange(n) >= n - shift).astype(int)
  return regions(h)[:, None] * 3 + regions(w)[None, :]


def shift_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
  """`[windows, N, N]` additive mask of a shifted `h` x `w` (padded) map: `MASK_LOGIT` between
  positions that come from different regions of the unshifted map, 0 within one."""
  labels = shift_regions(h, w, window, shift)
  labels = window_partition(labels[None, :, :, None], window)[0, :, :, 0]  # numpy in, numpy out
  return np.where(labels[:, :, None] == labels[:, None, :], 0.0, MASK_LOGIT).astype(np.float32)


def log_relative_coords(window: int, pretrained_window: int = 0) -> np.ndarray:
  """V2's `[(2w - 1)², 2]` continuous-bias inputs: relative (dh, dw), over `pretrained_window - 1`
  (else `window - 1`), times 8, then `sign(t) * log2(|t| + 1) / log2(8)`."""
  r = np.arange(-(window - 1), window, dtype=np.float32)
  table = np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1)
  norm = pretrained_window - 1 if pretrained_window > 0 else window - 1
  if norm > 0:
    table = table / norm
  table = table * 8.0
  table = np.sign(table) * np.log2(np.abs(table) + 1.0) / np.log2(8.0)
  return table.reshape(-1, 2).astype(np.float32)


class RelativePositionBias(nn.Module):
  """`[heads, N, N]` for a `window` x `window` window: V1's learned table, or V2's continuous MLP."""
  num_heads: int
  window_size: int  # of the table (V1) / the pre-training normalisation default (V2)
  version: int = 1
  pretrained_window_size: int = 0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, window: int) -> Array:
    n = window * window
    if self.version == 1:
      t = self.window_size
      if window > t:
        raise ValueError(f"A {window}x{window} window needs a larger bias table than window_size={t}.")
      table = self.param("table", nn.initializers.truncated_normal(0.02), ((2 * t - 1) ** 2, self.num_heads),
                         self.param_dtype)
      bias = table[relative_position_index(window, t).reshape(-1)]
    else:
      coords = jnp.asarray(log_relative_coords(window, self.pretrained_window_size), self.param_dtype)
      hidden = nn.relu(nn.Dense(512, param_dtype=self.param_dtype, name="Dense_0")(coords))
      table = nn.Dense(self.num_heads, use_bias=False, param_dtype=self.param_dtype, name="Dense_1")(hidden)
      bias = 16.0 * jax.nn.sigmoid(table[relative_position_index(window).reshape(-1)])
    return bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)


class SwinBlock(nn.Module):
  """Windowed (shifted when `shift` > 0) attention and an MLP, pre-norm (V1) or residual post-norm (V2)."""
  num_heads: int
  window_size: int
  shift: int
  mlp_ratio: float = 4.0
  version: int = 1
  pretrained_window_size: int = 0
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  activation: str = "gelu"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, drop_path_rate: float = 0.0, deterministic: bool = True,
               return_weights: bool = False) -> tuple[Array, Array | None]:
    b, h, w, c = x.shape
    window, shift = clip_window((h, w), self.window_size, self.shift)
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    residual = x
    y = x if self.version == 2 else norm("LayerNorm_0")(x)
    ph, pw = (-h) % window, (-w) % window
    y = jnp.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    bias = RelativePositionBias(self.num_heads, self.window_size, self.version, self.pretrained_window_size,
                                self.param_dtype, name="relative_position_bias")(window)
    if shift:
      bias = bias[None] + jnp.asarray(shift_mask(h + ph, w + pw, window, shift))[:, None]  # [windows, heads, N, N]
    attention = MultiHeadAttention(
        self.num_heads, use_bias=self.qkv_bias, key_bias=self.qkv_bias and self.version == 1,
        qk_norm="cosine" if self.version == 2 else None, dropout_rate=self.attention_dropout_rate,
        kernel_init=nn.initializers.truncated_normal(0.02), dtype=self.dtype, param_dtype=self.param_dtype,
        name="attention")
    windows = window_partition(y, window)
    result = attention(windows, bias=bias.astype(windows.dtype), deterministic=deterministic,
                       return_weights=return_weights)
    out, weights = result if return_weights else (result, None)
    y = window_reverse(out, window, h + ph, w + pw)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = y[:, :h, :w]
    y = Dropout(self.dropout_rate)(y, deterministic)
    if self.version == 2:
      y = norm("LayerNorm_0")(y)
    if drop_path_rate and not deterministic:
      y = drop_path(y, drop_path_rate, self.make_rng("dropout"))
    x = residual + y

    mlp = MlpBlock(int(c * self.mlp_ratio), activation=self.activation, dropout_rate=self.dropout_rate,
                   kernel_init=nn.initializers.truncated_normal(0.02), bias_init=nn.initializers.zeros,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="MlpBlock_0")
    y = mlp(norm("LayerNorm_1")(x), deterministic) if self.version == 1 else norm("LayerNorm_1")(mlp(x, deterministic))
    if drop_path_rate and not deterministic:
      y = drop_path(y, drop_path_rate, self.make_rng("dropout"))
    return x + y, weights


class PatchMerging(nn.Module):
  """2x2 neighbourhoods -> channels ([x(0,0), x(1,0), x(0,1), x(1,1)], odd maps padded), halved:
  LayerNorm(4C) then Linear(4C -> 2C) in V1, the reverse in V2."""
  version: int = 1
  layer_norm_eps: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")
    reduction = nn.Dense(2 * c, use_bias=False, kernel_init=nn.initializers.truncated_normal(0.02),
                         dtype=self.dtype, param_dtype=self.param_dtype, name="reduction")
    return reduction(norm(x)) if self.version == 1 else norm(reduction(x))


class SwinStage(nn.Module):
  """`depth` blocks, shifted every second one, then (with `merge`) patch merging."""
  depth: int
  num_heads: int
  window_size: int
  drop_path_rates: Sequence[float]
  merge: bool
  mlp_ratio: float = 4.0
  version: int = 1
  pretrained_window_size: int = 0
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  activation: str = "gelu"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True,
               return_weights: bool = False) -> tuple[Array, Array, list[Array]]:
    """-> (features before merging, after merging, per-block attention weights)."""
    weights = []
    for j in range(self.depth):
      block = SwinBlock(self.num_heads, self.window_size, 0 if j % 2 == 0 else self.window_size // 2,
                        self.mlp_ratio, self.version, self.pretrained_window_size, self.qkv_bias, self.dropout_rate,
                        self.attention_dropout_rate, self.layer_norm_eps, self.activation, self.dtype,
                        self.param_dtype, name=f"block_{j}")
      x, w = block(x, drop_path_rate=float(self.drop_path_rates[j]), deterministic=deterministic,
                   return_weights=return_weights)
      weights.append(w)
    merged = x
    if self.merge:
      merged = PatchMerging(self.version, self.layer_norm_eps, self.dtype, self.param_dtype, name="merge")(x)
    return x, merged, weights


def _per_stage(value: int | Sequence[int], stages: int, what: str) -> tuple[int, ...]:
  values = (int(value),) * stages if np.ndim(value) == 0 else tuple(int(v) for v in value)
  if len(values) != stages:
    raise ValueError(f"{what} has {len(values)} entries for {stages} stages.")
  return values


class SwinTransformer(nn.Module):
  """Swin V1 / V2 image classifier (see the module docstring).

  Attributes:
    num_classes: classes of `head`; None or 0: logits are the pooled features.
    patch_size: side of the square patches (4).
    embed_dim: channels of the first stage (C); stage i has C * 2^i.
    depths, num_heads: blocks and heads per stage.
    window_size: attention window side (7 at 224 px; 12 at 384; V2: 8 or 16 at 256).
    mlp_ratio: MLP width over the block width.
    version: 1 or 2.
    pretrained_window_size: V2: the window the continuous bias was pre-trained with, per stage
      or one for all (0: the window itself).
    qkv_bias: biases on the attention projections (V2: on query and value only).
    dropout_rate, attention_dropout_rate, drop_path_rate: drop path grows linearly from 0 to
      `drop_path_rate` over all blocks.
    layer_norm_eps: 1e-5, as torch's LayerNorm (timm and Hugging Face).
  """
  num_classes: int | None = 1000
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  version: int = 1
  pretrained_window_size: int | Sequence[int] = 0
  qkv_bias: bool = True
  channels: int = 3
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.1
  layer_norm_eps: float = 1e-5
  activation: str = "gelu"
  head_zeroinit: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False,
               return_attention: bool = False) -> tuple[Array, dict[str, Any]]:
    """`images: [batch, height, width, channels]` -> `(logits, out)`."""
    if self.version not in (1, 2):
      raise ValueError(f"Unknown Swin version {self.version!r}: choose 1 or 2.")
    stages = len(self.depths)
    heads = _per_stage(self.num_heads, stages, "num_heads")
    pretrained = _per_stage(self.pretrained_window_size, stages, "pretrained_window_size")
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"Expected images of shape [batch, height, width, {self.channels}], got {images.shape}.")
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"Image size {images.shape[1]}x{images.shape[2]} is not divisible by the patch size {p}: "
                       "resize or crop to a multiple of it.")
    deterministic = not train
    x = jnp.asarray(images, self.dtype) if self.dtype else images
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="embedding")(x)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="embedding_norm")(x)
    x = Dropout(self.dropout_rate)(x, deterministic)

    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    out: dict[str, Any] = {"stages": [], "attention_weights": []}
    for i, depth in enumerate(self.depths):
      start = sum(self.depths[:i])
      features, x, weights = SwinStage(
          depth, heads[i], self.window_size, tuple(rates[start:start + depth]), i < stages - 1, self.mlp_ratio,
          self.version, pretrained[i], self.qkv_bias, self.dropout_rate, self.attention_dropout_rate,
          self.layer_norm_eps, self.activation, self.dtype, self.param_dtype, name=f"stage_{i}")(
              x, deterministic=deterministic, return_weights=return_attention)
      out["stages"].append(features)
      if return_attention:
        out["attention_weights"].extend(weights)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    pooled = jnp.mean(x, axis=(1, 2))
    out["pre_logits"] = pooled
    if not self.num_classes:
      out["logits"] = pooled
      return pooled, out
    kernel_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.truncated_normal(0.02)
    logits = nn.Dense(self.num_classes, kernel_init=kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="head")(pooled).astype(jnp.float32)
    out["logits"] = logits
    return logits, out
