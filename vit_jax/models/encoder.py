"""Transformer encoder: MLP block, encoder block and the (optionally scanned) stack.

Parameter names follow vit_jax / big_vision so the published checkpoints load:
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0,
LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}}` and `Transformer/encoder_norm`.
With `scan=True` the blocks live under `Transformer/encoderblock` with a leading
depth axis (big_vision's scanned layout); `scan_to_unrolled` /
`unrolled_to_scan` convert parameter trees between the two.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Literal, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models.attention import MultiHeadAttention
from vit_jax.models.dropout import Dropout

Array = jax.Array
Dtype = Any
ACTIVATION_AXES = ("act_batch", "act_len", "act_emb")

def gelu_exact(x: Array) -> Array:
  """x * Phi(x) with the exact normal CDF, as in timm / Hugging Face.

  Written with `erf` rather than `jax.nn.gelu(approximate=False)`'s `erfc`: XLA
  lowers `erf` to a short rational approximation and `erfc` to a much costlier
  exp-and-branch form.  For very negative x, 1 + erf loses relative precision but
  the absolute error stays below 1e-7 * |x|.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu_exact,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # flax nn.gelu, the official ViTs
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # GPT-2 / iGPT / CLIP: x * sigmoid(1.702 x)
}
GATED = {"swiglu": "silu", "geglu": "gelu"}


def get_activation(name: str) -> Callable[[Array], Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}: choose one of {sorted(ACTIVATIONS) + sorted(GATED)}.")
  return ACTIVATIONS[name]


def remat_policies() -> list[str]:
  return sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))


def get_remat_policy(name: str):
  if not hasattr(jax.checkpoint_policies, name) or name.startswith("_"):
    raise ValueError(f"Unknown remat policy {name!r}: choose one of {remat_policies()} (or None).")
  return getattr(jax.checkpoint_policies, name)


class MlpBlock(nn.Module):
  """Dense -> activation -> dropout -> Dense -> dropout.

  `hidden_dropout_rate` (default `dropout_rate`) is the first dropout's rate, on the `mlp_dim` features:
  0 gives the original Transformer's placement (dropout on the sub-layer output only).

  `activation` is one of "gelu" (exact), "gelu_tanh", "relu", "silu", or a gated
  unit "swiglu" / "geglu": `Dense_1(act(Dense_gate(x)) * Dense_0(x))`.
  """
  mlp_dim: int
  out_dim: int | None = None
  activation: str = "gelu"
  dropout_rate: float = 0.0
  hidden_dropout_rate: float | None = None
  use_bias: bool = True
  in_bias: bool | None = None  # the input (and gate) Dense's bias; default `use_bias`
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.normal(stddev=1e-6)
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """`x: [..., width]` -> `[..., out_dim or width]`."""
    dense = functools.partial(nn.Dense, use_bias=self.use_bias, kernel_init=self.kernel_init,
                              bias_init=self.bias_init, dtype=self.dtype, param_dtype=self.param_dtype)
    in_bias = self.use_bias if self.in_bias is None else self.in_bias
    h = dense(self.mlp_dim, use_bias=in_bias, name="Dense_0")(x)
    if self.activation in GATED:
      gate = dense(self.mlp_dim, use_bias=in_bias, name="Dense_gate")(x)
      h = get_activation(GATED[self.activation])(gate) * h
    else:
      h = get_activation(self.activation)(h)
    hidden_rate = self.dropout_rate if self.hidden_dropout_rate is None else self.hidden_dropout_rate
    h = Dropout(hidden_rate)(h, deterministic)
    y = dense(self.out_dim or x.shape[-1], name="Dense_1")(h)
    return Dropout(self.dropout_rate)(y, deterministic)


def drop_path(x: Array, rate: float | Array, rng: Array) -> Array:
  """Stochastic depth: zero whole samples with probability `rate`, scale the rest by 1/(1-rate)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask / keep).astype(x.dtype)


class LayerScale(nn.Module):
  """CaiT's LayerScale: a learned per-channel scale `gamma`, initialised to a small constant."""
  init_value: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       self.param_dtype)
    return x * gamma.astype(x.dtype)


NORM_TYPES = ("layernorm", "rmsnorm")


