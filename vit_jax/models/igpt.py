"""Image GPT (Chen et al. 2020, "Generative Pretraining from Pixels"): a GPT-2 over palette ids.

    model = ImageGPT(vocab_size=512, num_positions=1024, width=512, depth=24, num_heads=8)   # iGPT-S
    logits, out = model.apply({"params": params}, ids)      # ids [B, T] in 0..vocab_size (vocab_size = SOS)

An image is quantised to a palette (`vit_jax.data.palette`) and read in raster order.  The sequence
starts with the start-of-sequence token (id `vocab_size`, the last row of `wte`), so position i sees
the SOS and pixels < i and predicts pixel i: `inputs = sos_shift(pixels)`, `logits[:, i]` scores
`pixels[:, i]`.  Token and learned position embeddings are added, then pre-norm blocks with causal
self-attention, and a final norm.  Every norm is iGPT's: x / sqrt(mean(x^2) + eps) * scale, with no
mean subtraction and no bias (`norm_type="rmsnorm"`, eps 1e-5); the MLP's activation is
x * sigmoid(1.702 x).  The output head `lm_head` (no bias) is not tied to `wte` and never predicts
the SOS.  The blocks are our `Encoder`'s, so `scan`, remat and the sharding rules apply as for the ViT.

Parameter tree:
  wte/embedding [vocab_size + 1, D]    wpe/embedding [num_positions, D]
  Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}
  Transformer/encoder_norm/scale       lm_head/kernel [D, vocab_size]

Decoding: `init_cache(model, batch)` makes an empty key / value cache; `apply(..., ids, cache=c,
cache_index=i)` reads `ids` as positions i.. (a prompt at once, or one token), attends to what the
cache holds and returns the new cache in `out["cache"]`.  `vit_jax.decode.complete_images` samples
with it.

With `features=True`, `out["hidden"]` holds every block's input `[depth, B, T, D]`; `probe_features`
turns them (and `out["encoded"]`) into the paper's linear-probe features: each block's input through
that block's first norm, mean-pooled over the sequence, and the pooled final norm's output.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import attention
from vit_jax.models.attention import causal_mask
from vit_jax.models.encoder import Encoder

Array = jax.Array
Dtype = Any

SIZES = {  # the paper's iGPT-S / M / L (width, depth, heads), 32x32 with the 512-colour palette
    "S": dict(width=512, depth=24, num_heads=8),
    "M": dict(width=1024, depth=36, num_heads=8),
    "L": dict(width=1536, depth=48, num_heads=16),
}


def sos_shift(pixels: Array, vocab_size: int) -> Array:
  """`[B, N]` palette ids -> the model input `[B, N]`: the SOS (id `vocab_size`) then pixels[:, :-1]."""
  pixels = jnp.asarray(pixels, jnp.int32)
  sos = jnp.full(pixels.shape[:-1] + (1,), vocab_size, dtype=jnp.int32)
  return jnp.concatenate([sos, pixels[..., :-1]], axis=-1)


class ImageGPT(nn.Module):
  """Causal transformer over palette ids (see the module docstring).

  Attributes:
    vocab_size: palette colours (512 for the paper's, 17 grey levels for the digits); the SOS is id
      `vocab_size`.
    num_positions: the longest sequence (pixels per image).
    width, depth, num_heads, mlp_dim (default 4 * width): transformer size.
    activation: "quick_gelu" (iGPT), or any `Encoder` activation.
    layer_norm_eps: 1e-5.
    dropout_rate, attention_dropout_rate: the paper trains without dropout.
  """
  vocab_size: int = 512
  num_positions: int = 1024
  width: int = 512
  depth: int = 24
  num_heads: int = 8
  mlp_dim: int | None = None
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  scan: bool = False
  remat_policy: str | None = None
  attention_impl: str | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: Array, *, train: bool = False, return_attention: bool = False,
               features: bool = False, cache: dict[str, Array] | None = None,
               cache_index: Array | int | None = None) -> tuple[Array, dict[str, Any]]:
    """`ids: [batch, T]` (T <= num_positions) -> `(logits [batch, T, vocab_size], out)`; with a `cache`,
    `ids` are positions cache_index..cache_index + T - 1 (see the module docstring)."""
    if ids.ndim != 2:
      raise ValueError(f"Expected palette ids of shape [batch, tokens], got {ids.shape}.")
    t = ids.shape[1]
    if t > self.num_positions:
      raise ValueError(f"{t} tokens are more than the model's {self.num_positions} positions.")
    if (cache is None) != (cache_index is None):
      raise ValueError("Decoding needs both cache (init_cache) and cache_index.")
    init = nn.initializers.normal(0.02)
    wte = nn.Embed(self.vocab_size + 1, self.width, embedding_init=init, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="wte")
    wpe = nn.Embed(self.num_positions, self.width, embedding_init=nn.initializers.normal(0.01), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="wpe")
    positions = jnp.arange(t) if cache is None else cache_index + jnp.arange(t)
    x = wte(ids) + wpe(positions)[None]  # the encoder applies the embedding dropout
    mask = causal_mask(t)[None, None] if cache is None else None  # a cache masks causally itself
    x, out = Encoder(
        num_layers=self.depth, mlp_dim=self.mlp_dim or 4 * self.width, num_heads=self.num_heads,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        activation=self.activation, norm_type="rmsnorm", layer_norm_eps=self.layer_norm_eps, final_norm=True,
        scan=self.scan, remat_policy=self.remat_policy, attention_impl=self.attention_impl,
        return_weights=return_attention, return_hidden=features, dtype=self.dtype, param_dtype=self.param_dtype,
        name="Transformer")(x, mask=mask, deterministic=not train, cache=cache, cache_index=cache_index)
    out["encoded"] = x
    logits = nn.Dense(self.vocab_size, use_bias=False, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="lm_head")(x).astype(jnp.float32)
    out["logits"] = logits
    return logits, out


def quantize(images: Array, palette: Any) -> Array:
  """`[B, H, W, C]` images (in the palette's value range) -> `[B, H * W]` ids of the nearest palette
  colour, in raster order (squared Euclidean distance; ties go to the lower id)."""
  p = jnp.asarray(palette, jnp.float32)
  x = jnp.asarray(images, jnp.float32).reshape(images.shape[0], -1, images.shape[-1])
  d = jnp.sum(x ** 2, -1, keepdims=True) - 2.0 * x @ p.T + jnp.sum(p ** 2, -1)
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


class ImageGPTClassifier(ImageGPT):
  """Image GPT fine-tuned as a classifier (the paper's fine-tuning): images are quantised to `palette`,
  read causally with the SOS first, the final norm's output is averaged over the sequence and a new
  `head` Dense gives the class logits.  The parameters are ImageGPT's plus `head`, so a pre-trained
  model loads by name; `out["lm_logits"]` keeps the next-pixel logits.

  Attributes (beyond ImageGPT's): num_classes; palette: the colours `[[c, ...], ...]` as nested tuples
  (hashable; images in the same value range); channels: the images' (the palette's); head_zeroinit.
  """
  num_classes: int = 10
  palette: tuple = ()
  channels: int = 3
  head_zeroinit: bool = True

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False, return_attention: bool = False):
    if not self.palette:
      raise ValueError("ImageGPTClassifier needs its palette: set model.palette (e.g. 'grey:17').")
    if self.channels != len(self.palette[0]):
      raise ValueError(f"model.channels={self.channels} but the palette's colours have {len(self.palette[0])} "
                       "channels: set model.channels to match the palette.")
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"Expected images [batch, height, width, {self.channels}] for this palette, "
                       f"got {images.shape}.")
    ids = quantize(images, self.palette)
    lm_logits, out = super().__call__(sos_shift(ids, self.vocab_size), train=train,
                                      return_attention=return_attention)
    pooled = jnp.mean(out["encoded"], axis=1)
    init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    logits = nn.Dense(self.num_classes, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="head")(pooled).astype(jnp.float32)
    out.update(lm_logits=lm_logits, pre_logits=pooled, logits=logits)
    return logits, out


def init_cache(model: ImageGPT, batch: int, length: int | None = None, dtype=jnp.float32) -> dict[str, Array]:
  """An empty key / value cache for `model`: `{"key", "value"}: [depth, batch, length, heads, head_dim]`
  (length: default `num_positions`)."""
  one = attention.init_cache(batch, length or model.num_positions, model.num_heads,
                             model.width // model.num_heads, dtype)
  return {k: jnp.zeros((model.depth,) + v.shape, v.dtype) for k, v in one.items()}


def probe_features(params, out: dict[str, Any], eps: float = 1e-5) -> Array:
  """The paper's probe features f^l, l = 0..depth: `[depth + 1, B, D]`.

  f^l is the sequence mean of n^l = norm(h^l), where h^l is block l's input and the norm is that
  block's first one; f^depth pools the final norm's output.  `out` is from `apply(..., features=True)`.
  """
  hidden = out["hidden"]
  scales = jnp.stack([params["Transformer"][f"encoderblock_{i}"]["LayerNorm_0"]["scale"]
                      for i in range(hidden.shape[0])])  # [depth, D]
  normed = hidden * jax.lax.rsqrt(jnp.mean(jnp.square(hidden), axis=-1, keepdims=True) + eps)
  pooled = jnp.mean(normed * scales[:, None, None, :], axis=2)
  return jnp.concatenate([pooled, jnp.mean(out["encoded"], axis=1)[None]], axis=0)
