"""Attention in pure linen: scaled dot-product, multi-head, additive and Luong.

Conventions used throughout this module:
  * A mask is boolean and `True` means "may attend" (the flax / JAX / Keras
    convention; torch's `key_padding_mask` is the opposite).
  * A query row whose keys are all masked gets all-zero weights and therefore a
    zero context vector (the Keras convention).  It never produces NaN, and its
    gradient is zero.
  * Weights are returned as probabilities *before* attention dropout, which is
    what one wants to plot.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models.dropout import dropout

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

IMPLEMENTATIONS = (None, "xla", "cudnn")
CUDNN_DTYPES = ("bfloat16", "float16")


def fused_implementation(query: Array, key: Array, platform: str | None = None) -> tuple[str, str | None]:
  """The fused kernel the default (`implementation=None`) picks, and why not cuDNN where it does not.

  On GPU, half-precision attention goes to cuDNN's fused (flash) attention; where its shape or dtype
  rules it out, and on every other platform, to XLA's fused attention (TPU, CPU).
  """
  platform = platform or jax.default_backend()
  if platform not in ("gpu", "cuda"):
    return "xla", None
  if str(query.dtype) not in CUDNN_DTYPES:
    return "xla", f"dtype {query.dtype} (cuDNN fuses {' / '.join(CUDNN_DTYPES)}: set config.dtype='bfloat16')"
  d = query.shape[-1]
  if d > 128 or d % 8:
    return "xla", f"head dimension {d} (cuDNN takes multiples of 8 up to 128)"
  if key.shape[-2] != query.shape[-2] and query.shape[-2] % key.shape[-2]:
    return "xla", f"{query.shape[-2]} query heads over {key.shape[-2]} key heads"
  return "cudnn", None


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
  logging.getLogger(__name__).warning(message)


# ---------------------------------------------------------------------------
# Masks and the masked softmax shared by every attention flavour.
# ---------------------------------------------------------------------------


def padding_mask(lengths: Array, max_len: int) -> Array:
  """`lengths: [batch]` -> `[batch, max_len]` bool, True on real positions."""
  return jnp.arange(max_len)[None, :] < jnp.asarray(lengths)[:, None]


def causal_mask(q_len: int, kv_len: int | None = None) -> Array:
  """`[q_len, kv_len]` lower-triangular bool mask (top-left aligned)."""
  kv_len = q_len if kv_len is None else kv_len
  return jnp.tril(jnp.ones((q_len, kv_len), dtype=bool))


def init_cache(batch: int, length: int, heads: int, head_dim: int, dtype=jnp.float32,
               v_head_dim: int | None = None) -> dict[str, Array]:
  """An empty key / value cache `{"key", "value"}: [batch, length, heads, head_dim]` for decoding."""
  return {"key": jnp.zeros((batch, length, heads, head_dim), dtype),
          "value": jnp.zeros((batch, length, heads, v_head_dim or head_dim), dtype)}


def update_cache(cache: dict[str, Array], key: Array, value: Array, index: Array | int):
  """Write `key` / `value` `[batch, n, heads, d]` of the tokens at positions index..index+n-1 into
  `cache`; returns `(cache, mask [n, length])`, where token j may attend cached positions <= index + j
  (causal; the unwritten rest of the cache is masked)."""
  axis = key.ndim - 3
  k = jax.lax.dynamic_update_slice_in_dim(cache["key"], key.astype(cache["key"].dtype), index, axis=axis)
  v = jax.lax.dynamic_update_slice_in_dim(cache["value"], value.astype(cache["value"].dtype), index, axis=axis)
  n, length = key.shape[-3], k.shape[-3]
  mask = jnp.arange(length)[None, :] <= index + jnp.arange(n)[:, None]
  return {"key": k, "value": v}, mask


def masked_softmax(logits: Array, mask: Array | None = None, axis: int = -1) -> Array:
  """Float32 softmax in which masked entries get exactly zero probability.

  A row that is masked everywhere returns zeros instead of NaN or the uniform
  distribution that a plain `where(mask, logits, -inf)` softmax would give.
  """
  logits = logits.astype(jnp.float32)
  if mask is None:
    return jax.nn.softmax(logits, axis=axis)
  mask = jnp.broadcast_to(mask, logits.shape)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jnp.where(mask, jax.nn.softmax(logits, axis=axis), 0.0)


def _dropout(weights: Array, rate: float, rng: Array, broadcast_dims: Sequence[int] = ()) -> Array:
  return dropout(weights, rate, rng, broadcast_dims)


# ---------------------------------------------------------------------------
# Scaled dot-product attention.
# ---------------------------------------------------------------------------


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
    broadcast_dropout: bool = False,
    return_weights: bool = False,
    implementation: str | None = None,
    precision: Any = None,
    logits_fn: Callable[[Array], Array] | None = None,
    weights_fn: Callable[[Array], Array] | None = None,
):
  """softmax(q k^T * scale + bias) v over the key axis, per head.

  Args:
    query: `[batch..., q_len, heads, d_k]`.
    key: `[batch..., kv_len, heads, d_k]`.
    value: `[batch..., kv_len, heads, d_v]` (`d_v` may differ from `d_k`).
    bias: additive logits bias broadcastable to `[batch..., heads, q_len, kv_len]`.
    mask: bool, broadcastable to `[batch..., heads, q_len, kv_len]`; True = attend.
    is_causal: also apply a lower-triangular mask.
    scale: logits scale, default `1 / sqrt(d_k)`.
    dropout_rate: dropout on the attention probabilities (training only).
    dropout_rng: PRNG key for the dropout.
    deterministic: disables dropout.
    broadcast_dropout: share the dropout mask over batch and heads.
    return_weights: also return the probabilities `[batch..., heads, q_len, kv_len]`.
    implementation: the fused kernel of `jax.nn.dot_product_attention`, used whenever no weights
      are requested, no dropout is active and `d_k == d_v`: "xla", "cudnn", or None for the
      best one for the platform (`fused_implementation`: cuDNN for half precision on GPU, XLA's
      elsewhere), which falls back to XLA's with a log line where cuDNN cannot take the call.
    precision: matmul precision for the explicit path.
    logits_fn / weights_fn: maps of `[batch..., heads, q_len, kv_len]` applied to the scaled logits
      (before bias and mask) and to the probabilities (before dropout), e.g. talking heads' mixing
      over heads; either one selects the explicit path.

  Returns:
    `[batch..., q_len, heads, d_v]`, or `(that, weights)` with `return_weights`.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown attention implementation {implementation!r}: choose one of {IMPLEMENTATIONS}.")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"query and key must share d_k, got {query.shape[-1]} and {key.shape[-1]}.")
  q_len, kv_len = query.shape[-3], key.shape[-3]
  if is_causal:
    cm = causal_mask(q_len, kv_len)
    mask = cm if mask is None else jnp.logical_and(mask, cm)
  if mask is not None:
    mask = jnp.asarray(mask, dtype=bool)
  scale = 1.0 / np.sqrt(query.shape[-1]) if scale is None else scale
  use_dropout = dropout_rate > 0.0 and not deterministic

  # A single half-precision query (a MAP head's probe, a decoding step) takes the explicit path: it has
  # nothing to fuse, and XLA's CPU backend cannot compile jax.nn.dot_product_attention's gradient for it.
  single_half = q_len == 1 and jnp.dtype(query.dtype).itemsize < 4
  fused = (not return_weights and not use_dropout and query.shape[-1] == value.shape[-1] and not single_half
           and logits_fn is None and weights_fn is None
           and query.ndim == 4 and (mask is None or mask.ndim <= 4) and (bias is None or bias.ndim <= 4))
  if fused:
    expand = lambda a: None if a is None else a.reshape((1,) * (4 - a.ndim) + a.shape)
    attend = functools.partial(jax.nn.dot_product_attention, query, key, value, bias=expand(bias),
                               mask=expand(mask), scale=scale)
    chosen, why_not = (implementation, None) if implementation else fused_implementation(query, key)
    if why_not:
      _say_once(f"attention {tuple(query.shape)}: XLA's fused attention, not cuDNN's: {why_not}.")
    try:
      out = attend(implementation=chosen)
    except (NotImplementedError, ValueError, RuntimeError) as e:  # cuDNN refuses the call while tracing
      if implementation or chosen == "xla":
        raise
      _say_once(f"attention {tuple(query.shape)}: XLA's fused attention, cuDNN's refused it: {e}")
      out = attend(implementation="xla")
    if mask is not None:
      # Rows with no valid key: jax returns the mean of the values; we return 0.
      row_valid = jnp.any(expand(mask), axis=-1)  # [b|1, h|1, q]
      row_valid = jnp.swapaxes(row_valid, -1, -2)[..., None]  # [b|1, q, h|1, 1]
      out = jnp.where(row_valid, out, 0.0).astype(out.dtype)
    return out

  logits = jnp.einsum("...qhd,...khd->...hqk", query * jnp.asarray(scale, query.dtype), key,
                      precision=precision)
  if logits_fn is not None:
    logits = logits_fn(logits)
  if bias is not None:
    logits = logits + bias
  weights = masked_softmax(logits, mask).astype(value.dtype)
  if weights_fn is not None:
    weights = weights_fn(weights)
  probs = weights
  if use_dropout:
    if dropout_rng is None:
      raise ValueError("dropout_rate > 0 with deterministic=False needs a dropout_rng.")
    bdims = tuple(range(weights.ndim - 3)) + (weights.ndim - 3,) if broadcast_dropout else ()
    probs = _dropout(weights, dropout_rate, dropout_rng, bdims)
  out = jnp.einsum("...hqk,...khd->...qhd", probs, value, precision=precision)
  return (out, weights) if return_weights else out


# ---------------------------------------------------------------------------
# Multi-head attention with the parameter layout of flax's
# MultiHeadDotProductAttention: query/key/value kernels [in, heads, head_dim]
# and biases [heads, head_dim]; out kernel [heads, head_dim_v, out], bias [out].
# ---------------------------------------------------------------------------


def _flat_init(init: Initializer, shape: tuple[int, ...], flat: tuple[int, int]) -> Initializer:
  """Initialise a DenseGeneral kernel on its 2-D (fan_in, fan_out) view, as flax does."""
  def wrapped(rng, _shape, dtype):
    return init(rng, flat, dtype).reshape(shape)
  return wrapped


class _Projection(nn.Module):
  """Holds one DenseGeneral-style kernel (and bias); the caller does the matmul."""
  kernel_shape: tuple[int, ...]
  n_in: int  # how many leading kernel axes are contracted
  use_bias: bool
  kernel_init: Initializer
  bias_init: Initializer
  param_dtype: Dtype

  @nn.compact
  def __call__(self):
    fan_in = int(np.prod(self.kernel_shape[:self.n_in]))
    fan_out = int(np.prod(self.kernel_shape[self.n_in:]))
    kernel = self.param("kernel", _flat_init(self.kernel_init, self.kernel_shape, (fan_in, fan_out)),
                        self.kernel_shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, self.kernel_shape[self.n_in:], self.param_dtype)
    return kernel, bias


