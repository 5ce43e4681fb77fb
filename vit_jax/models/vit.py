"""Vision Transformer (ViT), with the DeiT distillation token and LV-ViT's conv stem.

The parameter tree is the linen tree of vit_jax / big_vision:

  embedding/{kernel [ph, pw, C, D], bias}          patch projection (conv, stride = kernel)
  stem/{Conv_i, BatchNorm_i}                        only with stem="conv" (LV-ViT)
  cls [1, 1, D]                                     with a class token (pool_type="token" by default)
  dist_token [1, 1, D]                              with distilled=True (DeiT)
  Transformer/posembed_input/pos_embedding          [1, prefix + h*w, D], with posemb="learn"
  Transformer/posembed_peg/conv/{kernel, bias}      [3, 3, 1, D], [D], with posemb="peg" (CPVT)
  Transformer/encoderblock_{i}/...                  see encoder.py
  Transformer/encoder_norm                          unless fc_norm=True or final_norm=False
  MAPHead_0/...                                     with pool_type="map"
  fc_norm/{scale, bias}                             with fc_norm=True (norm after pooling, MAE / timm)
  pre_logits/{kernel, bias}                         with representation_size (Dense + tanh)
  head/{kernel, bias}, head_dist/{kernel, bias}     zero-initialised kernels
  aux_head/{kernel, bias}                           with token_head=True (LV-ViT token labeling)

`VisionTransformer.__call__` returns `(logits, out)` where `out` holds named
intermediates: "stem" [B, h, w, D], "encoded" [B, tokens, D], "head_input",
"pre_logits", "logits" and, with `return_attention=True`,
"attention_weights" [layers, B, heads, tokens, tokens].  With `token_head=True`
also "logits_cls" and "token_logits" [B, patches, classes] (LV-ViT).

MixToken (LV-ViT): `apply(..., mix_box=(top, left, bottom, right))` replaces
that box of the patch grid, right after the patch projection, with the same
region of its partner image (`mixing.partner`: rows 2k and 2k + 1 swap); "token_logits" come back un-mixed (each
position predicts for the image its content came from), and "mix_mask" [h, w]
marks the box.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.data.mixing import partner
from vit_jax.models.attention import MultiHeadAttention
from vit_jax.models.encoder import Encoder, MlpBlock, make_norm

Array = jax.Array
Dtype = Any

POOL_TYPES = ("token", "gap", "map", "none")
POSEMB_TYPES = ("learn", "sincos2d", "peg", "none")
STEMS = ("patch", "conv")


def posemb_sincos_2d(h: int, w: int, width: int, *, prefix_tokens: int = 0,
                     temperature: float = 10_000.0, dtype: Dtype = jnp.float32) -> np.ndarray:
  """The MAE 2-D sin-cos table: `[1, prefix_tokens + h * w, width]`.

  The first half of the channels encodes the column (w) coordinate and the second
  half the row (h), each as [sin, cos] with frequencies 1 / T^(i / (width / 4)),
  i = 0 .. width/4 - 1.  Tokens are row-major (h outer); prefix rows are zeros.
  Computed in float64 and cast.
  """
  if width % 4:
    raise ValueError(f"A 2-D sin-cos position embedding needs a width divisible by 4, got {width}.")
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
  enc = lambda pos: np.concatenate([np.sin(pos.reshape(-1, 1) * omega), np.cos(pos.reshape(-1, 1) * omega)], 1)
  table = np.concatenate([enc(cols), enc(rows)], axis=1)
  table = np.concatenate([np.zeros((prefix_tokens, width)), table], axis=0)
  return table[None].astype(dtype)


class IdentityLayer(nn.Module):
  """Names an intermediate (e.g. `pre_logits` without a representation layer); no params."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision): a learned probe attends over the tokens."""
  num_heads: int
  mlp_dim: int | None = None
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  attention_impl: str | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`x: [batch, tokens, width]` -> `[batch, width]`."""
    b, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
    probe = jnp.tile(probe.astype(x.dtype), (b, 1, 1))
    x = MultiHeadAttention(num_heads=self.num_heads, implementation=self.attention_impl, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="MultiHeadDotProductAttention_0")(probe, x)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="LayerNorm_0")(x)
    x = x + MlpBlock(self.mlp_dim or 4 * d, activation=self.activation, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="MlpBlock_0")(y)
    return x[:, 0]


class ConvStem(nn.Module):
  """LV-ViT's stem before the patch projection: 3 x (conv -> BatchNorm -> ReLU).

  Kernels 7, 3, 3 with strides 2, 1, 1 and "same" padding; the projection conv
  (`embedding`, kernel = stride = patch / 2) follows in the model.
  """
  features: int = 64
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    for i, (k, s) in enumerate(((7, 2), (3, 1), (3, 1))):
      x = nn.Conv(self.features, (k, k), strides=(s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False,
                  dtype=self.dtype, param_dtype=self.param_dtype, name=f"Conv_{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"BatchNorm_{i}")(x)
      x = nn.relu(x)
    return x


def box_mask(box: Array | Sequence[int], grid: tuple[int, int]) -> Array:
  """Boolean `[h, w]`: True inside `box` = (top, left, bottom, right), end exclusive."""
  top, left, bottom, right = (box[i] for i in range(4))
  rows = jnp.arange(grid[0])[:, None]
  cols = jnp.arange(grid[1])[None, :]
  return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def has_class_token(pool_type: str, class_token: bool | None) -> bool:
  """Whether a model with these settings has the `cls` token."""
  return pool_type == "token" if class_token is None else bool(class_token)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(a) for a in v)  # type: ignore


class VisionTransformer(nn.Module):
  """ViT / DeiT / LV-ViT-style image classifier.

  Attributes:
    num_classes: classes of `head`; None or 0 for no head (logits = pre_logits).
    patch_size: int or (height, width) of a patch (total stride of the stem).
    width, depth, mlp_dim, num_heads: transformer size (mlp_dim default 4 * width).
    channels: expected image channels.
    stem: "patch" (one conv, kernel = stride = patch) or "conv" (LV-ViT).
    posemb: "learn" (normal 0.02, includes the prefix-token slots), "sincos2d"
      (fixed MAE table, zero rows for prefix tokens), "peg" (CPVT: no table, a
      depthwise 3x3 convolution over the token grid after the first block,
      `Transformer/posembed_peg`; any input resolution works as it is) or "none".
    pool_type: "token" (class token), "gap" (mean of the patch tokens; prefix
      tokens are left out), "map" (attention pooling) or "none" (the head is
      applied to every token).
    final_norm: the encoder's final norm (`Transformer/encoder_norm`); None: with
      pre-norm blocks unless fc_norm.  False: the released MAE pre-training
      encoders that were saved without it.
    class_token: add the `cls` token; None: only with pool_type="token".  MAE
      fine-tuning keeps the pre-trained class token but pools with "gap".
    fc_norm: drop the encoder's final norm and normalise the pooled features
      instead (`fc_norm`), as MAE fine-tuning and timm's `fc_norm=True` do;
      needs pool_type="gap".
    distilled: DeiT: add `dist_token` and a second head `head_dist`; logits are
      the mean of both heads, each also returned in `out`.
    representation_size: Dense + tanh `pre_logits` of that width, or None.
    head_bias_init, head_zeroinit: the head's initialisation.
    head_batchnorm: BatchNorm without scale and bias before the head (`head_norm`;
      MAE's linear probing), with batch statistics in the "batch_stats" collection.
    token_head: LV-ViT's `aux_head`, a linear classifier on every patch token;
      logits = class-token logits + token_head_weight * per-class max over tokens.
    norm, dropout_rate, attention_dropout_rate, drop_path_rate, layer_scale_init,
      residual_scale, activation, qkv_bias, layer_norm_eps, scan, remat_policy,
      attention_impl: see `Encoder`.
    qk_norm ("layernorm" / "rmsnorm"), parallel, proj_bias, norm_type: ViT-22B's block
      options (see `Encoder1DBlock`); talking_heads: CaiT's head mixing.
    dtype: computation dtype (None: from the inputs/params); param_dtype: storage.
  """
  num_classes: int | None = 1000
  patch_size: int | Sequence[int] = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int | None = None
  num_heads: int = 12
  channels: int = 3
  stem: Literal["patch", "conv"] = "patch"
  stem_width: int = 64
  posemb: Literal["learn", "sincos2d", "peg", "none"] = "learn"
  pool_type: Literal["token", "gap", "map", "none"] = "token"
  class_token: bool | None = None
  fc_norm: bool = False
  final_norm: bool | None = None
  distilled: bool = False
  representation_size: int | None = None
  head_bias_init: float = 0.0
  head_zeroinit: bool = True
  head_batchnorm: bool = False
  token_head: bool = False
  token_head_weight: float = 0.5
  norm: Literal["pre", "post"] = "pre"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_scale_init: float | None = None
  residual_scale: float = 1.0
  activation: str = "gelu_tanh"
  qkv_bias: bool = True
  proj_bias: bool = True
  qk_norm: str | None = None
  talking_heads: bool = False
  parallel: bool = False
  norm_type: str = "layernorm"
  layer_norm_eps: float = 1e-6
  scan: bool = False
  remat_policy: str | None = None
  attention_impl: str | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def _final_norm(self) -> bool | None:
    return (False if self.fc_norm else None) if self.final_norm is None else self.final_norm

  def _check(self, images: Array) -> tuple[int, int]:
    for name, value, options in (("pool_type", self.pool_type, POOL_TYPES),
                                 ("posemb", self.posemb, POSEMB_TYPES), ("stem", self.stem, STEMS)):
      if value not in options:
        raise ValueError(f"Unknown {name} {value!r}: choose one of {options}.")
    if self.pool_type == "token" and self.class_token is False:
      raise ValueError("pool_type='token' pools the class token: leave class_token unset (or True).")
    if self.fc_norm and self.pool_type != "gap":
      raise ValueError(f"fc_norm=True normalises mean-pooled features: it needs pool_type='gap', "
                       f"got {self.pool_type!r}.")
    if self.distilled and self.pool_type != "token":
      raise ValueError(f"distilled=True needs pool_type='token', got {self.pool_type!r}.")
    if self.token_head and (self.pool_type != "token" or self.distilled or not self.num_classes):
      raise ValueError("token_head=True (LV-ViT) needs pool_type='token', distilled=False and num_classes.")
    if self.distilled and self.representation_size:
      raise ValueError("distilled=True has no representation layer: set representation_size=None.")
    if images.ndim != 4:
      raise ValueError(f"Expected images of shape [batch, height, width, {self.channels}], got {images.shape}.")
    ph, pw = _pair(self.patch_size)
    if self.stem == "conv" and (ph % 2 or pw % 2):
      raise ValueError(f"stem='conv' halves the resolution first: patch_size must be even, got {(ph, pw)}.")
    _, h, w, c = images.shape
    if c != self.channels:
      raise ValueError(f"The model takes {self.channels}-channel images (NHWC) but got {c} channels in "
                       f"shape {images.shape}; convert the images or set channels={c}.")
    if h % ph or w % pw:
      raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {ph}x{pw}: resize or crop "
                       f"to a multiple of the patch size.")
    return ph, pw

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False, return_attention: bool = False,
               mix_box: Array | Sequence[int] | None = None) -> tuple[Array, dict[str, Array]]:
    """`images: [batch, height, width, channels]` -> `(logits, out)`.

    logits: `[batch, num_classes]` (`[batch, tokens, num_classes]` for pool_type="none").
    mix_box: MixToken's (top, left, bottom, right) on the patch grid, end exclusive
      (ints or a traced int array); None for no mixing.
    """
    ph, pw = self._check(images)
    out: dict[str, Array] = {}
    x = jnp.asarray(images, self.dtype) if self.dtype else images
    if self.stem == "conv":
      x = ConvStem(self.stem_width, self.dtype, self.param_dtype, name="stem")(x, train)
      ph, pw = ph // 2, pw // 2
    x = nn.Conv(self.width, (ph, pw), strides=(ph, pw), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="embedding")(x)
    b, gh, gw, d = x.shape
    mix_mask = None
    if mix_box is not None:
      mix_mask = box_mask(mix_box, (gh, gw))
      x = jnp.where(mix_mask[None, :, :, None], partner(x), x)
      out["mix_mask"] = mix_mask
    out["stem"] = x
    x = x.reshape(b, gh * gw, d)  # row-major: height outer

    prefix = []
    if has_class_token(self.pool_type, self.class_token):
      prefix.append(self.param("cls", nn.initializers.zeros, (1, 1, d), self.param_dtype))
    if self.distilled:
      prefix.append(self.param("dist_token", nn.initializers.normal(0.02), (1, 1, d), self.param_dtype))
    if prefix:
      x = jnp.concatenate([jnp.tile(t.astype(x.dtype), (b, 1, 1)) for t in prefix] + [x], axis=1)

    fixed = None
    if self.posemb == "sincos2d":
      fixed = posemb_sincos_2d(gh, gw, d, prefix_tokens=len(prefix))
    x, enc_out = Encoder(
        num_layers=self.depth, mlp_dim=self.mlp_dim or 4 * self.width, num_heads=self.num_heads,
        norm=self.norm, dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=self.drop_path_rate, layer_scale_init=self.layer_scale_init,
        residual_scale=self.residual_scale, activation=self.activation, qkv_bias=self.qkv_bias,
        proj_bias=self.proj_bias, qk_norm=self.qk_norm, talking_heads=self.talking_heads, parallel=self.parallel,
        norm_type=self.norm_type, layer_norm_eps=self.layer_norm_eps, learned_posemb=self.posemb == "learn",
        peg=self.posemb == "peg", scan=self.scan,
        remat_policy=self.remat_policy, attention_impl=self.attention_impl, return_weights=return_attention,
        final_norm=self._final_norm(), dtype=self.dtype, param_dtype=self.param_dtype,
        name="Transformer")(
            x, posemb=fixed, deterministic=not train, grid=(gh, gw), prefix_tokens=len(prefix))
    out.update(enc_out)
    out["encoded"] = x

    if self.pool_type == "token":
      pooled = x[:, 0]
    elif self.pool_type == "gap":
      pooled = jnp.mean(x[:, len(prefix):], axis=1)
      if self.fc_norm:
        pooled = make_norm(self.norm_type, self.layer_norm_eps, self.dtype, self.param_dtype, "fc_norm")(pooled)
    elif self.pool_type == "map":
      pooled = MAPHead(self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                       self.attention_impl, self.dtype, self.param_dtype, name="MAPHead_0")(x)
    else:
      pooled = x
    out["head_input"] = pooled

    if self.representation_size:
      pre = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="pre_logits")(pooled))
    else:
      pre = IdentityLayer(name="pre_logits")(pooled)
    out["pre_logits"] = pre
    if self.head_batchnorm:
      pre = nn.BatchNorm(use_running_average=not train, use_bias=False, use_scale=False, epsilon=1e-6,
                         momentum=0.9, dtype=self.dtype, param_dtype=self.param_dtype, name="head_norm")(pre)
    if not self.num_classes:
      out["logits"] = pre
      return pre, out

    def head(name, inputs):
      kernel_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      return nn.Dense(self.num_classes, kernel_init=kernel_init,
                      bias_init=nn.initializers.constant(self.head_bias_init), dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)(inputs).astype(jnp.float32)

    logits = head("head", pre)
    if self.token_head:
      tokens = x[:, len(prefix):]
      token_logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="aux_head")(tokens).astype(jnp.float32)
      if mix_mask is not None:  # un-mix: each position predicts for the image its content came from
        grid = token_logits.reshape(b, gh, gw, -1)
        token_logits = jnp.where(mix_mask[None, :, :, None], partner(grid), grid).reshape(b, gh * gw, -1)
      out["logits_cls"], out["token_logits"] = logits, token_logits
      logits = logits + self.token_head_weight * jnp.max(token_logits, axis=1)
    if self.distilled:
      logits_dist = head("head_dist", x[:, 1])
      out["logits_cls"], out["logits_dist"] = logits, logits_dist
      logits = (logits + logits_dist) / 2
    out["logits"] = logits
    return logits, out
