"""Sequence-to-sequence models: RNN encoder-decoders (with and without attention) and a Transformer.

    model = Seq2Seq(source_vocab=80, target_vocab=90, attention="luong")
    variables = model.init(rng, source, target_in)
    logits, weights = model.apply(variables, source, target_in)         # teacher forcing
    # step by step (vit_jax.decode builds greedy and beam search on these three methods):
    memory = model.apply(variables, source, method="encode")
    state = model.apply(variables, memory, method="initial_state")
    state, logits, weights = model.apply(variables, state, tokens, memory, method="step")

Tokens are int32 `[batch, length]` with 0 = padding (`vit_jax.data.text`: 1 = start, 2 = end).  The
decoder reads `target_in` (start + text) and predicts `target_out` (text + end).  Padding is masked in
the attention, in the bi-directional reverse pass (`nn.RNN(seq_lengths=...)` reverses only the real
prefix) and, by the task, in the loss.

Decoders (`attention=`):
  * "none": Keras `lstm_seq2seq`: the encoder's final state initialises the decoder; no context after that.
  * "bahdanau": the previous top-layer state s_{t-1} queries additive attention; the context joins the
    next input (as in d2l and the TF tutorial) and the output layer reads [s_t; c_t].  U_a h_j is
    computed once per source.  The initial state is the encoder's final state (not tanh(W_s <-h_1)),
    and the output is a plain Dense (no maxout).
  * "luong": global attention on the current top-layer state h_t with score dot / general / concat,
    attentional state h~_t = tanh(W_c [c_t; h_t]) and input feeding (h~_{t-1} joins the next input).
  * "local": Luong's local-m / local-p attention over [p_t - D, p_t + D], otherwise as "luong".
  * kind="transformer": pre-norm encoder blocks (`vit_jax.models.encoder`) and decoder blocks with causal
    self-attention, cross-attention and an MLP; sinusoidal positions; a key / value cache for decoding.

Recurrent cells are flax's (`nn.LSTMCell`, carry (c, h); `nn.GRUCell`), run over time with `nn.RNN` /
`nn.scan`.  Stacked layers pass outputs upward with dropout in between; layer i of the decoder starts
from layer i of the encoder.  A bi-directional encoder merges the two directions' outputs and final
states with `merge` (concat / sum / ave / mul, as Keras names them); with concat the decoder is twice
as wide as each encoder direction.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models.attention import (AdditiveAttention, LocalAttention, LuongAttention, _Projection,
                                      dot_product_attention, init_cache, update_cache)
from vit_jax.models.dropout import Dropout
from vit_jax.models.encoder import Encoder, MlpBlock

Array = jax.Array
PAD_ID = 0

CELLS = {"lstm": nn.LSTMCell, "optimized_lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}
MERGES = {
    "concat": lambda a, b: jnp.concatenate([a, b], axis=-1),
    "sum": lambda a, b: a + b,
    "ave": lambda a, b: (a + b) / 2,
    "mul": lambda a, b: a * b,
}
ATTENTIONS = ("none", "bahdanau", "luong", "local")


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}: choose one of {sorted(choices)}.")


def sinusoidal_positions(length: int, width: int) -> np.ndarray:
  """`[length, width]` table of "Attention Is All You Need": sin on even, cos on odd channels."""
  pos = np.arange(length)[:, None]
  div = np.exp(np.arange(0, width, 2) * (-np.log(10000.0) / width))
  table = np.zeros((length, width), np.float32)
  table[:, 0::2] = np.sin(pos * div)
  table[:, 1::2] = np.cos(pos * div)[:, : width // 2]
  return table


class TokenInput(nn.Module):
  """One-hot vectors (character models, `embed_dim=None`) or a learned embedding (word models)."""
  vocab_size: int
  embed_dim: int | None = None

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    if self.embed_dim is None:
      return jax.nn.one_hot(tokens, self.vocab_size, dtype=jnp.float32)
    return nn.Embed(self.vocab_size, self.embed_dim, name="embedding")(tokens)


def _hidden(carry):
  """The output state of a carry: h of an LSTM's (c, h), the carry itself for a GRU."""
  return carry[1] if isinstance(carry, tuple) else carry