class MultiHeadAttention(nn.Module):
  """Multi-head attention with independent query, key, value and output widths.

  In the notation of "Attention Is All You Need": inputs of widths e_q, e_k, e_v
  (read from the inputs, like torch's `kdim` / `vdim`) are projected to
  `qk_features = heads * d_k` and `v_features = heads * d_v`, and the heads are
  projected to `out_features = d_o`.  Parameters are named and shaped as in
  `flax.linen.MultiHeadDotProductAttention`, so published ViT checkpoints load.

  Attributes:
    num_heads: number of heads.
    qk_features: total query/key width (heads * d_k); default e_q.
    v_features: total value width (heads * d_v); default `qk_features`.
    out_features: output width d_o; default e_q.
    use_bias: biases on the query/key/value projections.
    key_bias: a bias on the key projection (default: `use_bias`); Swin V2 has
      query and value biases only.
    out_bias: bias on the output projection.
    qk_norm: None; "layernorm" or "rmsnorm" (ViT-22B's QK normalisation, timm's
      `qk_norm`): queries and keys are normalised over each head's channels by
      `query_norm` / `key_norm` (`scale` [d_k], and `bias` for layernorm, shared by the
      heads) before the usual 1/sqrt(d_k) scaling; or "cosine" (Swin V2): queries and
      keys are L2-normalised per head and their cosine similarity is scaled per head by
      `exp(min(logit_scale, log 100))`, `logit_scale [heads]` learned from log 10.
    qk_norm_eps: epsilon of the layernorm / rmsnorm QK normalisation.
    talking_heads: CaiT's talking-heads attention: the scaled logits are mixed across
      heads by `talking_heads_pre` (a heads x heads Dense with bias) before the softmax,
      and the probabilities by `talking_heads_post` after it (not renormalised).
    dropout_rate: dropout on the attention probabilities.
    broadcast_dropout: share that dropout mask over batch and heads.
    implementation: `None` / "xla" / "cudnn" for `jax.nn.dot_product_attention`.

  Decoding: self-attention called with `cache` (`init_cache`) and `cache_index` writes the keys and
  values of its tokens (positions cache_index.. of the sequence) into the cache, attends causally to
  everything cached so far, and returns the new cache as its last output.
  """
  num_heads: int
  qk_features: int | None = None
  v_features: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  key_bias: bool | None = None
  out_bias: bool = True
  qk_norm: Literal[None, "layernorm", "rmsnorm", "cosine"] = None
  qk_norm_eps: float = 1e-6
  talking_heads: bool = False
  dropout_rate: float = 0.0
  broadcast_dropout: bool = False
  implementation: str | None = None
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_k: Array | None = None, inputs_v: Array | None = None, *,
               mask: Array | None = None, bias: Array | None = None, is_causal: bool = False,
               deterministic: bool = True, return_weights: bool = False,
               cache: dict[str, Array] | None = None, cache_index: Array | int | None = None):
    """Attend from `inputs_q: [batch..., q_len, e_q]` to keys/values.

    `inputs_k: [batch..., kv_len, e_k]` defaults to `inputs_q`; `inputs_v:
    [batch..., kv_len, e_v]` defaults to `inputs_k`.  `mask` / `bias` broadcast
    to `[batch..., heads, q_len, kv_len]`.  Returns `[batch..., q_len, d_o]`,
    plus the weights `[batch..., heads, q_len, kv_len]` with `return_weights`, plus the updated
    cache when called with `cache` (see the class docstring).
    """
    self_attention = inputs_k is None and inputs_v is None
    if cache is not None and (not self_attention or cache_index is None or is_causal):
      raise ValueError("A key / value cache is for self-attention: pass cache and cache_index, no inputs_k / "
                       "inputs_v, and no is_causal (the cache is causal).")
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    h = self.num_heads
    qk = self.qk_features or inputs_q.shape[-1]
    vf = self.v_features or qk
    out_features = self.out_features or inputs_q.shape[-1]
    for name, width in (("qk_features", qk), ("v_features", vf)):
      if width % h:
        raise ValueError(f"{name}={width} is not divisible by num_heads={h}.")
    dk, dv = qk // h, vf // h

    def proj(name, width, features, use_bias=self.use_bias):
      return _Projection((width, h, features), 1, use_bias, self.kernel_init, self.bias_init,
                         self.param_dtype, name=name)()
    wq, bq = proj("query", inputs_q.shape[-1], dk)
    wk, bk = proj("key", inputs_k.shape[-1], dk, self.use_bias if self.key_bias is None else self.key_bias)
    wv, bv = proj("value", inputs_v.shape[-1], dv)
    wo, bo = _Projection((h, dv, out_features), 2, self.out_bias, self.kernel_init, self.bias_init,
                         self.param_dtype, name="out")()

    dtype = self.dtype or jnp.result_type(inputs_q, wq)
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)
    x_q, x_k, x_v = cast(inputs_q), cast(inputs_k), cast(inputs_v)

    def project(x, w, b):  # [..., e] x [..., e, h, d] -> [..., h, d]
      y = jnp.tensordot(x, cast(w), axes=1, precision=self.precision)
      return y if b is None else y + cast(b)

    if self_attention and dk == dv:
      # One matmul for q, k and v, their kernels stacked on a new axis before the heads: [e, 3, h, d].
      # A head-sharded (tensor-parallel) layout carries through as is, where concatenating the three
      # [e, h * d] kernels would move the shards of every layer between devices.
      w = jnp.stack([wq, wk, wv], axis=1)
      zero = lambda w: jnp.zeros(w.shape[1:], w.dtype)
      b = None if bq is None and bk is None else jnp.stack(
          [zero(w) if bb is None else bb for w, bb in ((wq, bq), (wk, bk), (wv, bv))])
      qkv = project(x_q, w, b)
      q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    else:
      q, k, v = project(x_q, wq, bq), project(x_k, wk, bk), project(x_v, wv, bv)

    scale = None
    if self.qk_norm == "cosine":
      logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(10.0)), (h,), self.param_dtype)
      unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
      per_head = jnp.exp(jnp.minimum(logit_scale, np.log(100.0))).astype(q.dtype)
      q, k, scale = unit(q) * per_head[:, None], unit(k), 1.0
    elif self.qk_norm in ("layernorm", "rmsnorm"):
      norm = functools.partial(nn.LayerNorm, use_fast_variance=False) if self.qk_norm == "layernorm" \
          else nn.RMSNorm
      q = norm(epsilon=self.qk_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="query_norm")(q)
      k = norm(epsilon=self.qk_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="key_norm")(k)
    elif self.qk_norm is not None:
      raise ValueError(f"Unknown qk_norm {self.qk_norm!r}: choose None, 'layernorm', 'rmsnorm' or 'cosine'.")
    logits_fn = weights_fn = None
    if self.talking_heads:
      def mix(name):
        kernel, b = _Projection((h, h), 1, True, self.kernel_init, self.bias_init, self.param_dtype, name=name)()
        return lambda a: (jnp.einsum("...hqk,hg->...gqk", a, cast(kernel), precision=self.precision)
                          + cast(b)[:, None, None])
      logits_fn, weights_fn = mix("talking_heads_pre"), mix("talking_heads_post")
    if cache is not None:
      cache, cache_mask = update_cache(cache, k, v, cache_index)
      k, v = cache["key"].astype(dtype), cache["value"].astype(dtype)
      mask = cache_mask if mask is None else jnp.logical_and(mask, cache_mask)
    use_dropout = self.dropout_rate > 0.0 and not deterministic
    result = dot_product_attention(
        q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale, dropout_rate=self.dropout_rate,
        dropout_rng=self.make_rng("dropout") if use_dropout else None, deterministic=deterministic,
        broadcast_dropout=self.broadcast_dropout, return_weights=return_weights,
        implementation=self.implementation, precision=self.precision, logits_fn=logits_fn,
        weights_fn=weights_fn)
    out, weights = result if return_weights else (result, None)
    out = out.reshape(out.shape[:-2] + (h * dv,))
    y = jnp.dot(out, cast(wo).reshape(h * dv, out_features), precision=self.precision)
    if bo is not None:
      y = y + cast(bo)
    result = (y, weights) if return_weights else (y,)
    if cache is not None:
      result = result + (cache,)
    return result if len(result) > 1 else y


