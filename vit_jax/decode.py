"""Autoregressive decoding: one loop for the seq2seq decoders and Image GPT; beam search.

`generate` runs any step function `step(state, tokens [batch]) -> (state, logits [batch, vocab], extra)`
under `jax.jit` with static shapes: one `lax.while_loop` over at most `steps` tokens that feeds each
chosen token back, stops early once every sequence has ended, and picks tokens greedily
(temperature 0) or by sampling with a temperature and top-k.  The decoder state (RNN carries, or a
Transformer's key / value cache) is carried through the loop.

    greedy_fn = jax.jit(functools.partial(greedy, model, max_len=80))
    tokens, weights = greedy_fn(variables, source)             # [batch, 80] ids, [batch, 80, src]
    tokens, _ = sample(model, variables, source, rng, max_len=80, temperature=0.8, top_k=20)
    out = beam_search(model, variables, source, max_len=80, beam_size=4, alpha=0.6)
    pixels = complete_images(igpt, variables, prompt, rng, length=64, temperature=1.0)   # Image GPT

Seq2seq output ids include the end token; positions after it are padding (0).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.data.text import END_ID, PAD_ID, START_ID

NEG_INF = -1.0e9

StepFn = Callable[[Any, jax.Array], tuple[Any, jax.Array, Any]]


def choose(logits: jax.Array, rng: jax.Array | None = None, *, temperature: float = 0.0,
           top_k: int | None = None) -> jax.Array:
  """Token ids `[batch]` from `logits [batch, vocab]`: the argmax at temperature 0, otherwise a sample from
  softmax(logits / temperature) restricted to the `top_k` most probable tokens (ties with the k-th kept)."""
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  if top_k is not None and not 1 <= top_k:
    raise ValueError(f"top_k must be a positive number of tokens, got {top_k}.")
  if temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  if rng is None:
    raise ValueError("Sampling (temperature > 0) needs an rng.")
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(step: StepFn, state: Any, first: jax.Array, *, steps: int, rng: jax.Array | None = None,
             temperature: float = 0.0, top_k: int | None = None, end_id: int | None = None,
             pad_id: int = PAD_ID) -> tuple[jax.Array, Any]:
  """Feed `first [batch]` to `step`, then each chosen token, for at most `steps` tokens.

  A sequence ends after it chooses `end_id` (None: never); later positions hold `pad_id` and zero
  extras, and the loop stops once all have ended.  Sampling draws step i's tokens with
  `fold_in(rng, i)`.  Returns `(tokens [batch, steps], extras [batch, steps, ...])`, the extras being
  what `step` returns beside the logits (None for none).
  """
  batch = first.shape[0]
  _, _, extra_shape = jax.eval_shape(step, state, first)
  extras = jax.tree_util.tree_map(lambda s: jnp.zeros((batch, steps) + s.shape[1:], jnp.float32), extra_shape)

  def cond(carry):
    i, done = carry[2], carry[5]
    return (i < steps) & ~jnp.all(done)

  def body(carry):
    state, previous, i, tokens, extras, done = carry
    state, logits, extra = step(state, previous)
    key = None if rng is None else jax.random.fold_in(rng, i)
    token = jnp.where(done, pad_id, choose(logits, key, temperature=temperature, top_k=top_k))
    tokens = tokens.at[:, i].set(token)
    put = lambda acc, e: acc.at[:, i].set(
        jnp.where(done.reshape((-1,) + (1,) * (e.ndim - 1)), 0.0, e.astype(jnp.float32)))
    extras = jax.tree_util.tree_map(put, extras, extra)
    if end_id is not None:
      done = done | (token == end_id)
    return state, token, i + 1, tokens, extras, done

  init = (state, first.astype(jnp.int32), jnp.int32(0), jnp.zeros((batch, steps), jnp.int32), extras,
          jnp.zeros((batch,), bool))
  _, _, _, tokens, extras, _ = jax.lax.while_loop(cond, body, init)
  return tokens, extras


def _encode(model, variables, source: jax.Array, max_len: int):
  memory = model.apply(variables, source, method="encode")
  state = model.apply(variables, memory, max_len, method="initial_state")
  return memory, state


def _step(model, variables, state, tokens, memory):
  return model.apply(variables, state, tokens, memory, method="step")


def greedy(model, variables, source: jax.Array, *, max_len: int) -> tuple[jax.Array, jax.Array]:
  """Most probable token at every step.  Returns `(tokens [batch, max_len], weights [batch, max_len, src])`."""
  return sample(model, variables, source, None, max_len=max_len)


def sample(model, variables, source: jax.Array, rng: jax.Array | None, *, max_len: int,
           temperature: float = 0.0, top_k: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Seq2seq decoding by `generate` (greedy at temperature 0): `(tokens, weights [batch, max_len, src])`."""
  memory, state = _encode(model, variables, source, max_len)
  step = lambda state, tokens: _step(model, variables, state, tokens, memory)
  first = jnp.full((source.shape[0],), START_ID, jnp.int32)
  return generate(step, state, first, steps=max_len, rng=rng, temperature=temperature, top_k=top_k,
                  end_id=END_ID)