def _rnn_layers(x: Array, cell: str, hidden: int, num_layers: int, bidirectional: bool, merge: str,
                dropout_rate: float, deterministic: bool, lengths: Array | None = None,
                mask: Array | None = None) -> tuple[Array, tuple[Any, ...]]:
  """Stacked (bi-directional) RNN layers, built inside the calling module's compact `__call__`.

  Cells built with parent=None are adopted by their RNN: params at layer_i_{forward,backward}/cell.
  `lengths` stops each sequence's carry at its last valid step (the reverse pass starts there) and
  `mask` zeroes outputs on padding.  Returns (last layer's outputs, one merged final carry per layer).
  """
  carries = []
  for i in range(num_layers):
    if i:
      x = Dropout(dropout_rate)(x, deterministic)
    carry, y = nn.RNN(CELLS[cell](hidden, parent=None), return_carry=True, name=f"layer_{i}_forward")(
        x, seq_lengths=lengths)
    if bidirectional:
      carry_b, y_b = nn.RNN(CELLS[cell](hidden, parent=None), return_carry=True, reverse=True, keep_order=True,
                            name=f"layer_{i}_backward")(x, seq_lengths=lengths)
      y = MERGES[merge](y, y_b)
      carry = jax.tree_util.tree_map(MERGES[merge], carry, carry_b)
    x = y if mask is None else y * mask[..., None].astype(y.dtype)
    carries.append(carry)
  return x, tuple(carries)


class RNNEncoder(nn.Module):
  """Stacked, optionally bi-directional LSTM / GRU over `tokens: [batch, len]`.

  Returns `(outputs [batch, len, width] zeroed on padding, final carries (one per layer), mask)`.
  """
  vocab_size: int
  cell: str = "lstm"
  hidden: int = 256
  num_layers: int = 1
  bidirectional: bool = False
  merge: str = "concat"
  embed_dim: int | None = None
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens: Array, deterministic: bool = True):
    _check_choice("cell", self.cell, CELLS)
    _check_choice("merge mode", self.merge, MERGES)
    mask = tokens != PAD_ID
    lengths = jnp.maximum(mask.sum(-1), 1)  # a zero length would select the last (padding) carry
    x = TokenInput(self.vocab_size, self.embed_dim, name="input")(tokens)
    x, carries = _rnn_layers(x, self.cell, self.hidden, self.num_layers, self.bidirectional, self.merge,
                             self.dropout_rate, deterministic, lengths=lengths, mask=mask)
    return x, carries, mask


