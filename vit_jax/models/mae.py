"""Masked autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

The encoder is our ViT encoder run on the visible patches only; a narrow
decoder sees the encoded visible tokens plus a learned `mask_token` at every
removed position and predicts the pixels of each patch.

    model = MaskedAutoencoder(patch_size=16, width=768, depth=12, num_heads=12)
    loss, out = model.apply(variables, images, rngs={"masking": rng})        # or noise=...
    out["pred"]         [batch, patches, p*p*C]   predicted pixels (normalised if norm_pix_loss)
    out["mask"]         [batch, patches]          1 = removed (the loss is over these)
    out["ids_restore"]  [batch, patches]          un-shuffling indices

Masking: per example, `noise` [batch, patches] (uniform by default) is sorted
and the `int(patches * (1 - mask_ratio))` smallest are kept, as in the
reference code, so a given `noise` reproduces the reference masks exactly.
Position embeddings are the fixed 2-D sin-cos tables (encoder and decoder
widths; zero row for the class token).  The loss is the mean squared error
over removed patches; with `norm_pix_loss` each target patch is normalised by
its mean and unbiased variance (+1e-6).

Parameter tree: the ViT encoder's (`embedding`, `cls`, `Transformer/...`),
then `decoder_embed`, `mask_token`, `Decoder/encoderblock_{i}`,
`Decoder/encoder_norm`, `decoder_pred`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models.encoder import Encoder
from vit_jax.models.vit import posemb_sincos_2d

Array = jax.Array


def patchify(images: Array, patch: int) -> Array:
  """`[B, H, W, C]` -> `[B, (H/p) * (W/p), p * p * C]`, patches row-major, pixels (row, col, channel)."""
  b, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {patch}.")
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Array, patch: int, grid: tuple[int, int], channels: int) -> Array:
  """Inverse of `patchify` for a `grid` of (rows, columns) patches."""
  b = patches.shape[0]
  gh, gw = grid
  x = patches.reshape(b, gh, gw, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * patch, gw * patch, channels)


def random_masking(x: Array, mask_ratio: float, noise: Array) -> tuple[Array, Array, Array]:
  """Keep the tokens with the smallest noise: `(kept [B, keep, D], mask [B, L], ids_restore [B, L])`."""
  length = x.shape[1]
  keep = int(length * (1 - mask_ratio))
  if keep < 1:
    raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {length}.")
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  kept = jnp.take_along_axis(x, ids_shuffle[:, :keep, None], axis=1)
  mask = (ids_restore >= keep).astype(jnp.float32)
  return kept, mask, ids_restore


def reconstruction_loss(pred: Array, target: Array, mask: Array, norm_pix_loss: bool) -> Array:
  """Mean over removed patches of the per-patch mean squared error."""
  if norm_pix_loss:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MaskedAutoencoder(nn.Module):
  """MAE with a ViT encoder; defaults are the paper's decoder (512 wide, 8 blocks, 16 heads)."""
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_mlp_dim: int | None = None
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  channels: int = 3
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  scan: bool = False
  remat_policy: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _encoder(self, name, width, depth, heads, mlp_dim):
    return Encoder(num_layers=depth, mlp_dim=mlp_dim or 4 * width, num_heads=heads, activation=self.activation,
                   layer_norm_eps=self.layer_norm_eps, scan=self.scan, remat_policy=self.remat_policy,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, images: Array, *, noise: Array | None = None, train: bool = False):
    """`images: [B, H, W, C]` (square or not) -> `(loss, out)`; see the module docstring."""
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"Expected images of shape [batch, height, width, {self.channels}], got {images.shape}.")
    p = self.patch_size
    b, h, w, _ = images.shape
    target = patchify(images.astype(jnp.float32), p)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="embedding")(images)
    grid = (x.shape[1], x.shape[2])
    length = grid[0] * grid[1]
    x = x.reshape(b, length, self.width) + posemb_sincos_2d(*grid, self.width).astype(x.dtype)
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"), (b, length))
    if noise.shape != (b, length):
      raise ValueError(f"noise must have shape {(b, length)} (batch, patches), got {noise.shape}.")
    x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)

    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width), self.param_dtype)
    x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)  # its sin-cos row is zero
    latent, _ = self._encoder("Transformer", self.width, self.depth, self.num_heads, self.mlp_dim)(
        x, deterministic=not train)

    dense = lambda features, name: nn.Dense(features, kernel_init=nn.initializers.xavier_uniform(),
                                            dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    y = dense(self.decoder_width, "decoder_embed")(latent)
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.decoder_width),
                            self.param_dtype)
    removed = jnp.tile(mask_token.astype(y.dtype), (b, length - (y.shape[1] - 1), 1))
    tokens = jnp.concatenate([y[:, 1:], removed], axis=1)
    tokens = jnp.take_along_axis(tokens, ids_restore[:, :, None], axis=1)  # back to image order
    y = jnp.concatenate([y[:, :1], tokens], axis=1)
    y = y + posemb_sincos_2d(*grid, self.decoder_width, prefix_tokens=1).astype(y.dtype)
    y, _ = self._encoder("Decoder", self.decoder_width, self.decoder_depth, self.decoder_heads,
                         self.decoder_mlp_dim)(y, deterministic=not train)
    pred = dense(p * p * self.channels, "decoder_pred")(y)[:, 1:]

    loss = reconstruction_loss(pred, target, mask, self.norm_pix_loss)
    out = {"pred": pred, "mask": mask, "ids_restore": ids_restore, "latent": latent, "target": target,
           "grid": grid}
    return loss, out