# ---------------------------------------------------------------------------
# Classic single-head attention of the seq2seq literature.  Each returns
# (context [batch..., q_len, d_v], weights [batch..., q_len, kv_len]).
# ---------------------------------------------------------------------------


def _context(weights: Array, value: Array) -> Array:
  """`weights: [..., q_len, kv_len]`, `value: [..., kv_len, d_v]` -> `[..., q_len, d_v]`."""
  return jnp.einsum("...qk,...kd->...qd", weights.astype(value.dtype), value)


def _attend(scores: Array, value: Array, mask: Array | None) -> tuple[Array, Array]:
  weights = masked_softmax(scores, mask)
  return _context(weights, value), weights


class AdditiveAttention(nn.Module):
  """Bahdanau attention: score(q, k) = v_a^T tanh(W_a q + U_a k).

  Params: `query` (W_a), `key` (U_a) and `energy` (v_a, no bias).
  `features` is the alignment width n' of the paper.  With `keys_projected=True` the caller passes
  U_a k itself (a step-by-step decoder computes it once per source) and the module has no `key`.
  """
  features: int
  use_bias: bool = False
  keys_projected: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array | None = None, *,
               mask: Array | None = None) -> tuple[Array, Array]:
    """`query: [..., q_len, d_q]`, `key: [..., kv_len, d_k]`, `mask: [..., q_len|1, kv_len]`."""
    value = key if value is None else value
    dense = lambda name, bias: nn.Dense(self.features, use_bias=bias, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name=name)
    q = dense("query", self.use_bias)(query)
    k = key if self.keys_projected else dense("key", self.use_bias)(key)
    hidden = jnp.tanh(q[..., :, None, :] + k[..., None, :, :])  # [..., q, k, features]
    scores = nn.Dense(1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="energy")(hidden)[..., 0]
    return _attend(scores, value, mask)