class RNNDecoderCell(nn.Module):
  """One decoder step: `(state, token [batch], memory) -> (state, (logits [batch, vocab], weights))`.

  state: {"rnn": one carry per layer, "feed": h~_{t-1} (Luong input feeding), "t": step [batch]}.
  memory: {"outputs": [batch, src, width], "mask": [batch, src], "keys": U_a h (Bahdanau)}.
  weights: the attention over the source, `[batch, src]` (zeros without attention).
  """
  vocab_size: int
  cell: str = "lstm"
  hidden: int = 256
  num_layers: int = 1
  attention: str = "none"
  score: str = "general"
  window: int = 10
  local_mode: str = "p"
  attention_features: int | None = None
  embed_dim: int | None = None
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, state: dict[str, Any], token: Array, memory: dict[str, Array], deterministic: bool = True):
    outputs, mask = memory["outputs"], memory["mask"]
    x = TokenInput(self.vocab_size, self.embed_dim, name="input")(token)
    weights = jnp.zeros(mask.shape, jnp.float32)
    if self.attention == "bahdanau":  # query: the previous top-layer state
      query = _hidden(state["rnn"][-1])
      context, w = AdditiveAttention(self.attention_features or self.hidden, keys_projected=True,
                                     name="attention")(query[:, None], memory["keys"], outputs,
                                                       mask=mask[:, None])
      context, weights = context[:, 0], w[:, 0]
      x = jnp.concatenate([x, context], axis=-1)
    elif self.attention in ("luong", "local"):  # input feeding
      x = jnp.concatenate([x, state["feed"]], axis=-1)

    carries = []
    h = x
    for i in range(self.num_layers):
      if i:
        h = Dropout(self.dropout_rate)(h, deterministic)
      carry, h = CELLS[self.cell](self.hidden, name=f"layer_{i}")(state["rnn"][i], h)
      carries.append(carry)
    new_state = dict(state, rnn=tuple(carries), t=state["t"] + 1)

    if self.attention in ("luong", "local"):
      if self.attention == "luong":
        context, w = LuongAttention(self.score, self.attention_features, name="attention")(
            h[:, None], outputs, mask=mask[:, None])
      else:
        context, w, _ = LocalAttention(self.window, self.local_mode, self.score, self.attention_features,
                                       name="attention")(h[:, None], outputs, mask=mask[:, None],
                                                         query_positions=state["t"][:, None])
      context, weights = context[:, 0], w[:, 0]
      out = jnp.tanh(nn.Dense(self.hidden, use_bias=False, name="W_c")(jnp.concatenate([context, h], -1)))
      new_state["feed"] = out
    elif self.attention == "bahdanau":
      out = jnp.concatenate([h, context], axis=-1)
    else:
      out = h
    out = Dropout(self.dropout_rate)(out, deterministic)
    logits = nn.Dense(self.vocab_size, name="output")(out)
    return new_state, (logits, weights)


class DecoderAttention(nn.Module):
  """Multi-head attention whose key / value projections can be computed once and cached.

  Parameters are named and shaped as in `flax.linen.MultiHeadDotProductAttention` (query / key / value
  kernels `[width, heads, head_dim]`, out kernel `[heads, head_dim, width]`).
  """
  num_heads: int
  width: int
  dropout_rate: float = 0.0

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}.")
    h, d = self.num_heads, self.width // self.num_heads
    init, zeros = nn.initializers.xavier_uniform(), nn.initializers.zeros
    self.query = _Projection((self.width, h, d), 1, True, init, zeros, jnp.float32)
    self.key = _Projection((self.width, h, d), 1, True, init, zeros, jnp.float32)
    self.value = _Projection((self.width, h, d), 1, True, init, zeros, jnp.float32)
    self.out = _Projection((h, d, self.width), 2, True, init, zeros, jnp.float32)

  @staticmethod
  def _heads(x: Array, projection) -> Array:
    kernel, bias = projection()
    return jnp.einsum("...e,ehd->...hd", x, kernel) + bias

  def key_value(self, x: Array) -> tuple[Array, Array]:
    """`x: [batch, len, width]` -> keys and values `[batch, len, heads, head_dim]`."""
    return self._heads(x, self.key), self._heads(x, self.value)

  def __call__(self, x: Array, key: Array, value: Array, mask: Array | None, deterministic: bool = True):
    """Attend from `x: [batch, q, width]`; returns `(y [batch, q, width], weights [batch, heads, q, kv])`."""
    q = self._heads(x, self.query)
    use_dropout = self.dropout_rate > 0 and not deterministic
    out, weights = dot_product_attention(
        q, key, value, mask=mask, dropout_rate=self.dropout_rate, deterministic=not use_dropout,
        dropout_rng=self.make_rng("dropout") if use_dropout else None, return_weights=True)
    kernel, bias = self.out()
    return jnp.einsum("...hd,hde->...e", out, kernel) + bias, weights


