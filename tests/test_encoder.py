"""Encoder blocks: norm placement, drop path, LayerScale, gated MLPs, scan/remat equivalence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import perturb
from vit_jax.models import encoder as E
from vit_jax.models.dropout import Dropout
from vit_jax.models.attention import MultiHeadAttention

RTOL, ATOL = 1e-5, 1e-5


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_block_norm_placement(norm):
  x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
  block = E.Encoder1DBlock(num_heads=4, mlp_dim=32, norm=norm)
  P = perturb(block.init(jax.random.key(0), x)["params"])
  got, _ = block.apply({"params": P}, x)
  ln = lambda name, y: nn.LayerNorm(epsilon=1e-6).apply({"params": P[name]}, y)
  attn = lambda y: MultiHeadAttention(num_heads=4).apply({"params": P["MultiHeadDotProductAttention_0"]}, y)
  mlp = lambda y: E.MlpBlock(32).apply({"params": P["MlpBlock_0"]}, y)
  if norm == "pre":  # x + F(LN(x))
    y = x + attn(ln("LayerNorm_0", x))
    want = y + mlp(ln("LayerNorm_1", y))
  else:  # LN(x + F(x))
    y = ln("LayerNorm_0", x + attn(x))
    want = ln("LayerNorm_1", y + mlp(y))
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_layer_scale_and_residual_scale():
  x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
  plain = E.Encoder1DBlock(num_heads=4, mlp_dim=32)
  scaled = E.Encoder1DBlock(num_heads=4, mlp_dim=32, layer_scale_init=0.1, residual_scale=2.0)
  Ps = perturb(scaled.init(jax.random.key(0), x)["params"])
  assert Ps["LayerScale_0"]["gamma"].shape == (16,)
  P = {k: v for k, v in Ps.items() if not k.startswith("LayerScale")}
  ln = lambda name, y: nn.LayerNorm(epsilon=1e-6).apply({"params": P[name]}, y)
  attn = lambda y: MultiHeadAttention(num_heads=4).apply({"params": P["MultiHeadDotProductAttention_0"]}, y)
  mlp = lambda y: E.MlpBlock(32).apply({"params": P["MlpBlock_0"]}, y)
  y = x + attn(ln("LayerNorm_0", x)) * Ps["LayerScale_0"]["gamma"] / 2.0
  want = y + mlp(ln("LayerNorm_1", y)) * Ps["LayerScale_1"]["gamma"] / 2.0
  np.testing.assert_allclose(scaled.apply({"params": Ps}, x)[0], want, rtol=RTOL, atol=ATOL)
  assert not np.allclose(plain.apply({"params": P}, x)[0], want)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "swiglu", "geglu"])
def test_mlp_block_activations(activation):
  from scipy.special import erf
  x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
  m = E.MlpBlock(16, activation=activation)
  P = perturb(m.init(jax.random.key(0), x)["params"])
  d = lambda n, y: y @ P[n]["kernel"] + P[n]["bias"]
  gelu = lambda y: 0.5 * y * (1 + erf(y / np.sqrt(2)))
  gelu_tanh = lambda y: 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
  silu = lambda y: y / (1 + np.exp(-y))
  h = d("Dense_0", x)
  h = {"gelu": lambda: gelu(h), "gelu_tanh": lambda: gelu_tanh(h), "relu": lambda: np.maximum(h, 0),
       "swiglu": lambda: silu(d("Dense_gate", x)) * h, "geglu": lambda: gelu(d("Dense_gate", x)) * h}[activation]()
  np.testing.assert_allclose(m.apply({"params": P}, x), d("Dense_1", h), rtol=RTOL, atol=ATOL)


def test_unknown_activation_and_remat_policy_are_rejected():
  with pytest.raises(ValueError, match="Unknown activation 'gleu'"):
    E.MlpBlock(4, activation="gleu").init(jax.random.key(0), np.zeros((1, 4)))
  with pytest.raises(ValueError, match="Unknown remat policy"):
    E.Encoder(2, 8, 2, remat_policy="everything").init(jax.random.key(0), np.zeros((1, 3, 4)))


def test_drop_path_keeps_expectation():
  # 20000 samples, rate 0.25: the kept fraction has standard error ~0.003.
  x = jnp.ones((20000, 3, 2))
  y = np.asarray(E.drop_path(x, 0.25, jax.random.key(0)))
  per_sample = y[:, 0, 0]
  assert np.all((y == 0) | np.isclose(y, 1 / 0.75)), "samples are dropped or rescaled whole"
  assert np.all(y == y[:, :1, :1]), "one decision per sample"
  assert abs((per_sample == 0).mean() - 0.25) < 0.015
  assert abs(per_sample.mean() - 1.0) < 0.02


def test_stochastic_depth_is_identity_at_eval_and_ramps_linearly():
  x = np.random.default_rng(3).standard_normal((64, 5, 16)).astype(np.float32)
  kw = dict(mlp_dim=32, num_heads=4)
  # Two layers with drop_path_rate 0.5: rates ramp 0.0 (first block) -> 0.5 (last block).
  with_dp, without = E.Encoder(2, drop_path_rate=0.5, **kw), E.Encoder(2, **kw)
  P = perturb(without.init(jax.random.key(0), x)["params"])
  eval_out = with_dp.apply({"params": P}, x)[0]
  np.testing.assert_array_equal(eval_out, without.apply({"params": P}, x)[0])
  train = lambda r: np.asarray(with_dp.apply({"params": P}, x, deterministic=False,
                                              rngs={"dropout": jax.random.key(r)})[0])
  a = train(1)
  assert not np.allclose(a, train(2))
  # A sample whose last block dropped both branches equals block 0 + final norm alone
  # (block 0 has rate 0, so it is never dropped); expected for 1/4 of the samples.
  first_only = E.Encoder(1, **kw).apply(
      {"params": {"encoderblock_0": P["encoderblock_0"], "encoder_norm": P["encoder_norm"]}}, x)[0]
  hit = np.all(np.isclose(a, first_only, atol=1e-5), axis=(1, 2))
  assert 4 <= hit.sum() <= 30, hit.sum()


@pytest.mark.parametrize("remat_policy", [None, "nothing_saveable"])
def test_scan_matches_unrolled_with_converted_params(remat_policy):
  x = np.random.default_rng(4).standard_normal((2, 6, 16)).astype(np.float32)
  kw = dict(num_layers=3, mlp_dim=32, num_heads=4, learned_posemb=True)
  unrolled = E.Encoder(**kw)
  scanned = E.Encoder(scan=True, remat_policy=remat_policy, **kw)
  P = perturb(unrolled.init(jax.random.key(0), x)["params"])
  Ps = E.unrolled_to_scan(P)
  assert Ps["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"].shape == (3, 16, 32)
  shapes = lambda t: jax.tree_util.tree_map(np.shape, t)
  assert shapes(Ps) == shapes(scanned.init(jax.random.key(0), x)["params"])
  np.testing.assert_allclose(scanned.apply({"params": Ps}, x)[0], unrolled.apply({"params": P}, x)[0],
                             rtol=RTOL, atol=ATOL)
  back = E.scan_to_unrolled(Ps)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, P)
  # Gradients agree too (remat must not change them).
  loss = lambda m, p: jnp.sum(m.apply({"params": p}, x)[0] ** 2)
  g_scan = E.scan_to_unrolled(jax.grad(lambda p: loss(scanned, p))(Ps))
  g_unrolled = jax.grad(lambda p: loss(unrolled, p))(P)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_scan, g_unrolled)


def test_scan_returns_attention_weights_like_unrolled():
  x = np.random.default_rng(5).standard_normal((2, 6, 16)).astype(np.float32)
  kw = dict(num_layers=2, mlp_dim=32, num_heads=4, return_weights=True)
  P = E.Encoder(**kw).init(jax.random.key(0), x)["params"]
  _, out = E.Encoder(**kw).apply({"params": P}, x)
  _, out_s = E.Encoder(scan=True, **kw).apply({"params": E.unrolled_to_scan(P)}, x)
  assert out["attention_weights"].shape == (2, 2, 4, 6, 6)
  np.testing.assert_allclose(out_s["attention_weights"], out["attention_weights"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(out["attention_weights"]).sum(-1), 1.0, rtol=1e-5)


def test_unrolled_to_scan_rejects_gaps():
  with pytest.raises(ValueError, match="not numbered"):
    E.unrolled_to_scan({"encoderblock_0": {"a": np.zeros(1)}, "encoderblock_2": {"a": np.zeros(1)}})


def _dropout_sites(module, variables, *args, **kwargs):
  """(rate, input shape) of every Dropout a train-mode call runs."""
  sites = []

  def record(next_fun, call_args, call_kwargs, context):
    if isinstance(context.module, (nn.Dropout, Dropout)) and context.method_name == "__call__":
      sites.append((context.module.rate, tuple(call_args[0].shape)))
    return next_fun(*call_args, **call_kwargs)
  with nn.intercept_methods(record):
    module.apply(variables, *args, rngs={"dropout": jax.random.key(1)}, **kwargs)
  return sorted(sites)


@pytest.mark.parametrize("parallel", [False, True])
def test_each_branch_output_is_dropped_once(parallel):
  """As the reference ViT and timm: the attention output, the MLP's hidden features and the MLP output,
  one dropout each (the MLP output is not dropped a second time by the residual)."""
  x = jnp.ones((2, 3, 8))
  block = E.Encoder1DBlock(num_heads=2, mlp_dim=16, dropout_rate=0.1, parallel=parallel)
  v = block.init(jax.random.key(0), x)
  assert _dropout_sites(block, v, x, deterministic=False) == [(0.1, (2, 3, 8)), (0.1, (2, 3, 8)),
                                                              (0.1, (2, 3, 16))]
  plain = E.Encoder1DBlock(num_heads=2, mlp_dim=16, dropout_rate=0.1, parallel=parallel, hidden_dropout_rate=0.0)
  assert _dropout_sites(plain, v, x, deterministic=False) == [(0.0, (2, 3, 16)), (0.1, (2, 3, 8)),
                                                              (0.1, (2, 3, 8))]