def make_norm(norm_type: str, eps: float, dtype, param_dtype, name: str) -> nn.Module:
  """LayerNorm (`scale`, `bias`), or RMSNorm (`scale` only: no centring, no bias, as ViT-22B)."""
  if norm_type == "layernorm":
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)
  if norm_type == "rmsnorm":
    return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)
  raise ValueError(f"Unknown norm_type {norm_type!r}: choose one of {NORM_TYPES}.")


class Encoder1DBlock(nn.Module):
  """One transformer block.

  pre-norm:  x = x + F(LN(x))        post-norm:  x = LN(x + F(x))
  where each residual branch is `F = drop_path(layer_scale(f)) / residual_scale` for f in
  (dropout(self-attention), MLP), the MLP dropping its hidden features and its output itself (so
  each branch's output is dropped once, as in the reference ViT and timm).  `residual_scale` is LV-ViT's skip scaling
  (1.0 = off); `layer_scale_init` turns on CaiT's LayerScale (`LayerScale_{0,1}/gamma`).

  ViT-22B's options: `parallel=True` computes both branches from one norm and sums them,
  x = x + F(attention(LN(x)) + MLP(LN(x))) (`LayerNorm_0` and `LayerScale_0` only, pre-norm);
  `qk_norm` normalises queries and keys per head; `qkv_bias=False` and `proj_bias=False` drop
  the biases of the query / key / value and of the output and MLP projections (a parallel
  block keeps its MLP input bias, as timm's `ParallelScalingBlock`); `norm_type="rmsnorm"`
  makes every norm a scale-only RMSNorm.  `talking_heads` is CaiT's head mixing.
  """
  num_heads: int
  mlp_dim: int
  norm: Literal["pre", "post"] = "pre"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  hidden_dropout_rate: float | None = None  # the MLP's hidden features (default dropout_rate)
  stochastic_depth: bool = False  # the per-layer rate is a call argument (it varies with depth)
  layer_scale_init: float | None = None
  residual_scale: float = 1.0
  activation: str = "gelu"
  qkv_bias: bool = True
  proj_bias: bool = True
  qk_norm: str | None = None
  talking_heads: bool = False
  parallel: bool = False
  norm_type: str = "layernorm"
  layer_norm_eps: float = 1e-6
  attention_impl: str | None = None
  return_weights: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, drop_path_rate: float | Array = 0.0,
               deterministic: bool = True, cache: dict[str, Array] | None = None,
               cache_index: Array | int | None = None):
    """`x: [batch, tokens, width]`, `mask` broadcastable to `[batch, heads, tokens, tokens]`.

    Returns `(x, attention weights [batch, heads, tokens, tokens] or None)`; with a key / value
    `cache` (decoding: `x` holds the tokens at positions cache_index..), `(x, (weights, new cache))`.
    """
    if self.norm not in ("pre", "post"):
      raise ValueError(f"Unknown norm placement {self.norm!r}: choose 'pre' or 'post'.")
    if self.parallel and self.norm != "pre":
      raise ValueError("Parallel blocks are pre-norm (both branches read one LayerNorm): set norm='pre'.")

    def residual(x, f, idx):
      norm = make_norm(self.norm_type, self.layer_norm_eps, self.dtype, self.param_dtype, f"LayerNorm_{idx}")
      y = f(norm(x) if self.norm == "pre" else x)
      if self.layer_scale_init is not None:
        y = LayerScale(self.layer_scale_init, self.param_dtype, name=f"LayerScale_{idx}")(y)
      if self.stochastic_depth and not deterministic:
        y = drop_path(y, drop_path_rate, self.make_rng("dropout"))
      if self.residual_scale != 1.0:
        y = y / self.residual_scale
      return norm(x + y) if self.norm == "post" else x + y

    attn = MultiHeadAttention(
        num_heads=self.num_heads, use_bias=self.qkv_bias, out_bias=self.proj_bias, qk_norm=self.qk_norm,
        qk_norm_eps=self.layer_norm_eps, talking_heads=self.talking_heads,
        dropout_rate=self.attention_dropout_rate, implementation=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype, name="MultiHeadDotProductAttention_0")
    mlp = MlpBlock(self.mlp_dim, activation=self.activation, dropout_rate=self.dropout_rate,
                   hidden_dropout_rate=self.hidden_dropout_rate, use_bias=self.proj_bias,
                   in_bias=True if self.parallel else None, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="MlpBlock_0")
    weights, caches = [], []

    def self_attention(y):  # its output dropped (the MLP drops its own)
      kw = {} if cache is None else dict(cache=cache, cache_index=cache_index)
      out = attn(y, mask=mask, deterministic=deterministic, return_weights=self.return_weights, **kw)
      if cache is not None:
        *out, new_cache = out
        caches.append(new_cache)
        out = out if self.return_weights else out[0]
      if self.return_weights:
        out, w = out
        weights.append(w)
      return Dropout(self.dropout_rate)(out, deterministic)

    if self.parallel:
      x = residual(x, lambda y: self_attention(y) + mlp(y, deterministic), 0)
    else:
      x = residual(x, self_attention, 0)
      x = residual(x, lambda y: mlp(y, deterministic), 1)
    w = weights[0] if weights else None
    return (x, w) if cache is None else (x, (w, caches[0]))


