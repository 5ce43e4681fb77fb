"""Mixed precision: `config.dtype="bfloat16"` computes the matmuls in bfloat16 while the parameters, the
optimizer state, the loss, every softmax and every norm's statistics stay float32; `optim.mu_dtype`
stores Adam's first moment in bfloat16."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from configs.vit import get_config
from vit_jax.train import optim, tasks

UPCAST = ("exp", "log", "rsqrt", "reduce_sum", "reduce_max")  # softmax, log-softmax, norm statistics


def config(dtype, **model):
  c = get_config()
  c.dtype = dtype
  c.model.update(dict(depth=2, **model))
  return c


def equations(jaxpr):
  yield from jaxpr.eqns
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from equations(sub)


@pytest.mark.parametrize("model", [{}, {"pool_type": "map", "stem": "patch"}])
def test_bfloat16_matmuls_with_float32_statistics_and_parameters(model):
  task = tasks.get_task(config("bfloat16", **model), 10)
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1)
  batch = {"image": images, "label": jnp.arange(4)}
  variables = task.init(jax.random.key(1), images)
  params = variables.pop("params")
  assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  closed = jax.make_jaxpr(lambda p: jax.value_and_grad(task.loss, has_aux=True)(p, variables, batch,
                                                                                  jax.random.key(2)))(params)
  eqns = list(equations(closed.jaxpr))
  dots = {str(e.invars[0].aval.dtype) for e in eqns if e.primitive.name == "dot_general"}
  assert "bfloat16" in dots  # the compute is bfloat16 ...
  # ... its statistics are not: the forward pass's softmaxes, norms and loss (the MLP's activation and
  # the gradients' sums over the batch stay in the compute dtype, as in every mixed-precision recipe).
  forward = [e for e in eqns if e.primitive.name in UPCAST and not str(e.source_info.name_stack).startswith(
      "transpose(") and "MlpBlock" not in str(e.source_info.name_stack)]
  for op, place in (("reduce_sum", "LayerNorm_0"), ("exp", "MultiHeadDotProductAttention_0")):
    assert any(e.primitive.name == op and place in str(e.source_info.name_stack) for e in forward), (op, place)
  assert all(str(e.invars[0].aval.dtype) == "float32" for e in forward), sorted(
      (e.primitive.name, str(e.source_info.name_stack)) for e in forward if e.invars[0].aval.dtype != jnp.float32)
  (loss, _), grads = jax.jit(jax.value_and_grad(task.loss, has_aux=True))(params, variables, batch,
                                                                          jax.random.key(2))
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  assert {a.dtype for a in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}
  # Within bfloat16's precision of the same model computing in float32.
  f32 = tasks.get_task(config("float32", **model), 10)
  want, _ = jax.jit(f32.loss)(params, variables, batch, jax.random.key(2))
  np.testing.assert_allclose(loss, want, rtol=2e-2)


def test_first_moment_in_bfloat16():
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
  c = get_config().optim
  c.mu_dtype = "bfloat16"
  tx, _ = optim.build(c, params, total_steps=10, steps_per_epoch=5, batch_size=8)
  state = tx.init(params)
  adam = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
  assert len(adam) == 1
  assert {a.dtype for a in jax.tree_util.tree_leaves(adam[0].mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {a.dtype for a in jax.tree_util.tree_leaves(adam[0].nu)} == {jnp.dtype(jnp.float32)}
  c.mu_dtype = "bf16"
  with pytest.raises(ValueError, match=r"config.optim.mu_dtype='bf16': choose one of"):
    optim.build(c, params, total_steps=10, steps_per_epoch=5, batch_size=8)


def test_models_without_a_compute_dtype_and_unknown_dtypes_are_refused():
  with pytest.raises(ValueError, match=r"config.dtype='int8': choose 'float32' or 'bfloat16'"):
    tasks.get_task(config("int8"), 10)
  from configs.seq2seq import get_config as seq2seq_config
  from vit_jax.data import text
  c = seq2seq_config()
  c.dtype = "bfloat16"
  data = text.load_text_data(text.GENERATED, numbers=30, dates=30, sentences=30)
  with pytest.raises(ValueError, match=r"the Seq2Seq model computes in float32 only; set config.dtype='float32'"):
    tasks.get_task(c, len(data.target_vocab), {"text": data})