def complete_images(model, variables, prompt: jax.Array, rng: jax.Array | None, *, length: int | None = None,
                    temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
  """Image GPT: continue palette ids `prompt [batch, P]` (raster order; P may be 0) to `length` tokens
  (default the model's positions), sampling with a key / value cache.  Returns `[batch, length]` ids,
  the prompt first.  The prompt goes through the model at once; then one token per step.
  """
  from vit_jax.models.igpt import init_cache

  batch, p = prompt.shape
  length = length or model.num_positions
  if not 0 <= p < length <= model.num_positions:
    raise ValueError(f"A prompt of {p} tokens cannot be completed to {length} with {model.num_positions} "
                     "positions: the prompt must be shorter than length, and length at most the positions.")
  prompt = jnp.asarray(prompt, jnp.int32)
  sos = jnp.full((batch, 1), model.vocab_size, jnp.int32)
  state = {"cache": init_cache(model, batch, length), "index": jnp.int32(0)}
  if p:  # the SOS and every prompt token but the last fill the cache; the last one is fed to the loop
    _, out = model.apply(variables, jnp.concatenate([sos, prompt[:, :-1]], 1), cache=state["cache"],
                         cache_index=0)
    state = {"cache": out["cache"], "index": jnp.int32(p)}

  def step(state, tokens):
    logits, out = model.apply(variables, tokens[:, None], cache=state["cache"], cache_index=state["index"])
    return {"cache": out["cache"], "index": state["index"] + 1}, logits[:, 0], None

  first = prompt[:, -1] if p else sos[:, 0]
  tokens, _ = generate(step, state, first, steps=length - p, rng=rng, temperature=temperature, top_k=top_k)
  return jnp.concatenate([prompt, tokens], axis=1)


def greedy_python(model, variables, source, *, max_len: int, step_fn: Callable | None = None):
  """The same decoding as `greedy` as a plain Python loop over steps (one jitted step per token).

  The reference point of `bench/decode.py`; `step_fn(variables, state, tokens, memory)` may be passed in
  so its compilation is reused across calls.
  """
  step_fn = step_fn or jax.jit(functools.partial(_step, model))
  memory, state = _encode(model, variables, source, max_len)
  batch = source.shape[0]
  previous = jnp.full((batch,), START_ID, jnp.int32)
  done = np.zeros((batch,), bool)
  tokens = np.zeros((batch, max_len), np.int32)
  for i in range(max_len):
    state, logits, _ = step_fn(variables, state, previous, memory)
    token = np.where(done, PAD_ID, np.asarray(jnp.argmax(logits, -1)))
    tokens[:, i] = token
    done |= token == END_ID
    if done.all():
      break
    previous = jnp.asarray(token, jnp.int32)
  return tokens


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT: ((5 + length) / 6) ** alpha; alpha = 0 turns it off."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _expand(tree: Any, k: int) -> Any:
  """Repeat every batch-leading leaf k times: [e0, e0, e1, e1, ...] (scalars are left alone)."""
  return jax.tree_util.tree_map(lambda a: jnp.repeat(a, k, axis=0) if jnp.ndim(a) else a, tree)


def _gather(tree: Any, beams: jax.Array, batch: int, k: int) -> Any:
  """Select beams `[batch, k']` from a tree whose leaves are `[batch * k, ...]` (flattened beams)."""
  def take(a):
    if not jnp.ndim(a):
      return a
    a = a.reshape((batch, k) + a.shape[1:])
    out = jnp.take_along_axis(a, beams.reshape(beams.shape + (1,) * (a.ndim - 2)), axis=1)
    return out.reshape((-1,) + a.shape[2:])
  return jax.tree_util.tree_map(take, tree)


def beam_search(model, variables, source: jax.Array, *, max_len: int, beam_size: int = 4,
                alpha: float = 0.6) -> dict[str, jax.Array]:
  """Beam search with the GNMT length penalty.

  Each step extends every live beam by every token and keeps the 2k best candidates, so k of them can
  still be live when up to k end at once.  A candidate that ends and ranks among the k best (as in
  fairseq) scores log p / lp(length) and competes with the finished set; the search stops at `max_len`, or when no live beam (whose log-probability can
  only fall) could beat the worst finished one even at the longest length.  An input with no finished
  beam returns its best live one.  With beam_size 1 and alpha 0 this is greedy decoding.

  Returns {"tokens": [batch, max_len] (the best), "score", "weights": [batch, max_len, src],
           "beams": [batch, k, max_len] and "beam_scores": [batch, k] (best first)}.
  """
  k = beam_size
  batch, src = source.shape
  memory, state = _encode(model, variables, source, max_len)
  memory, state = _expand(memory, k), _expand(state, k)
  vocab_pos = jnp.arange(max_len)

  def cond(c):
    i, live_logp, fin_scores = c["i"], c["live_logp"], c["fin_scores"]
    best_possible = live_logp[:, 0] / length_penalty(jnp.int32(max_len), alpha)
    can_improve = best_possible > jnp.min(fin_scores, axis=1)
    return (i < max_len) & jnp.any(can_improve)

  def body(c):
    i = c["i"]
    state, logits, w = _step(model, variables, c["state"], c["previous"].reshape(-1), memory)
    vocab = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, vocab)
    logp = logp + c["live_logp"][:, :, None]
    cand_logp, flat = jax.lax.top_k(logp.reshape(batch, k * vocab), 2 * k)
    cand_beam, cand_token = flat // vocab, (flat % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(c["live_seqs"], cand_beam[:, :, None], axis=1)
    seqs = jnp.where(vocab_pos[None, None] == i, cand_token[:, :, None], seqs)
    w = w.astype(jnp.float32).reshape(batch, k, src)
    attn = jnp.take_along_axis(c["live_attn"], cand_beam[:, :, None, None], axis=1)
    attn = jnp.where((vocab_pos == i)[None, None, :, None], jnp.take_along_axis(w, cand_beam[:, :, None], 1)[:, :, None],
                     attn)
    ended = cand_token == END_ID
    # as in fairseq, a candidate that ends finishes only if it ranks among the k best candidates
    finishes = ended & (jnp.arange(2 * k) < k)[None]

    # live: the k best candidates that did not end
    live_logp, top = jax.lax.top_k(jnp.where(ended, NEG_INF, cand_logp), k)
    take = lambda a: jnp.take_along_axis(a, top.reshape(top.shape + (1,) * (a.ndim - 2)), axis=1)
    new_state = _gather(state, jnp.take_along_axis(cand_beam, top, axis=1), batch, k)

    # finished: merge the candidates that ended into the k best so far
    scores = jnp.where(finishes, cand_logp / length_penalty(i + 1, alpha), NEG_INF)
    all_scores = jnp.concatenate([c["fin_scores"], scores], axis=1)
    fin_scores, best = jax.lax.top_k(all_scores, k)
    pick = lambda old, new: jnp.take_along_axis(jnp.concatenate([old, new], 1),
                                                best.reshape(best.shape + (1,) * (old.ndim - 2)), axis=1)
    return {"i": i + 1, "state": new_state, "previous": take(cand_token), "live_logp": live_logp,
            "live_seqs": take(seqs), "live_attn": take(attn), "fin_scores": fin_scores,
            "fin_seqs": pick(c["fin_seqs"], seqs), "fin_attn": pick(c["fin_attn"], attn)}

  init = {
      "i": jnp.int32(0), "state": state, "previous": jnp.full((batch, k), START_ID, jnp.int32),
      # one live beam at the start, so the first step does not fill the beam with k copies
      "live_logp": jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1)),
      "live_seqs": jnp.zeros((batch, k, max_len), jnp.int32), "live_attn": jnp.zeros((batch, k, max_len, src)),
      "fin_scores": jnp.full((batch, k), NEG_INF, jnp.float32),
      "fin_seqs": jnp.zeros((batch, k, max_len), jnp.int32), "fin_attn": jnp.zeros((batch, k, max_len, src)),
  }
  c = jax.lax.while_loop(cond, body, init)
  any_finished = c["fin_scores"][:, 0] > NEG_INF / 2
  live_scores = c["live_logp"] / length_penalty(jnp.int32(max_len), alpha)
  beams = jnp.where(any_finished[:, None, None], c["fin_seqs"], c["live_seqs"])
  beam_scores = jnp.where(any_finished[:, None], c["fin_scores"], live_scores)
  attn = jnp.where(any_finished[:, None, None, None], c["fin_attn"], c["live_attn"])
  return {"tokens": beams[:, 0], "score": beam_scores[:, 0], "weights": attn[:, 0], "beams": beams,
          "beam_scores": beam_scores}