class PositionEncodingGenerator(nn.Module):
  """CPVT's PEG: a depthwise 3x3 convolution (zero padding, bias) over the token grid, added to the
  tokens; the first `prefix_tokens` (class / distillation tokens) are kept aside unchanged.

  Parameters `kernel [3, 3, 1, width]`, `bias [width]` (timm's `PosConv`, `proj.0` in Twins).
  Initialised as timm: normal(0, sqrt(2 / 9)) kernels (fan-out of a depthwise 3x3), zero bias.
  """
  kernel_size: int = 3
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, grid: tuple[int, int], prefix_tokens: int = 0) -> Array:
    b, n, d = x.shape
    h, w = grid
    if n != prefix_tokens + h * w:
      raise ValueError(f"{n} tokens do not make {prefix_tokens} prefix tokens and a {h}x{w} grid.")
    k = self.kernel_size
    conv = nn.Conv(d, (k, k), padding=[(k // 2, k // 2)] * 2, feature_group_count=d, dtype=self.dtype,
                   param_dtype=self.param_dtype, kernel_init=nn.initializers.normal(np.sqrt(2.0 / (k * k))),
                   name="conv")
    tokens = x[:, prefix_tokens:]
    y = tokens + conv(tokens.reshape(b, h, w, d)).reshape(b, h * w, d).astype(x.dtype)
    return jnp.concatenate([x[:, :prefix_tokens], y], axis=1)


class AddPositionEmbs(nn.Module):
  """A learned position embedding `pos_embedding: [1, tokens, width]` added to the input."""
  posemb_init: Callable = nn.initializers.normal(stddev=0.02)
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.has_variable("params", "pos_embedding"):
      stored = self.get_variable("params", "pos_embedding").shape
      if stored[1:] != x.shape[1:]:
        raise ValueError(f"Position embedding has {stored[1]} tokens of width {stored[2]} but the input has "
                         f"{x.shape[1]} of width {x.shape[2]}: the image size differs from the one the model "
                         "was initialised with; resize the position embedding to the new grid first.")
    pe = self.param("pos_embedding", self.posemb_init, (1,) + x.shape[1:], self.param_dtype)
    return x + pe.astype(x.dtype)


class Encoder(nn.Module):
  """A stack of `Encoder1DBlock`s, optionally under `nn.scan` and `jax.checkpoint`.

  Attributes (beyond those forwarded to every block):
    num_layers: depth.
    drop_path_rate: stochastic-depth rate of the last block; rates ramp linearly
      from 0 at the first block (every block's rate with `drop_path_ramp=False`, as CaiT).
    learned_posemb: add a learned `posembed_input/pos_embedding` before the blocks.
    final_norm: apply `encoder_norm` at the end (default: with pre-norm blocks).
    scan: run the blocks with `nn.scan` (params under `encoderblock`, stacked on axis 0).
    remat_policy: None for no rematerialisation, or a `jax.checkpoint_policies` name
      (e.g. "nothing_saveable", "dots_saveable").
    return_weights: also return every block's attention weights.
    return_hidden: also return every block's input, `out["hidden"]` `[layers, batch, tokens, width]`
      (unrolled blocks only).
    proj_bias, qk_norm, talking_heads, parallel, norm_type: see `Encoder1DBlock`.
    peg: CPVT's position encoding generator (`posembed_peg`) after the first block; the call
      then needs the token `grid` and the number of `prefix_tokens`.  Under `scan` the first
      block stays unrolled (`encoderblock_0`) and the others are scanned (`encoderblock`).

  Decoding (causal models): called with `cache` (`init_cache(...)`: keys and values of every block,
  `[layers, batch, length, heads, head_dim]`) and `cache_index`, the tokens in `x` are positions
  cache_index.. of the sequence; they attend causally to the cached ones and `out["cache"]` holds
  the cache with theirs written in.  Unrolled or scanned alike.
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  norm: Literal["pre", "post"] = "pre"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  hidden_dropout_rate: float | None = None
  drop_path_rate: float = 0.0
  drop_path_ramp: bool = True
  layer_scale_init: float | None = None
  residual_scale: float = 1.0
  activation: str = "gelu"
  qkv_bias: bool = True
  proj_bias: bool = True
  qk_norm: str | None = None
  talking_heads: bool = False
  parallel: bool = False
  norm_type: str = "layernorm"
  layer_norm_eps: float = 1e-6
  learned_posemb: bool = False
  peg: bool = False
  final_norm: bool | None = None
  scan: bool = False
  remat_policy: str | None = None
  attention_impl: str | None = None
  return_weights: bool = False
  return_hidden: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, posemb: Array | None = None, mask: Array | None = None,
               deterministic: bool = True, grid: tuple[int, int] | None = None,
               prefix_tokens: int = 0, cache: dict[str, Array] | None = None,
               cache_index: Array | int | None = None) -> tuple[Array, dict[str, Array]]:
    """`x: [batch, tokens, width]`; `posemb`: a fixed table added to x (e.g. sin-cos); `grid` and
    `prefix_tokens`: the layout of the tokens, for `peg`.

    Returns `(encoded [batch, tokens, width], out)`; `out["attention_weights"]`
    is `[layers, batch, heads, tokens, tokens]` when `return_weights`.
    """
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
    if self.learned_posemb:
      x = AddPositionEmbs(param_dtype=self.param_dtype, name="posembed_input")(x)
    if posemb is not None:
      x = x + jnp.asarray(posemb, x.dtype)
    x = Dropout(self.dropout_rate)(x, deterministic)
    # Logical activation axes: the trainer maps them onto the mesh (a no-op without axis rules).
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)

    block_kw = dict(
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, norm=self.norm, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, hidden_dropout_rate=self.hidden_dropout_rate,
        stochastic_depth=self.drop_path_rate > 0,
        layer_scale_init=self.layer_scale_init, residual_scale=self.residual_scale,
        activation=self.activation, qkv_bias=self.qkv_bias, proj_bias=self.proj_bias, qk_norm=self.qk_norm,
        talking_heads=self.talking_heads, parallel=self.parallel, norm_type=self.norm_type,
        layer_norm_eps=self.layer_norm_eps,
        attention_impl=self.attention_impl, return_weights=self.return_weights, dtype=self.dtype,
        param_dtype=self.param_dtype)
    block = Encoder1DBlock
    if self.remat_policy not in (None, "none"):
      # __call__(self, x, mask, drop_path_rate, deterministic): `deterministic` is static.
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(4,),
                       policy=get_remat_policy(self.remat_policy))
    rates = (np.linspace(0.0, self.drop_path_rate, self.num_layers) if self.drop_path_ramp
             else np.full(self.num_layers, self.drop_path_rate))
    if self.peg and grid is None:
      raise ValueError("peg=True needs the token grid: call the encoder with grid=(h, w).")

    def peg(x, i):
      if self.peg and i == 0:
        x = PositionEncodingGenerator(dtype=self.dtype, param_dtype=self.param_dtype, name="posembed_peg")(
            x, grid, prefix_tokens)
      return x

    if self.return_hidden and self.scan:
      raise ValueError("return_hidden needs unrolled blocks (scan=False).")
    if cache is not None:
      if self.peg:
        raise ValueError("A PEG encoder reads the whole token grid at once; it cannot decode with a cache.")
      depth = jax.tree_util.tree_leaves(cache)[0].shape[0]
      if depth != self.num_layers or cache_index is None:
        raise ValueError(f"The cache has {depth} layers for {self.num_layers} blocks (or no cache_index): "
                         "make it with init_cache for this encoder.")
    out = {}
    weights, hidden, caches = [], [], []
    first = 1 if self.scan and self.peg else 0  # blocks before the scanned ones (the PEG follows block 0)
    for i in range(self.num_layers if not self.scan else first):
      hidden.append(x)
      args = () if cache is None else (jax.tree_util.tree_map(lambda a, i=i: a[i], cache), cache_index)
      x, w = block(name=f"encoderblock_{i}", **block_kw)(x, mask, float(rates[i]), deterministic, *args)
      if cache is not None:
        w, layer_cache = w
        caches.append(layer_cache)
      weights.append(w)
      x = peg(x, i)
    if self.scan and self.num_layers > first:
      ramp = self.drop_path_rate > 0
      in_axes = (nn.broadcast, 0 if ramp else nn.broadcast, nn.broadcast)
      args = ()
      if cache is not None:
        in_axes, args = in_axes + (0, nn.broadcast), (cache, cache_index)
      block = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=in_axes, length=self.num_layers - first)
      x, w = block(name="encoderblock", **block_kw)(
          x, mask, jnp.asarray(rates[first:], jnp.float32) if ramp else 0.0, deterministic, *args)
      if cache is not None:
        w, out["cache"] = w
      if self.return_weights:
        weights = [*weights, *w] if first else w
    if cache is not None and caches:
      out["cache"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *caches)
    if self.return_weights and isinstance(weights, list):
      weights = jnp.stack(weights)
    if self.return_weights:
      out["attention_weights"] = weights
    if self.return_hidden:
      out["hidden"] = jnp.stack(hidden)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)

    if self.norm == "pre" if self.final_norm is None else self.final_norm:
      x = make_norm(self.norm_type, self.layer_norm_eps, self.dtype, self.param_dtype, "encoder_norm")(x)
    return x, out


# ---------------------------------------------------------------------------
# Scanned <-> unrolled parameter layouts.
# ---------------------------------------------------------------------------

_BLOCK = re.compile(r"^encoderblock_(\d+)$")


def scan_to_unrolled(params: Mapping[str, Any]) -> dict[str, Any]:
  """Replace every `encoderblock` (leading depth axis) with `encoderblock_{i}` entries, numbered after
  the blocks that are unrolled already (the first block of a PEG encoder)."""
  out = {}
  for k, v in params.items():
    if k == "encoderblock" and isinstance(v, Mapping):
      depth = jax.tree_util.tree_leaves(v)[0].shape[0]
      first = sum(1 for name in params if _BLOCK.match(name))
      for i in range(depth):
        out[f"encoderblock_{i + first}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], _plain(v))
    elif isinstance(v, Mapping):
      out[k] = scan_to_unrolled(v)
    else:
      out[k] = v
  return out


def unrolled_to_scan(params: Mapping[str, Any]) -> dict[str, Any]:
  """Stack `encoderblock_0..N-1` into one `encoderblock` with a leading depth axis (from block 1 in an
  encoder with a PEG, `posembed_peg`, whose first block stays unrolled)."""
  blocks = {int(m.group(1)): k for k in params if (m := _BLOCK.match(k))}
  if blocks and sorted(blocks) != list(range(len(blocks))):
    raise ValueError(f"Encoder blocks are not numbered 0..{len(blocks) - 1}: {sorted(blocks)}.")
  first = 1 if blocks and "posembed_peg" in params else 0
  out = {}
  for k, v in params.items():
    if _BLOCK.match(k) and int(_BLOCK.match(k).group(1)) >= first:
      continue
    out[k] = unrolled_to_scan(v) if isinstance(v, Mapping) else v
  if len(blocks) > first:
    layers = [_plain(params[blocks[i]]) for i in range(first, len(blocks))]
    # numpy in, numpy out (checkpoint conversion stays on the host); otherwise jax arrays.
    host = all(isinstance(a, np.ndarray) for a in jax.tree_util.tree_leaves(layers))
    stack = np.stack if host else jnp.stack
    out["encoderblock"] = jax.tree_util.tree_map(lambda *a: stack(a), *layers)
  return out


def _plain(tree):
  return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree
