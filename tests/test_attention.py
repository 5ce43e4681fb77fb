"""Attention against the written formulas and against torch.nn.MultiheadAttention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import perturb
from vit_jax.models import attention as A

RTOL, ATOL = 1e-5, 1e-5  # float32 with different summation orders


def np_softmax(x, mask=None):
  x = np.where(mask, x, -np.inf) if mask is not None else x
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(x - m)
  s = e.sum(-1, keepdims=True)
  return np.where(s > 0, e / np.where(s > 0, s, 1.0), 0.0)


def np_mha_core(q, k, v, mask=None, bias=None):
  """q: [b, t, h, d], k: [b, s, h, d], v: [b, s, h, dv] -> ([b, t, h, dv], [b, h, t, s])."""
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  w = np_softmax(logits, None if mask is None else np.broadcast_to(mask, logits.shape))
  return np.einsum("bhts,bshd->bthd", w, v), w


def rand(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("return_weights", [False, True])  # fused jax path / explicit einsum path
def test_dot_product_attention_matches_formula(return_weights):
  rng = np.random.default_rng(0)
  q, k, v = rand(rng, 2, 5, 3, 8), rand(rng, 2, 7, 3, 8), rand(rng, 2, 7, 3, 8)
  bias = rand(rng, 1, 3, 5, 7)
  mask = rng.random((2, 1, 5, 7)) > 0.3
  mask[..., 0] = True
  want, want_w = np_mha_core(q, k, v, mask, bias)
  got = A.dot_product_attention(q, k, v, mask=mask, bias=bias, return_weights=return_weights)
  if return_weights:
    got, w = got
    np.testing.assert_allclose(w, want_w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_value_width_may_differ_from_key_width():
  rng = np.random.default_rng(1)
  q, k, v = rand(rng, 2, 4, 2, 6), rand(rng, 2, 5, 2, 6), rand(rng, 2, 5, 2, 3)
  want, _ = np_mha_core(q, k, v)
  np.testing.assert_allclose(A.dot_product_attention(q, k, v), want, rtol=RTOL, atol=ATOL)


def test_causal_mask_matches_tril():
  rng = np.random.default_rng(2)
  q = rand(rng, 1, 6, 2, 4)
  want, _ = np_mha_core(q, q, q, np.tril(np.ones((6, 6), bool)))
  for rw in (False, True):
    got = A.dot_product_attention(q, q, q, is_causal=True, return_weights=rw)
    np.testing.assert_allclose(got[0] if rw else got, want, rtol=RTOL, atol=ATOL)


def test_masked_keys_get_exactly_zero_weight_and_full_mask_gives_zeros_not_nan():
  rng = np.random.default_rng(3)
  q, k, v = rand(rng, 2, 4, 2, 8), rand(rng, 2, 6, 2, 8), rand(rng, 2, 6, 2, 8)
  mask = np.ones((2, 1, 4, 6), bool)
  mask[0, :, :, 3:] = False  # padding in example 0
  mask[1, :, 2, :] = False  # query row 2 of example 1 sees nothing
  out, w = A.dot_product_attention(q, k, v, mask=mask, return_weights=True)
  assert np.all(np.asarray(w)[0, :, :, 3:] == 0.0)
  np.testing.assert_array_equal(np.asarray(w)[1, :, 2], 0.0)
  np.testing.assert_array_equal(np.asarray(out)[1, 2], 0.0)
  fused = A.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(fused, out, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(fused)[1, 2], 0.0)
  for rw in (False, True):
    g = jax.grad(lambda q: jnp.sum(A.dot_product_attention(q, k, v, mask=mask, return_weights=rw)[0]
                                    if rw else A.dot_product_attention(q, k, v, mask=mask)))(q)
    assert np.all(np.isfinite(g))


def test_attention_dropout_is_unbiased_and_off_at_eval():
  rng = np.random.default_rng(4)
  q, k, v = rand(rng, 1, 3, 1, 4), rand(rng, 1, 5, 1, 4), rand(rng, 1, 5, 1, 4)
  base = A.dot_product_attention(q, k, v)
  assert np.allclose(A.dot_product_attention(q, k, v, dropout_rate=0.5, deterministic=True), base)
  f = jax.vmap(lambda r: A.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=r,
                                                 deterministic=False))
  outs = np.asarray(f(jax.random.split(jax.random.key(0), 4000)))
  assert not np.allclose(outs[0], base)
  # Mean over 4000 draws: standard error ~ |v| * sqrt(1/4000) < 0.05.
  np.testing.assert_allclose(outs.mean(0), base, atol=0.08)


def test_unknown_implementation_is_rejected():
  x = np.zeros((1, 2, 1, 4), np.float32)
  with pytest.raises(ValueError, match="Unknown attention implementation"):
    A.dot_product_attention(x, x, x, implementation="flash")


def test_multihead_param_layout_matches_flax():
  import flax.linen as nn
  x = np.zeros((2, 5, 16), np.float32)
  ours = A.MultiHeadAttention(num_heads=4).init(jax.random.key(0), x)["params"]
  ref = nn.MultiHeadDotProductAttention(num_heads=4).init(jax.random.key(0), x)["params"]
  shape = lambda t: jax.tree_util.tree_map(lambda a: a.shape, t)
  assert shape(ours) == shape(ref)


def test_multihead_matches_flax_module_with_same_params():
  import flax.linen as nn
  rng = np.random.default_rng(5)
  x, kv = rand(rng, 2, 5, 16), rand(rng, 2, 7, 16)
  mask = rng.random((2, 1, 5, 7)) > 0.2
  mask[..., 0] = True
  ref = nn.MultiHeadDotProductAttention(num_heads=4)
  params = ref.init(jax.random.key(1), x, kv)
  params = perturb(params, rng, scale=0.1)
  ours = A.MultiHeadAttention(num_heads=4)
  np.testing.assert_allclose(ours.apply(params, x, kv, mask=mask), ref.apply(params, x, kv, mask=mask),
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("kdim,vdim", [(16, 16), (12, 20)])
def test_multihead_matches_torch(kdim, vdim):
  torch = pytest.importorskip("torch")
  e, h, b, t, s = 16, 4, 2, 5, 7
  torch.manual_seed(0)
  ref = torch.nn.MultiheadAttention(e, h, kdim=kdim, vdim=vdim, batch_first=True).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  rng = np.random.default_rng(6)
  q, k, v = rand(rng, b, t, e), rand(rng, b, s, kdim), rand(rng, b, s, vdim)
  valid = np.ones((b, s), bool)
  valid[1, 4:] = False
  with torch.no_grad():
    want, want_w = ref(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                       key_padding_mask=torch.from_numpy(~valid), need_weights=True,
                       average_attn_weights=False)
  sd = {n: p.detach().numpy() for n, p in ref.named_parameters()}
  if kdim == vdim == e:
    wq, wk, wv = np.split(sd["in_proj_weight"], 3)
  else:
    wq, wk, wv = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
  bq, bk, bv = np.split(sd["in_proj_bias"], 3)
  d = e // h
  params = {
      "query": {"kernel": wq.T.reshape(e, h, d), "bias": bq.reshape(h, d)},
      "key": {"kernel": wk.T.reshape(kdim, h, d), "bias": bk.reshape(h, d)},
      "value": {"kernel": wv.T.reshape(vdim, h, d), "bias": bv.reshape(h, d)},
      "out": {"kernel": sd["out_proj.weight"].T.reshape(h, d, e), "bias": sd["out_proj.bias"]},
  }
  mask = valid[:, None, None, :]
  ours = A.MultiHeadAttention(num_heads=h)
  got, got_w = ours.apply({"params": params}, q, k, v, mask=mask, return_weights=True)
  np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got_w, want_w.numpy(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(ours.apply({"params": params}, q, k, v, mask=mask), want.numpy(),
                             rtol=RTOL, atol=ATOL)


def test_multihead_separate_widths_match_formula():
  rng = np.random.default_rng(7)
  m = A.MultiHeadAttention(num_heads=2, qk_features=6, v_features=10, out_features=5)
  q, k, v = rand(rng, 2, 3, 7), rand(rng, 2, 4, 9), rand(rng, 2, 4, 11)
  params = m.init(jax.random.key(0), q, k, v)["params"]
  params = perturb(params, rng, scale=0.1)
  got = m.apply({"params": params}, q, k, v)
  assert got.shape == (2, 3, 5)
  P = jax.tree_util.tree_map(np.asarray, params)
  proj = lambda x, n: np.einsum("bte,ehd->bthd", x, P[n]["kernel"]) + P[n]["bias"]
  heads, _ = np_mha_core(proj(q, "query"), proj(k, "key"), proj(v, "value"))
  want = np.einsum("bthd,hdo->bto", heads, P["out"]["kernel"]) + P["out"]["bias"]
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    A.MultiHeadAttention(num_heads=4, qk_features=6).init(jax.random.key(0), q)


# --- Classic attention -------------------------------------------------------


def _perturbed(module, rng, *args, **kw):
  return perturb(module.init(jax.random.key(0), *args, **kw)["params"], rng, scale=0.3)


def _key_mask(b, q_len, s, lengths):
  return (np.arange(s)[None, None, :] < np.asarray(lengths)[:, None, None]).repeat(q_len, 1)


def test_additive_attention_matches_formula():
  rng = np.random.default_rng(8)
  q, k, v = rand(rng, 2, 3, 5), rand(rng, 2, 6, 4), rand(rng, 2, 6, 7)
  mask = _key_mask(2, 3, 6, [6, 4])
  m = A.AdditiveAttention(features=8)
  P = _perturbed(m, rng, q, k, v, mask=mask)
  ctx, w = m.apply({"params": P}, q, k, v, mask=mask)
  e = np.tanh((q @ P["query"]["kernel"])[:, :, None] + (k @ P["key"]["kernel"])[:, None]) @ P["energy"]["kernel"]
  want_w = np_softmax(e[..., 0], mask)
  np.testing.assert_allclose(w, want_w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(ctx, want_w @ v, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(w)[1, :, 4:] == 0.0)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_scores_match_formula(score):
  rng = np.random.default_rng(9)
  dk = 5 if score == "dot" else 4
  q, k = rand(rng, 2, 3, 5), rand(rng, 2, 6, dk)
  mask = _key_mask(2, 3, 6, [6, 2])
  m = A.LuongAttention(score=score)
  P = _perturbed(m, rng, q, k, mask=mask) if score != "dot" else {}
  ctx, w = m.apply({"params": P}, q, k, mask=mask)
  if score == "dot":
    s = np.einsum("bqd,bkd->bqk", q, k)
  elif score == "general":
    s = np.einsum("bqd,de,bke->bqk", q, P["score"]["W_a"]["kernel"], k)
  else:
    W, vv = P["score"]["W_a"], P["score"]["v_a"]
    cat = np.concatenate([np.broadcast_to(q[:, :, None], (2, 3, 6, 5)),
                          np.broadcast_to(k[:, None], (2, 3, 6, dk))], -1)
    s = (np.tanh(cat @ W) @ vv)[..., 0]
  want_w = np_softmax(s, mask)
  np.testing.assert_allclose(w, want_w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(ctx, want_w @ k, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(w)[1, :, 2:] == 0.0)


def test_luong_dot_needs_equal_widths():
  x = np.zeros((1, 2, 4), np.float32)
  with pytest.raises(ValueError, match="score='general'"):
    A.LuongAttention(score="dot").init(jax.random.key(0), x, np.zeros((1, 3, 5), np.float32))


def test_local_m_equals_hard_window():
  rng = np.random.default_rng(10)
  D = 2
  q, k, v = rand(rng, 2, 7, 4), rand(rng, 2, 9, 4), rand(rng, 2, 9, 3)
  ctx, w, p = A.LocalAttention(window=D, mode="m", score="dot").apply({}, q, k, v)
  np.testing.assert_array_equal(p[0], np.arange(7))
  # Independent reference: jax's banded attention |s - t| <= D (single head, no scaling).
  ref = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], np.pad(v, ((0, 0), (0, 0), (0, 1)))[:, :, None],
                                     scale=1.0, local_window_size=(D, D))[:, :, 0, :3]
  np.testing.assert_allclose(ctx, ref, rtol=RTOL, atol=ATOL)
  t, s = np.arange(7)[:, None], np.arange(9)[None]
  assert np.all(np.asarray(w)[:, np.abs(s - t) > D] == 0.0)


def test_local_p_matches_formula_and_respects_padding():
  rng = np.random.default_rng(11)
  D, lengths = 2, [9, 5]
  q, k = rand(rng, 2, 4, 6), rand(rng, 2, 9, 6)
  mask = _key_mask(2, 4, 9, lengths)
  m = A.LocalAttention(window=D, mode="p", score="general")
  P = _perturbed(m, rng, q, k, mask=mask)
  ctx, w, p = m.apply({"params": P}, q, k, mask=mask)
  gate = (np.tanh(q @ P["W_p"]["kernel"]) @ P["v_p"]["kernel"])[..., 0]
  want_p = (np.asarray(lengths, np.float32)[:, None] - 1) / (1 + np.exp(-gate))
  np.testing.assert_allclose(p, want_p, rtol=RTOL, atol=ATOL)
  s = np.einsum("bqd,de,bke->bqk", q, P["score"]["W_a"]["kernel"], k)
  dist = np.arange(9)[None, None] - want_p[..., None]
  align = np_softmax(s, mask & (np.abs(dist) <= D))
  want_w = align * np.exp(-dist**2 / (2 * (D / 2) ** 2))
  np.testing.assert_allclose(w, want_w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(ctx, want_w @ k, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(w)[1, :, 5:] == 0.0)
  assert np.all(np.asarray(p)[1] <= 4.0)


@pytest.mark.parametrize("platform,dtype,head_dim,want", [
    ("gpu", jnp.bfloat16, 64, "cudnn"), ("gpu", jnp.float16, 128, "cudnn"),
    ("gpu", jnp.float32, 64, "xla"), ("gpu", jnp.bfloat16, 144, "xla"), ("gpu", jnp.bfloat16, 60, "xla"),
    ("tpu", jnp.bfloat16, 64, "xla"), ("cpu", jnp.bfloat16, 64, "xla")])
def test_the_default_fused_kernel_is_cudnn_for_half_precision_on_gpu(platform, dtype, head_dim, want):
  q = jnp.zeros((2, 16, 4, head_dim), dtype)
  chosen, why_not = A.fused_implementation(q, q, platform)
  assert chosen == want
  assert (why_not is not None) == (platform == "gpu" and want == "xla")  # a reason wherever GPU falls back


def test_a_refused_cudnn_call_falls_back_to_xla_with_a_log_line(monkeypatch, caplog):
  """Where cuDNN refuses a call (here: a CPU without it), the default gives XLA's result and says why."""
  monkeypatch.setattr(A, "fused_implementation", lambda q, k, platform=None: ("cudnn", None))
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 4, 32), jnp.bfloat16) for i in range(3))
  got = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v))(q, k, v)
  want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  assert "XLA's fused attention, cuDNN's refused it" in caplog.text
  with pytest.raises(Exception):  # asked for by name, cuDNN is not replaced
    jax.jit(lambda q: A.dot_product_attention(q, q, q, implementation="cudnn"))(q)