class DecoderBlock(nn.Module):
  """Pre-norm Transformer decoder block: causal self-attention, cross-attention, MLP; each branch's
  output dropped once (the MLP drops its own, and its hidden features at `hidden_dropout_rate`)."""
  num_heads: int
  width: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  hidden_dropout_rate: float | None = None

  def setup(self):
    self.norm_self = nn.LayerNorm(epsilon=1e-6)
    self.self_attention = DecoderAttention(self.num_heads, self.width, self.attention_dropout_rate)
    self.norm_cross = nn.LayerNorm(epsilon=1e-6)
    self.cross_attention = DecoderAttention(self.num_heads, self.width, self.attention_dropout_rate)
    self.norm_mlp = nn.LayerNorm(epsilon=1e-6)
    self.mlp = MlpBlock(self.mlp_dim, dropout_rate=self.dropout_rate, hidden_dropout_rate=self.hidden_dropout_rate)
    self.dropout = Dropout(self.dropout_rate)

  def memory_key_value(self, memory: Array) -> tuple[Array, Array]:
    return self.cross_attention.key_value(memory)

  def __call__(self, x: Array, cross_kv, cross_mask: Array, *, cache=None, index=None,
               deterministic: bool = True):
    """Teacher forcing (`cache=None`: causal over all of `x`) or one cached step (`x: [batch, 1, width]`).

    Returns `(x, new cache or None, cross-attention weights [batch, heads, q, src])`.
    """
    y = self.norm_self(x)
    k, v = self.self_attention.key_value(y)
    if cache is None:
      self_mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    else:  # write this step's key / value at `index`, attend to positions <= index
      cache, self_mask = update_cache(cache, k, v, index)
      k, v = cache["key"], cache["value"]
    y, _ = self.self_attention(y, k, v, self_mask, deterministic)
    x = x + self.dropout(y, deterministic)
    y, weights = self.cross_attention(self.norm_cross(x), *cross_kv, cross_mask, deterministic)
    x = x + self.dropout(y, deterministic)
    x = x + self.mlp(self.norm_mlp(x), deterministic)
    return x, cache, weights