LuongScore = Literal["dot", "general", "concat"]


class LuongScorer(nn.Module):
  """Luong alignment scores: dot h_t.h_s, general h_t^T W_a h_s, concat v_a^T tanh(W_a [h_t; h_s])."""
  score: LuongScore = "general"
  features: int | None = None  # hidden width of `concat`; default d_k
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: Array, key: Array) -> Array:
    """`query: [..., q_len, d_q]`, `key: [..., kv_len, d_k]` -> `[..., q_len, kv_len]`."""
    if self.score == "dot":
      if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"Luong 'dot' needs equal query and key widths, got {query.shape[-1]} and "
                         f"{key.shape[-1]}: use score='general' or 'concat'.")
      return jnp.einsum("...qd,...kd->...qk", query, key)
    if self.score == "general":
      # h_t^T W_a h_s with W_a: [d_q, d_k].
      wq = nn.Dense(key.shape[-1], use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="W_a")(query)
      return jnp.einsum("...qd,...kd->...qk", wq, key)
    if self.score == "concat":
      # W_a [h_t; h_s] = W_a[:d_q] h_t + W_a[d_q:] h_s, without building the [q, k, d_q + d_k] concat.
      dq, dk = query.shape[-1], key.shape[-1]
      features = self.features or dk
      w = self.param("W_a", nn.initializers.lecun_normal(), (dq + dk, features), self.param_dtype)
      v = self.param("v_a", nn.initializers.lecun_normal(), (features, 1), self.param_dtype)
      dtype = self.dtype or jnp.result_type(query, w)
      w, v = w.astype(dtype), v.astype(dtype)
      hidden = jnp.tanh((query @ w[:dq])[..., :, None, :] + (key @ w[dq:])[..., None, :, :])
      return (hidden @ v)[..., 0]
    raise ValueError(f"Unknown Luong score {self.score!r}: choose one of 'dot', 'general', 'concat'.")


