"""Seq2seq models and decoding: torch LSTM/GRU parity, attention masks, cached steps, greedy and beam search."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import decode
from vit_jax.data.text import END_ID
from vit_jax.models.seq2seq import BiRNNClassifier, RNNEncoder, Seq2Seq
from vit_jax.train.tasks import truth_probability

torch = pytest.importorskip("torch")
TOL = 1e-5

SOURCE = np.array([[5, 6, 7, 8, 9, 0, 0, 0, 0],   # lengths 5, 9, 1, 3
                   [5, 5, 6, 6, 7, 7, 8, 8, 9],
                   [9, 0, 0, 0, 0, 0, 0, 0, 0],
                   [4, 10, 11, 0, 0, 0, 0, 0, 0]], np.int32)
TARGET_IN = np.array([[1, 5, 6, 7, 0, 0], [1, 7, 7, 7, 7, 6], [1, 4, 0, 0, 0, 0], [1, 9, 9, 8, 0, 0]], np.int32)
LENGTHS = (SOURCE != 0).sum(1)


def perturbed_torch(module, seed=0):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(0.5 * torch.randn_like(p))
  return module.eval()


def lstm_params(sd, suffix):
  """torch.nn.LSTM weights (gates i, f, g, o) as flax LSTMCell params; torch's two biases add up."""
  w_ih, w_hh = sd[f"weight_ih{suffix}"].numpy(), sd[f"weight_hh{suffix}"].numpy()
  b = sd[f"bias_ih{suffix}"].numpy() + sd[f"bias_hh{suffix}"].numpy()
  out = {}
  for k, gate in enumerate("ifgo"):
    rows = slice(k * w_hh.shape[1], (k + 1) * w_hh.shape[1])
    out[f"i{gate}"] = {"kernel": w_ih[rows].T}
    out[f"h{gate}"] = {"kernel": w_hh[rows].T, "bias": b[rows]}
  return out