class Seq2Seq(nn.Module):
  """Encoder-decoder for `source [batch, src]` -> `target_in [batch, tgt]` (see the module docstring).

  RNN attributes: cell ("lstm" / "gru" / "optimized_lstm"), hidden (per direction), num_layers,
  bidirectional, merge, attention ("none" / "bahdanau" / "luong" / "local"), score ("dot" / "general" /
  "concat"), window (D of local attention), local_mode ("m" / "p"), attention_features, embed_dim
  (None = one-hot inputs), dropout_rate.
  Transformer attributes (kind="transformer"): hidden (the model width), num_layers, num_heads, mlp_dim,
  dropout_rate (embeddings and every branch's output), hidden_dropout_rate (the MLPs' hidden features;
  default dropout_rate), attention_dropout_rate, max_len (of the position table).
  """
  source_vocab: int
  target_vocab: int
  kind: Literal["rnn", "transformer"] = "rnn"
  cell: str = "lstm"
  hidden: int = 256
  num_layers: int = 1
  bidirectional: bool = False
  merge: str = "concat"
  attention: str = "none"
  score: str = "general"
  window: int = 10
  local_mode: str = "p"
  attention_features: int | None = None
  embed_dim: int | None = None
  dropout_rate: float = 0.0
  num_heads: int = 4
  mlp_dim: int = 512
  attention_dropout_rate: float = 0.0
  hidden_dropout_rate: float | None = None
  max_len: int = 256

  def setup(self):
    _check_choice("seq2seq kind", self.kind, ("rnn", "transformer"))
    if self.kind == "rnn":
      _check_choice("attention", self.attention, ATTENTIONS)
      _check_choice("merge mode", self.merge, MERGES)
      self.encoder = RNNEncoder(self.source_vocab, self.cell, self.hidden, self.num_layers, self.bidirectional,
                                self.merge, self.embed_dim, self.dropout_rate)
      self.decoder = RNNDecoderCell(self.target_vocab, self.cell, self.decoder_width, self.num_layers,
                                    self.attention, self.score, self.window, self.local_mode,
                                    self.attention_features, self.embed_dim, self.dropout_rate)
      if self.attention == "bahdanau":  # U_a h_j, once per source
        self.attention_key = nn.Dense(self.attention_features or self.decoder_width, use_bias=False)
    else:
      w = self.hidden
      self.source_embed = nn.Embed(self.source_vocab, w, embedding_init=nn.initializers.normal(w ** -0.5))
      self.target_embed = nn.Embed(self.target_vocab, w, embedding_init=nn.initializers.normal(w ** -0.5))
      self.encoder = Encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                             dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                             hidden_dropout_rate=self.hidden_dropout_rate)
      self.blocks = [DecoderBlock(self.num_heads, w, self.mlp_dim, self.dropout_rate, self.attention_dropout_rate,
                                  self.hidden_dropout_rate, name=f"decoderblock_{i}")
                     for i in range(self.num_layers)]
      self.decoder_norm = nn.LayerNorm(epsilon=1e-6)
      self.output = nn.Dense(self.target_vocab)
      self.dropout = Dropout(self.dropout_rate)

  @property
  def decoder_width(self) -> int:
    return self.hidden * 2 if self.bidirectional and self.merge == "concat" else self.hidden

  # ---------------------------------------------------------------- encoder
  def _positions(self, length: int) -> Array:
    if length > self.max_len:
      raise ValueError(f"Sequence of length {length} exceeds max_len={self.max_len}: raise the model's max_len.")
    return jnp.asarray(sinusoidal_positions(self.max_len, self.hidden)[:length])

  def encode(self, source: Array, deterministic: bool = True) -> dict[str, Any]:
    """The decoder's memory: a pytree whose leaves all have the batch first."""
    if self.kind == "rnn":
      outputs, carries, mask = self.encoder(source, deterministic)
      memory = {"outputs": outputs, "mask": mask, "final": carries}
      if self.attention == "bahdanau":
        memory["keys"] = self.attention_key(outputs)
      return memory
    mask = source != PAD_ID
    x = self.source_embed(source) * np.sqrt(self.hidden)
    x, _ = self.encoder(x, posemb=self._positions(source.shape[1])[None], mask=mask[:, None, None, :],
                        deterministic=deterministic)
    cross = tuple(block.memory_key_value(x) for block in self.blocks)
    return {"outputs": x, "mask": mask, "cross_kv": cross}

  # ---------------------------------------------------------------- decoder
  def initial_state(self, memory: dict[str, Any], max_len: int | None = None) -> dict[str, Any]:
    """Decoder state before the first step (`max_len`: the Transformer's cache length)."""
    batch = memory["mask"].shape[0]
    if self.kind == "rnn":
      state = {"rnn": memory["final"], "t": jnp.zeros((batch,), jnp.int32)}
      state["feed"] = jnp.zeros((batch, self.decoder_width), jnp.float32)
      return state
    max_len = max_len or self.max_len
    h = self.num_heads
    return {"cache": tuple(init_cache(batch, max_len, h, self.hidden // h) for _ in self.blocks),
            "index": jnp.zeros((), jnp.int32)}

  def step(self, state: dict[str, Any], tokens: Array, memory: dict[str, Any], deterministic: bool = True):
    """One decoding step: `tokens [batch]` -> `(state, logits [batch, vocab], weights [batch, src])`."""
    if self.kind == "rnn":
      state, (logits, weights) = self.decoder(state, tokens, memory, deterministic)
      return state, logits, weights
    index = state["index"]
    positions = jax.lax.dynamic_slice_in_dim(jnp.asarray(sinusoidal_positions(self.max_len, self.hidden)),
                                             index, 1)
    x = self.target_embed(tokens[:, None]) * np.sqrt(self.hidden) + positions[None]
    cross_mask = memory["mask"][:, None, None, :]
    caches = []
    for block, cache, kv in zip(self.blocks, state["cache"], memory["cross_kv"]):
      x, cache, weights = block(x, kv, cross_mask, cache=cache, index=index, deterministic=deterministic)
      caches.append(cache)
    logits = self.output(self.decoder_norm(x))[:, 0]
    return {"cache": tuple(caches), "index": index + 1}, logits, weights[:, :, 0].mean(1)

  # ---------------------------------------------------------------- training pass
  def __call__(self, source: Array, target_in: Array, *, use_truth: Array | None = None,
               deterministic: bool = True):
    """Logits `[batch, tgt, vocab]` and attention weights `[batch, tgt, src]` for `target_in`.

    `use_truth: [batch, tgt] bool` is scheduled sampling: where False, the decoder reads its own
    previous prediction (the argmax, no gradient through the choice) instead of `target_in`.  The first
    position is always the start token.  None = teacher forcing everywhere.
    """
    memory = self.encode(source, deterministic)
    if self.kind == "transformer":
      return self._transformer_forward(memory, target_in, use_truth, deterministic)
    if use_truth is None:
      use_truth = jnp.ones(target_in.shape, bool)
    use_truth = use_truth.at[:, 0].set(True)

    def body(cell, carry, xs):
      state, previous = carry
      truth, take_truth = xs
      tokens = jnp.where(take_truth, truth, previous)
      state, (logits, weights) = cell(state, tokens, memory, deterministic)
      return (state, jnp.argmax(logits, -1).astype(tokens.dtype)), (logits, weights)

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                   in_axes=1, out_axes=1)
    state = self.initial_state(memory)
    _, (logits, weights) = scan(self.decoder, (state, target_in[:, 0]), (target_in, use_truth))
    return logits, weights

  def _decode_all(self, memory, target_in, deterministic):
    x = self.target_embed(target_in) * np.sqrt(self.hidden) + self._positions(target_in.shape[1])[None]
    x = self.dropout(x, deterministic)
    cross_mask = memory["mask"][:, None, None, :]
    for block, kv in zip(self.blocks, memory["cross_kv"]):
      x, _, weights = block(x, kv, cross_mask, deterministic=deterministic)
    return self.output(self.decoder_norm(x)), weights.mean(1)

  def _transformer_forward(self, memory, target_in, use_truth, deterministic):
    if use_truth is None:
      return self._decode_all(memory, target_in, deterministic)
    # Scheduled sampling for a parallel decoder (two passes): predict with teacher forcing, then feed
    # those predictions (shifted right, no gradient) where `use_truth` is False.
    first, _ = self._decode_all(memory, target_in, deterministic)
    predicted = jax.lax.stop_gradient(jnp.argmax(first, -1)).astype(target_in.dtype)
    shifted = jnp.concatenate([target_in[:, :1], predicted[:, :-1]], axis=1)
    mixed = jnp.where(use_truth.at[:, 0].set(True), target_in, shifted)
    return self._decode_all(memory, mixed, deterministic)


class BiRNNClassifier(nn.Module):
  """The classic bi-directional LSTM image classifier: each image row is one time step.

  `images [batch, height, width, channels]` -> a sequence of `height` vectors of width * channels values;
  the forward direction's last output and the backward direction's last output (after reading row 0)
  are merged (concat, as Keras' Bidirectional(LSTM) with return_sequences=False) and classified.
  Returns `(logits, {})` like `VisionTransformer`, so the classification task trains it unchanged.
  """
  num_classes: int
  cell: str = "lstm"
  hidden: int = 128
  num_layers: int = 1
  merge: str = "concat"
  dropout_rate: float = 0.0
  channels: int = 1

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False):
    _check_choice("cell", self.cell, CELLS)
    _check_choice("merge mode", self.merge, MERGES)
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"BiRNNClassifier expects images [batch, height, width, {self.channels}], got "
                       f"{images.shape}.")
    x = images.reshape(images.shape[0], images.shape[1], -1)
    _, carries = _rnn_layers(x, self.cell, self.hidden, self.num_layers, True, self.merge, self.dropout_rate,
                             not train)
    # The forward carry has read the last row and the backward carry row 0: their merged outputs.
    last = _hidden(carries[-1])
    last = Dropout(self.dropout_rate)(last, not train)
    return nn.Dense(self.num_classes, name="head")(last), {}


__all__: Sequence[str] = ("Seq2Seq", "BiRNNClassifier", "RNNEncoder", "RNNDecoderCell", "DecoderBlock", "DecoderAttention",
                          "sinusoidal_positions", "CELLS", "MERGES", "ATTENTIONS")
