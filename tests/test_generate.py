"""The decoding loop's token choice: greedy, temperature and top-k sampling against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import decode

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)


def frequencies(tokens, vocab=5):
  return np.bincount(np.asarray(tokens).ravel(), minlength=vocab) / np.asarray(tokens).size


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, None), (2.0, None), (1.0, 2), (2.0, 3)])
def test_sampling_draws_from_the_tempered_top_k_softmax(temperature, top_k):
  """20,000 draws: each token's frequency within 4 standard errors of softmax(logits / T) restricted to the
  top k (renormalised); tokens outside the top k never appear."""
  n = 20000
  logits = jnp.broadcast_to(LOGITS, (n, 5))
  tokens = decode.choose(logits, jax.random.PRNGKey(0), temperature=temperature, top_k=top_k)
  want = LOGITS / temperature
  if top_k:
    want = np.where(np.arange(5) < top_k, want, -np.inf)  # LOGITS are sorted
  p = softmax(want)
  got = frequencies(tokens)
  assert np.all(np.abs(got - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-12), (got, p)
  assert np.all(got[p == 0] == 0)


def test_greedy_and_bad_settings():
  logits = jnp.asarray([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
  assert decode.choose(logits).tolist() == [1, 0]
  assert decode.choose(logits, jax.random.PRNGKey(0), temperature=1.0, top_k=1).tolist() == [1, 0]
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    decode.choose(logits, temperature=-1.0)
  with pytest.raises(ValueError, match="needs an rng"):
    decode.choose(logits, temperature=1.0)
  with pytest.raises(ValueError, match="top_k must be"):
    decode.choose(logits, jax.random.PRNGKey(0), temperature=1.0, top_k=0)


def test_generate_feeds_tokens_back_stops_at_the_end_and_pads():
  """A counting step function: the state counts steps, the logits pick (previous + 1) mod 6, token 4 ends;
  sequence 1 starts at 3 so it ends first, and its later positions are padding and zero extras."""
  def step(count, previous):
    logits = jax.nn.one_hot((previous + 1) % 6, 6) * 10.0
    return count + 1, logits, previous.astype(jnp.float32)[:, None] * jnp.ones((1, 2))

  tokens, extras = jax.jit(lambda f: decode.generate(step, jnp.int32(0), f, steps=8, end_id=4, pad_id=0))(
      jnp.asarray([0, 2], jnp.int32))
  assert np.asarray(tokens).tolist() == [[1, 2, 3, 4, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0, 0, 0]]
  assert extras.shape == (2, 8, 2)
  assert np.asarray(extras[:, :, 0]).tolist() == [[0, 1, 2, 3, 0, 0, 0, 0], [2, 3, 0, 0, 0, 0, 0, 0]]
