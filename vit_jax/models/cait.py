"""CaiT (Touvron et al. 2021, "Going deeper with Image Transformers"): LayerScale, talking heads, and
class attention.

    model = CaiT(width=384, depth=24, num_heads=8, layer_scale_init=1e-5)    # CaiT-S-24
    logits, out = model.apply({"params": params}, images)                     # images [B, H, W, C]

The patches (a strided conv) plus a learned position table (patches only: the class token has no
row) go through `depth` self-attention blocks with LayerScale and talking-heads attention (the
scaled logits mixed across heads before the softmax, the probabilities mixed again after it).  Only
then does the class token enter: `class_depth` class-attention blocks update it alone, each
attending from the class token over [class token, patches]:

    u = [cls, x];  cls = cls + g1 * attention(q = LN(u)[0], k = v = LN(u));  cls = cls + g2 * MLP(LN(cls))

The patches are not updated there.  The head reads the normalised class token.  Drop path is the
same rate in every self-attention block and off in the class-attention blocks, as in the paper.

Parameter tree:
  embedding/{kernel, bias}, cls [1, 1, D]
  Transformer/posembed_input/pos_embedding [1, h * w, D]
  Transformer/encoderblock_{i}/{LayerNorm_0, LayerScale_0, MultiHeadDotProductAttention_0 (with
      talking_heads_pre / talking_heads_post), LayerNorm_1, LayerScale_1, MlpBlock_0}
  class_block_{j}/{LayerNorm_0, attention/{query, key, value, out}, LayerScale_0, LayerNorm_1,
      MlpBlock_0, LayerScale_1}
  norm/{scale, bias}, head/{kernel, bias}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models.attention import MultiHeadAttention
from vit_jax.models.dropout import Dropout
from vit_jax.models.encoder import Encoder, LayerScale, MlpBlock

Array = jax.Array
Dtype = Any


class ClassAttentionBlock(nn.Module):
  """One class-attention block: the class token attends over [class token, patches] and goes through
  the MLP; the patches are left as they are.  `x: [B, 1 + N, D]` -> `[B, 1, D]` (the new class token)."""
  num_heads: int
  mlp_dim: int
  layer_scale_init: float = 1e-5
  qkv_bias: bool = True
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u: Array, *, deterministic: bool = True, return_weights: bool = False):
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    y = norm("LayerNorm_0")(u)
    attn = MultiHeadAttention(num_heads=self.num_heads, use_bias=self.qkv_bias,
                              dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="attention")
    out = attn(y[:, :1], y, deterministic=deterministic, return_weights=return_weights)
    out, weights = out if return_weights else (out, None)
    out = Dropout(self.dropout_rate)(out, deterministic)
    cls = u[:, :1] + LayerScale(self.layer_scale_init, self.param_dtype, name="LayerScale_0")(out)
    y = MlpBlock(self.mlp_dim, activation=self.activation, dropout_rate=self.dropout_rate, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="MlpBlock_0")(norm("LayerNorm_1")(cls), deterministic)
    cls = cls + LayerScale(self.layer_scale_init, self.param_dtype, name="LayerScale_1")(y)
    return cls, weights


class CaiT(nn.Module):
  """CaiT image classifier (see the module docstring).

  Attributes:
    num_classes: classes of `head`; None or 0: logits are the normalised class token.
    patch_size, width, depth, num_heads, mlp_dim (default 4 * width), channels: as the ViT.
    class_depth: class-attention blocks (2).
    layer_scale_init: LayerScale's initial value (1e-5 up to depth 24, 1e-6 deeper, as timm).
    talking_heads: talking-heads attention in the self-attention blocks (CaiT: True).
    qkv_bias, activation ("gelu", exact), layer_norm_eps (1e-6): as timm's CaiT.
    dropout_rate, attention_dropout_rate, drop_path_rate (one rate for every self-attention block).
    scan, remat_policy, attention_impl: see `Encoder`.
  """
  num_classes: int | None = 1000
  patch_size: int = 16
  width: int = 384
  depth: int = 24
  num_heads: int = 8
  mlp_dim: int | None = None
  channels: int = 3
  class_depth: int = 2
  layer_scale_init: float = 1e-5
  talking_heads: bool = True
  qkv_bias: bool = True
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  scan: bool = False
  remat_policy: str | None = None
  attention_impl: str | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False,
               return_attention: bool = False) -> tuple[Array, dict[str, Any]]:
    """`images: [batch, height, width, channels]` -> `(logits, out)`; `out["attention_weights"]` (with
    `return_attention`) is the self-attention blocks' `[depth, B, heads, N, N]`, and
    `out["class_attention_weights"]` the class-attention blocks' `[class_depth, B, heads, 1, 1 + N]`."""
    p = self.patch_size
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"Expected images of shape [batch, height, width, {self.channels}], got {images.shape}.")
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"Image size {images.shape[1]}x{images.shape[2]} is not divisible by the patch size {p}: "
                       "resize or crop to a multiple of it.")
    x = jnp.asarray(images, self.dtype) if self.dtype else images
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                name="embedding")(x)
    b, gh, gw, d = x.shape
    out: dict[str, Any] = {"stem": x}
    mlp_dim = self.mlp_dim or 4 * self.width
    x, enc = Encoder(
        num_layers=self.depth, mlp_dim=mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, drop_path_rate=self.drop_path_rate,
        drop_path_ramp=False, layer_scale_init=self.layer_scale_init, activation=self.activation,
        qkv_bias=self.qkv_bias, talking_heads=self.talking_heads, layer_norm_eps=self.layer_norm_eps,
        learned_posemb=True, final_norm=False, scan=self.scan, remat_policy=self.remat_policy,
        attention_impl=self.attention_impl, return_weights=return_attention, dtype=self.dtype,
        param_dtype=self.param_dtype, name="Transformer")(x.reshape(b, gh * gw, d), deterministic=not train)
    out.update(enc)
    cls = jnp.tile(self.param("cls", nn.initializers.truncated_normal(0.02), (1, 1, d), self.param_dtype)
                   .astype(x.dtype), (b, 1, 1))
    class_weights = []
    for j in range(self.class_depth):
      cls, w = ClassAttentionBlock(
          self.num_heads, mlp_dim, self.layer_scale_init, self.qkv_bias, self.activation, self.layer_norm_eps,
          self.dropout_rate, self.attention_dropout_rate, self.dtype, self.param_dtype, name=f"class_block_{j}")(
              jnp.concatenate([cls, x], axis=1), deterministic=not train, return_weights=return_attention)
      class_weights.append(w)
    if return_attention:
      out["class_attention_weights"] = jnp.stack(class_weights)
    pooled = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="norm")(cls[:, 0])
    out["encoded"], out["pre_logits"] = x, pooled
    if not self.num_classes:
      out["logits"] = pooled
      return pooled, out
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.zeros, name="head")(pooled).astype(jnp.float32)
    out["logits"] = logits
    return logits, out