class LuongAttention(nn.Module):
  """Luong global attention: a_t = softmax_s(score(h_t, h_s)), c_t = sum_s a_t(s) h_s."""
  score: LuongScore = "general"
  features: int | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array | None = None, *,
               mask: Array | None = None) -> tuple[Array, Array]:
    value = key if value is None else value
    scores = LuongScorer(self.score, self.features, self.dtype, self.param_dtype, name="score")(query, key)
    return _attend(scores, value, mask)


class LocalAttention(nn.Module):
  """Luong local attention over the window [p_t - D, p_t + D].

  mode "m" (monotonic): p_t is the query position t.
  mode "p" (predictive): p_t = S_b * sigmoid(v_p^T tanh(W_p h_t)), where S_b is
  the example's last valid source index, and after the windowed softmax the
  weights are multiplied (not renormalised) by exp(-(s - p_t)^2 / (2 sigma^2)),
  sigma = D / 2.

  `mask` must be a key-padding mask (it also gives S_b); positions outside the
  sentence are never attended.
  """
  window: int = 10
  mode: Literal["m", "p"] = "p"
  score: LuongScore = "general"
  features: int | None = None  # hidden width of W_p (and of the concat score); default d_q
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array | None = None, *,
               mask: Array | None = None, query_positions: Array | None = None):
    """Returns `(context [..., q_len, d_v], weights [..., q_len, kv_len], p_t [..., q_len])`.

    `query_positions: [..., q_len]` are the t of local-m (default 0..q_len-1);
    step-by-step decoders pass the current step.
    """
    value = key if value is None else value
    q_len, kv_len = query.shape[-2], key.shape[-2]
    scores = LuongScorer(self.score, self.features, self.dtype, self.param_dtype, name="score")(query, key)
    valid = jnp.ones(scores.shape, bool) if mask is None else jnp.broadcast_to(mask, scores.shape)
    if self.mode == "m":
      p = jnp.arange(q_len, dtype=jnp.float32) if query_positions is None else query_positions
      p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), scores.shape[:-1])
    elif self.mode == "p":
      hidden = nn.Dense(self.features or query.shape[-1], use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="W_p")(query)
      gate = nn.Dense(1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="v_p")(jnp.tanh(hidden))[..., 0]
      last = jnp.maximum(valid.sum(-1) - 1, 0).astype(jnp.float32)  # S_b per row
      p = last * jax.nn.sigmoid(gate.astype(jnp.float32))
    else:
      raise ValueError(f"Unknown local attention mode {self.mode!r}: choose 'm' or 'p'.")
    s = jnp.arange(kv_len, dtype=jnp.float32)
    dist = s - p[..., None]
    in_window = jnp.abs(dist) <= self.window
    weights = masked_softmax(scores, valid & in_window)
    if self.mode == "p":
      sigma = self.window / 2.0
      weights = weights * jnp.exp(-jnp.square(dist) / (2.0 * sigma**2))
    return _context(weights, value), weights, p