def gru_params(sd, suffix):
  """torch.nn.GRU weights (gates r, z, n) as flax GRUCell params: b_hr, b_hz fold into the input biases."""
  w_ih, w_hh = sd[f"weight_ih{suffix}"].numpy(), sd[f"weight_hh{suffix}"].numpy()
  b_ih, b_hh = sd[f"bias_ih{suffix}"].numpy(), sd[f"bias_hh{suffix}"].numpy()
  h = w_hh.shape[1]
  r, z, n = (slice(k * h, (k + 1) * h) for k in range(3))
  return {"ir": {"kernel": w_ih[r].T, "bias": b_ih[r] + b_hh[r]}, "iz": {"kernel": w_ih[z].T, "bias": b_ih[z] + b_hh[z]},
          "in": {"kernel": w_ih[n].T, "bias": b_ih[n]}, "hr": {"kernel": w_hh[r].T}, "hz": {"kernel": w_hh[z].T},
          "hn": {"kernel": w_hh[n].T, "bias": b_hh[n]}}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cells_match_torch_with_initial_state(cell):
  """A whole sequence through nn.RNN(cell) equals torch.nn.LSTM / GRU; carries convert (c, h) <-> (h, c)."""
  batch, steps, features, hidden = 3, 7, 5, 6
  ref = perturbed_torch((torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(features, hidden, batch_first=True))
  sd = ref.state_dict()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, steps, features)).astype(np.float32)
  h0 = rng.normal(size=(batch, hidden)).astype(np.float32)
  c0 = rng.normal(size=(batch, hidden)).astype(np.float32)
  with torch.no_grad():
    if cell == "lstm":
      y_ref, (h_ref, c_ref) = ref(torch.from_numpy(x), (torch.from_numpy(h0[None]), torch.from_numpy(c0[None])))
    else:
      y_ref, h_ref = ref(torch.from_numpy(x), torch.from_numpy(h0[None]))
  flax_cell = (nn.LSTMCell if cell == "lstm" else nn.GRUCell)(hidden, parent=None)
  rnn = nn.RNN(flax_cell, return_carry=True)
  params = {"cell": lstm_params(sd, "_l0") if cell == "lstm" else gru_params(sd, "_l0")}
  carry0 = (jnp.asarray(c0), jnp.asarray(h0)) if cell == "lstm" else jnp.asarray(h0)
  init_shapes = jax.tree_util.tree_map(np.shape, rnn.init(jax.random.key(0), x)["params"])
  assert jax.tree_util.tree_map(np.shape, params) == init_shapes
  carry, y = rnn.apply({"params": params}, x, initial_carry=carry0)
  np.testing.assert_allclose(y, y_ref.numpy(), atol=TOL, rtol=0)
  if cell == "lstm":
    np.testing.assert_allclose(carry[0], c_ref[0].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(carry[1], h_ref[0].numpy(), atol=TOL, rtol=0)
  else:
    np.testing.assert_allclose(carry, h_ref[0].numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_stacked_encoder_matches_packed_torch(cell):
  """Padding is skipped in the reverse pass: outputs and final states equal torch on packed sequences."""
  vocab, hidden, layers = 12, 5, 2
  ref = perturbed_torch((torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(
      vocab, hidden, num_layers=layers, batch_first=True, bidirectional=True), seed=1)
  sd = ref.state_dict()
  convert = lstm_params if cell == "lstm" else gru_params
  params = {f"layer_{i}_{d}": {"cell": convert(sd, f"_l{i}{'_reverse' if d == 'backward' else ''}")}
            for i in range(layers) for d in ("forward", "backward")}
  encoder = RNNEncoder(vocab, cell=cell, hidden=hidden, num_layers=layers, bidirectional=True, merge="concat")
  outputs, carries, mask = encoder.apply({"params": params}, jnp.asarray(SOURCE))
  onehot = torch.nn.functional.one_hot(torch.from_numpy(SOURCE).long(), vocab).float()
  packed = torch.nn.utils.rnn.pack_padded_sequence(onehot, torch.from_numpy(LENGTHS), batch_first=True,
                                                   enforce_sorted=False)
  with torch.no_grad():
    y, state = ref(packed)
  y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=SOURCE.shape[1])
  np.testing.assert_allclose(outputs, y.numpy(), atol=TOL, rtol=0)  # padding: 0 on both sides
  h_ref = (state[0] if cell == "lstm" else state).numpy().reshape(layers, 2, len(SOURCE), hidden)
  for i in range(layers):
    h = carries[i][1] if cell == "lstm" else carries[i]
    np.testing.assert_allclose(h, np.concatenate([h_ref[i, 0], h_ref[i, 1]], -1), atol=TOL, rtol=0)
  assert np.array_equal(mask, SOURCE != 0)


def test_birnn_classifier_matches_torch():
  """Rows as time steps through a 2-layer bi-LSTM; the head reads [forward at the last row, backward at row 0]."""
  hidden, layers, classes = 6, 2, 4
  ref = perturbed_torch(torch.nn.LSTM(8, hidden, num_layers=layers, batch_first=True, bidirectional=True), seed=2)
  head = perturbed_torch(torch.nn.Linear(2 * hidden, classes), seed=3)
  sd = ref.state_dict()
  params = {f"layer_{i}_{d}": {"cell": lstm_params(sd, f"_l{i}{'_reverse' if d == 'backward' else ''}")}
            for i in range(layers) for d in ("forward", "backward")}
  params["head"] = {"kernel": head.weight.detach().numpy().T, "bias": head.bias.detach().numpy()}
  images = np.random.default_rng(0).normal(size=(3, 5, 8, 1)).astype(np.float32)
  model = BiRNNClassifier(classes, hidden=hidden, num_layers=layers)
  init_shapes = jax.tree_util.tree_map(np.shape, model.init(jax.random.key(0), jnp.asarray(images))["params"])
  assert jax.tree_util.tree_map(np.shape, params) == init_shapes
  logits, _ = model.apply({"params": params}, jnp.asarray(images))
  with torch.no_grad():
    y, _ = ref(torch.from_numpy(images[..., 0]))
    expected = head(torch.cat([y[:, -1, :hidden], y[:, 0, hidden:]], -1)).numpy()
  np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)
  with pytest.raises(ValueError, match=r"expects images \[batch, height, width, 1\]"):
    model.apply({"params": params}, jnp.zeros((3, 5, 8, 3)))


@pytest.mark.parametrize("merge,fn", [("sum", np.add), ("ave", lambda a, b: (a + b) / 2), ("mul", np.multiply)])
def test_merge_modes(merge, fn):
  base = RNNEncoder(12, hidden=4, bidirectional=True, merge="concat")
  params = base.init(jax.random.key(0), jnp.asarray(SOURCE))
  cat, _, _ = base.apply(params, jnp.asarray(SOURCE))
  out, _, _ = RNNEncoder(12, hidden=4, bidirectional=True, merge=merge).apply(params, jnp.asarray(SOURCE))
  np.testing.assert_allclose(out, fn(cat[..., :4], cat[..., 4:]), atol=1e-6)


MODELS = {
    "bahdanau": dict(attention="bahdanau", bidirectional=True, hidden=8),
    "luong_dot": dict(attention="luong", score="dot", hidden=16),
    "luong_general_gru_2layers": dict(attention="luong", score="general", cell="gru", num_layers=2, hidden=16),
    "luong_concat": dict(attention="luong", score="concat", hidden=16),
    "local_m": dict(attention="local", local_mode="m", window=20, hidden=16),
    "local_p": dict(attention="local", local_mode="p", window=3, hidden=16, embed_dim=8),
    "transformer": dict(kind="transformer", hidden=32, num_heads=4, mlp_dim=64, num_layers=2),
}


@functools.lru_cache(maxsize=None)
def built(name):
  model = Seq2Seq(13, 11, **MODELS[name])
  variables = model.init(jax.random.key(3), jnp.asarray(SOURCE), jnp.asarray(TARGET_IN))
  return model, variables


@pytest.mark.parametrize("name", list(MODELS))
def test_attention_weights_sum_to_one_and_skip_padding(name):
  model, variables = built(name)
  logits, weights = model.apply(variables, jnp.asarray(SOURCE), jnp.asarray(TARGET_IN))
  assert logits.shape == TARGET_IN.shape + (11,)
  weights = np.asarray(weights)
  pad = SOURCE == 0
  assert np.all(weights[np.broadcast_to(pad[:, None, :], weights.shape)] == 0.0)
  sums = weights.sum(-1)
  if name == "local_p":  # a Gaussian scales the windowed softmax (Luong): at most 1, never renormalised
    assert np.all(sums <= 1 + 1e-6) and np.all(sums > 0.1) and np.any(sums < 0.99)
  else:
    np.testing.assert_allclose(sums, 1.0, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_step_by_step_equals_teacher_forcing(name):
  """The cached / carried single steps reproduce the full teacher-forced pass."""
  model, variables = built(name)
  logits, weights = model.apply(variables, jnp.asarray(SOURCE), jnp.asarray(TARGET_IN))
  memory = model.apply(variables, jnp.asarray(SOURCE), method="encode")
  state = model.apply(variables, memory, TARGET_IN.shape[1], method="initial_state")
  for t in range(TARGET_IN.shape[1]):
    state, step_logits, step_weights = model.apply(variables, state, jnp.asarray(TARGET_IN[:, t]), memory,
                                                   method="step")
    np.testing.assert_allclose(step_logits, logits[:, t], atol=2e-5)
    np.testing.assert_allclose(step_weights, weights[:, t], atol=2e-6)


def test_no_attention_decoder_ignores_encoder_outputs_but_uses_final_state():
  plain = Seq2Seq(13, 11, attention="none", hidden=16)
  v = plain.init(jax.random.key(0), jnp.asarray(SOURCE), jnp.asarray(TARGET_IN))
  memory = plain.apply(v, jnp.asarray(SOURCE), method="encode")
  state = plain.apply(v, memory, method="initial_state")
  _, a, w = plain.apply(v, state, jnp.asarray(TARGET_IN[:, 0]), memory, method="step")
  _, b, _ = plain.apply(v, state, jnp.asarray(TARGET_IN[:, 0]), dict(memory, outputs=memory["outputs"] * 0),
                        method="step")
  np.testing.assert_array_equal(a, b)
  assert not np.any(w)
  state2 = dict(state, rnn=jax.tree_util.tree_map(jnp.zeros_like, state["rnn"]))
  _, c, _ = plain.apply(v, state2, jnp.asarray(TARGET_IN[:, 0]), memory, method="step")
  assert np.abs(a - c).max() > 1e-3


def test_scheduled_sampling_feeds_own_predictions():
  """RNN, use_truth=False everywhere: the decoder reads its previous argmax, i.e. greedy decoding."""
  model, variables = built("luong_general_gru_2layers")
  steps = 5
  target_in = jnp.asarray(TARGET_IN[:, :steps])
  logits, _ = model.apply(variables, jnp.asarray(SOURCE), target_in, use_truth=jnp.zeros(target_in.shape, bool))
  tokens, _ = decode.greedy(model, variables, jnp.asarray(SOURCE), max_len=steps)
  predicted = np.asarray(jnp.argmax(logits, -1))
  for row in range(len(SOURCE)):  # equal up to and including the end token
    n = next((i + 1 for i, t in enumerate(tokens[row]) if t == END_ID), steps)
    np.testing.assert_array_equal(predicted[row, :n], np.asarray(tokens[row, :n]))
  same, _ = model.apply(variables, jnp.asarray(SOURCE), target_in, use_truth=jnp.ones(target_in.shape, bool))
  forced, _ = model.apply(variables, jnp.asarray(SOURCE), target_in)
  np.testing.assert_allclose(same, forced, atol=1e-6)


def test_transformer_scheduled_sampling_is_two_pass():
  """Transformer: a teacher-forced pass predicts, and the mix of truth and those predictions is re-read."""
  model, variables = built("transformer")
  source, target_in = jnp.asarray(SOURCE), jnp.asarray(TARGET_IN)
  use_truth = jnp.asarray(np.random.default_rng(0).random(TARGET_IN.shape) < 0.5)
  logits, _ = model.apply(variables, source, target_in, use_truth=use_truth)
  first, _ = model.apply(variables, source, target_in)
  shifted = np.concatenate([TARGET_IN[:, :1], np.asarray(jnp.argmax(first, -1))[:, :-1]], 1)
  mixed = np.where(np.asarray(use_truth), TARGET_IN, shifted)
  mixed[:, 0] = TARGET_IN[:, 0]
  expected, _ = model.apply(variables, source, jnp.asarray(mixed))
  np.testing.assert_allclose(logits, expected, atol=1e-5)
  assert np.abs(np.asarray(logits) - np.asarray(first)).max() > 1e-3


@pytest.mark.slow  # the un-jitted while_loops run op by op
@pytest.mark.parametrize("name", ["bahdanau", "local_p", "transformer"])
def test_greedy_is_identical_with_and_without_jit(name):
  model, variables = built(name)
  source = jnp.asarray(SOURCE)
  jitted = jax.jit(functools.partial(decode.greedy, model, max_len=8))(variables, source)
  with jax.disable_jit():  # the while_loop runs as a Python loop, step by step
    eager = decode.greedy(model, variables, source, max_len=8)
  python_loop = decode.greedy_python(model, variables, source, max_len=8)
  np.testing.assert_array_equal(jitted[0], eager[0])
  np.testing.assert_array_equal(jitted[0], python_loop)
  np.testing.assert_allclose(jitted[1], eager[1], atol=1e-6)
  beam = jax.jit(functools.partial(decode.beam_search, model, max_len=8, beam_size=3))(variables, source)
  with jax.disable_jit():
    beam_eager = decode.beam_search(model, variables, source, max_len=8, beam_size=3)
  np.testing.assert_array_equal(beam["beams"], beam_eager["beams"])


@pytest.mark.parametrize("name", ["luong_concat", "transformer"])
def test_beam_one_equals_greedy(name):
  model, variables = built(name)
  tokens, weights = decode.greedy(model, variables, jnp.asarray(SOURCE), max_len=8)
  out = decode.beam_search(model, variables, jnp.asarray(SOURCE), max_len=8, beam_size=1, alpha=0.0)
  np.testing.assert_array_equal(out["tokens"], tokens)
  np.testing.assert_allclose(out["weights"], weights, atol=1e-6)


def sequence_logprob(model, variables, tokens):
  """log p(tokens) by one teacher-forced pass (an independent rescoring)."""
  start = np.ones((tokens.shape[0], 1), np.int32)
  target_in = jnp.asarray(np.concatenate([start, tokens[:, :-1]], 1))
  logits, _ = model.apply(variables, jnp.asarray(SOURCE), target_in)
  logp = np.asarray(jax.nn.log_softmax(logits))
  picked = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  return (picked * (tokens != 0)).sum(-1)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_scores_rescore_and_beat_greedy(alpha):
  model, variables = built("luong_dot")
  # Sharper output distributions so that sequences end within max_len.
  variables = jax.tree_util.tree_map(lambda a: a, variables)
  variables["params"]["decoder"]["output"]["bias"] = variables["params"]["decoder"]["output"]["bias"].at[END_ID].add(2.0)
  max_len = 10
  out = decode.beam_search(model, variables, jnp.asarray(SOURCE), max_len=max_len, beam_size=4, alpha=alpha)
  beams, scores = np.asarray(out["beams"]), np.asarray(out["beam_scores"])
  assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
  for b in range(beams.shape[1]):
    lengths = (beams[:, b] != 0).sum(-1)
    assert np.all(beams[np.arange(len(SOURCE)), b, lengths - 1] == END_ID)
    penalty = ((5.0 + lengths) / 6.0) ** alpha
    np.testing.assert_allclose(sequence_logprob(model, variables, beams[:, b]) / penalty, scores[:, b], atol=2e-4)
  greedy, _ = decode.greedy(model, variables, jnp.asarray(SOURCE), max_len=max_len)
  greedy = np.asarray(greedy)
  g_len = (greedy != 0).sum(-1)
  g_score = sequence_logprob(model, variables, greedy) / ((5.0 + g_len) / 6.0) ** alpha
  assert np.all(scores[:, 0] >= g_score - 1e-4)


def test_truth_probability_schedules():
  steps = np.array([0, 10, 100, 1000])
  np.testing.assert_allclose(truth_probability(steps, "linear", decay_steps=100, min_prob=0.2),
                             [1.0, 0.92, 0.2, 0.2], atol=1e-6)
  np.testing.assert_allclose(truth_probability(steps, "exponential", k=0.99), 0.99 ** steps, rtol=1e-5)
  np.testing.assert_allclose(truth_probability(steps, "inverse_sigmoid", k=50.0),
                             50.0 / (50.0 + np.exp(steps / 50.0)), rtol=1e-5)
  assert float(truth_probability(5, "none")) == 1.0
  with pytest.raises(ValueError, match="Unknown scheduled_sampling.schedule"):
    truth_probability(0, "cosine")


def test_bad_settings_fail_clearly():
  with pytest.raises(ValueError, match="Unknown attention 'luong_dot'"):
    Seq2Seq(5, 5, attention="luong_dot").init(jax.random.key(0), jnp.asarray(SOURCE), jnp.asarray(TARGET_IN))
  with pytest.raises(ValueError, match="Unknown merge mode"):
    RNNEncoder(13, bidirectional=True, merge="max").init(jax.random.key(0), jnp.asarray(SOURCE))


def test_decoder_block_drops_each_branch_once():
  """Self-attention, cross-attention and MLP outputs one dropout each; the MLP's hidden features at
  hidden_dropout_rate (0: the original Transformer's placement)."""
  from tests.test_encoder import _dropout_sites
  from vit_jax.models.seq2seq import DecoderBlock

  block = DecoderBlock(num_heads=2, width=8, mlp_dim=16, dropout_rate=0.1, hidden_dropout_rate=0.0)
  x, memory = jnp.ones((2, 3, 8)), jnp.ones((2, 5, 8))
  mask = jnp.ones((2, 1, 1, 5), bool)

  def run(m, x, memory, mask, deterministic=True):
    return m(x, m.memory_key_value(memory), mask, deterministic=deterministic)
  v = block.init(jax.random.key(0), x, memory, mask, method=run)
  assert _dropout_sites(block, v, x, memory, mask, method=run, deterministic=False) == [
      (0.0, (2, 3, 16)), (0.1, (2, 3, 8)), (0.1, (2, 3, 8)), (0.1, (2, 3, 8))]
