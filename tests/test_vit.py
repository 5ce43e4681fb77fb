"""ViT: published parameter counts, the variant table, sin-cos tables, pooling, dtypes, errors."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as model_configs
from tests.helpers import perturb
from vit_jax.models import vit as V
from vit_jax.models.encoder import unrolled_to_scan

RTOL, ATOL = 1e-5, 1e-5


def expected_count(width, depth, mlp, patch, classes=1000, res=224, channels=3):
  """Counted by hand from the architecture (token pooling, learned posemb, no pre_logits)."""
  tokens = (res // patch) ** 2 + 1
  embedding = patch * patch * channels * width + width
  block = (2 * 2 * width  # two LayerNorms
           + 4 * (width * width + width)  # q, k, v, out
           + width * mlp + mlp + mlp * width + width)  # MLP
  return embedding + width + tokens * width + depth * block + 2 * width + width * classes + classes


def test_published_parameter_counts():
  assert model_configs.count_params("B/16", num_classes=1000) == 86_567_656
  assert model_configs.count_params("L/16", num_classes=1000) == 304_326_632


@pytest.mark.parametrize("variant", ["Ti/16", "S/16", "B/32", "L/32", "H/14"])
def test_parameter_counts_against_formula(variant):
  cfg = model_configs.decode_variant(variant)
  want = expected_count(cfg["width"], cfg["depth"], cfg["mlp_dim"], cfg["patch_size"][0])
  assert model_configs.count_params(variant, num_classes=1000) == want


def test_readme_model_zoo_is_the_printed_table():
  readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  assert model_configs.zoo_table() in readme


def test_variant_table_and_errors():
  assert model_configs.decode_variant("ViT-B_16") == model_configs.decode_variant("B/16")
  assert model_configs.decode_variant("g/14")["width"] == 1408
  assert model_configs.decode_variant("S/16x8")["patch_size"] == (16, 8)
  with pytest.raises(ValueError, match=r"Unknown variant 'X/16': choose one of Ti/16, S/16"):
    model_configs.decode_variant("X/16")
  with pytest.raises(ValueError, match="closest valid names.*pool_type"):
    model_configs.get_config("B/16", pool_typ="gap")
  cfg = model_configs.get_config("Ti/16", num_classes=10)
  with pytest.raises(AttributeError):
    cfg.hidden_size = 3  # locked: unknown keys fail


def mae_sincos(embed_dim, gh, gw, cls_token):
  """The MAE reference construction (util/pos_embed.py), written out in numpy."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # w first
  grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
  emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
  return emb


@pytest.mark.parametrize("gh,gw,d,cls", [(14, 14, 768, True), (3, 5, 32, False), (4, 2, 16, True)])
def test_sincos_matches_mae_formula(gh, gw, d, cls):
  got = V.posemb_sincos_2d(gh, gw, d, prefix_tokens=int(cls), dtype=np.float64)[0]
  np.testing.assert_allclose(got, mae_sincos(d, gh, gw, cls), rtol=0, atol=1e-12)


def test_sincos_model_has_no_position_parameter_and_uses_the_table():
  m = V.VisionTransformer(num_classes=3, patch_size=4, width=16, depth=1, num_heads=2, posemb="sincos2d")
  x = np.random.default_rng(0).standard_normal((1, 8, 12, 3)).astype(np.float32)
  v = m.init(jax.random.key(0), x)
  assert "posembed_input" not in v["params"]["Transformer"]
  _, out = m.apply(v, x)
  assert out["encoded"].shape == (1, 1 + 2 * 3, 16)


TINY = dict(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32)


@pytest.mark.parametrize("pool_type,logit_shape", [("token", (2, 5)), ("gap", (2, 5)), ("map", (2, 5)),
                                                   ("none", (2, 12, 5))])
def test_pool_types_on_non_square_images(pool_type, logit_shape):
  m = V.VisionTransformer(num_classes=5, pool_type=pool_type, **TINY)
  x = np.random.default_rng(1).standard_normal((2, 12, 16, 3)).astype(np.float32)
  v = m.init(jax.random.key(0), x)
  logits, out = m.apply(v, x)
  assert logits.shape == logit_shape
  assert out["stem"].shape == (2, 3, 4, 16)
  assert ("cls" in v["params"]) == (pool_type == "token")
  assert ("MAPHead_0" in v["params"]) == (pool_type == "map")
  tokens = 12 + (pool_type == "token")
  assert v["params"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, tokens, 16)
  np.testing.assert_array_equal(v["params"]["head"]["kernel"], 0.0)  # zero-init head


def test_gap_is_mean_of_encoded_tokens_and_pre_logits_is_dense_tanh():
  m = V.VisionTransformer(num_classes=5, pool_type="gap", representation_size=7, head_bias_init=-2.0, **TINY)
  x = np.random.default_rng(2).standard_normal((2, 8, 8, 3)).astype(np.float32)
  v = m.init(jax.random.key(0), x)
  np.testing.assert_array_equal(v["params"]["head"]["bias"], -2.0)
  _, out = m.apply(v, x)
  np.testing.assert_allclose(out["head_input"], np.asarray(out["encoded"]).mean(1), rtol=RTOL, atol=ATOL)
  P = v["params"]["pre_logits"]
  np.testing.assert_allclose(out["pre_logits"], np.tanh(out["head_input"] @ P["kernel"] + P["bias"]),
                             rtol=RTOL, atol=ATOL)


def test_fc_norm_pools_patch_tokens_then_normalises_like_mae_finetuning():
  """MAE fine-tuning: keep the class token, average the patch tokens only, LayerNorm after the mean."""
  m = V.VisionTransformer(num_classes=5, pool_type="gap", class_token=True, fc_norm=True, **TINY)
  x = np.random.default_rng(3).standard_normal((2, 8, 8, 3)).astype(np.float32)
  v = perturb(m.init(jax.random.key(0), x), scale=0.5)
  p = v["params"]
  assert "cls" in p and "fc_norm" in p and "encoder_norm" not in p["Transformer"]
  _, out = m.apply(v, x)
  enc = np.asarray(out["encoded"], np.float64)  # no final norm: the raw residual stream
  assert enc.shape[1] == 1 + 4
  mean = enc[:, 1:].mean(1)
  ln = (mean - mean.mean(-1, keepdims=True)) / np.sqrt(mean.var(-1, keepdims=True) + 1e-6)
  want = ln * p["fc_norm"]["scale"] + p["fc_norm"]["bias"]
  np.testing.assert_allclose(out["head_input"], want, rtol=RTOL, atol=ATOL)
  # Without fc_norm, a class-token model with "gap" normalises first and still leaves the class token out.
  m2 = V.VisionTransformer(num_classes=5, pool_type="gap", class_token=True, **TINY)
  v2 = m2.init(jax.random.key(0), x)
  _, out2 = m2.apply(v2, x)
  np.testing.assert_allclose(out2["head_input"], np.asarray(out2["encoded"])[:, 1:].mean(1), rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match="fc_norm=True .* needs pool_type='gap'"):
    V.VisionTransformer(fc_norm=True, **TINY).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="pool_type='token' pools the class token"):
    V.VisionTransformer(class_token=False, **TINY).init(jax.random.key(0), x)


def test_distilled_model_averages_both_heads():
  m = V.VisionTransformer(num_classes=4, distilled=True, head_zeroinit=False, **TINY)
  x = np.random.default_rng(3).standard_normal((2, 8, 8, 3)).astype(np.float32)
  v = m.init(jax.random.key(0), x)
  assert v["params"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 2 + 4, 16)
  logits, out = m.apply(v, x)
  np.testing.assert_allclose(logits, (out["logits_cls"] + out["logits_dist"]) / 2, rtol=1e-6)
  assert not np.allclose(out["logits_cls"], out["logits_dist"])
  with pytest.raises(ValueError, match="pool_type='token'"):
    V.VisionTransformer(num_classes=4, distilled=True, pool_type="gap", **TINY).init(jax.random.key(0), x)


def test_conv_stem_lvvit_shapes_and_batch_stats():
  m = V.VisionTransformer(num_classes=3, stem="conv", stem_width=8, patch_size=16, width=16, depth=1,
                          num_heads=2, residual_scale=2.0)
  x = np.random.default_rng(4).standard_normal((2, 32, 48, 3)).astype(np.float32)
  v = m.init(jax.random.key(0), x)
  stem = v["params"]["stem"]
  assert [stem[f"Conv_{i}"]["kernel"].shape for i in range(3)] == [(7, 7, 3, 8), (3, 3, 8, 8), (3, 3, 8, 8)]
  assert "bias" not in stem["Conv_0"]
  assert v["params"]["embedding"]["kernel"].shape == (8, 8, 8, 16)
  logits, out = m.apply(v, x)
  assert out["stem"].shape == (2, 2, 3, 16)
  _, updates = m.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(updates["batch_stats"]["stem"]["BatchNorm_0"]["mean"], 0.0)


def test_attention_weights_on_request():
  m = V.VisionTransformer(num_classes=3, **TINY)
  x = np.random.default_rng(5).standard_normal((2, 8, 8, 3)).astype(np.float32)
  v = m.init(jax.random.key(0), x)
  _, out = m.apply(v, x)
  assert "attention_weights" not in out
  _, out = m.apply(v, x, return_attention=True)
  assert out["attention_weights"].shape == (2, 2, 2, 5, 5)  # [layers, batch, heads, tokens, tokens]
  np.testing.assert_allclose(np.asarray(out["attention_weights"]).sum(-1), 1.0, rtol=1e-5)


def test_scanned_vit_matches_unrolled():
  x = np.random.default_rng(6).standard_normal((2, 8, 8, 3)).astype(np.float32)
  m = V.VisionTransformer(num_classes=3, head_zeroinit=False, **TINY)
  P = m.init(jax.random.key(0), x)["params"]
  ms = V.VisionTransformer(num_classes=3, head_zeroinit=False, scan=True, remat_policy="dots_saveable", **TINY)
  np.testing.assert_allclose(ms.apply({"params": unrolled_to_scan(P)}, x)[0], m.apply({"params": P}, x)[0],
                             rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype,param_dtype", [(jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16)])
def test_dtype_and_param_dtype_reach_every_layer(dtype, param_dtype):
  m = V.VisionTransformer(num_classes=3, pool_type="map", representation_size=8, dtype=dtype,
                          param_dtype=param_dtype, **TINY)
  x = np.random.default_rng(7).standard_normal((2, 8, 8, 3)).astype(np.float32)
  v = m.init(jax.random.key(0), x)
  assert {a.dtype for a in jax.tree_util.tree_leaves(v["params"])} == {jnp.dtype(param_dtype)}
  logits, out = m.apply(v, x)
  assert out["encoded"].dtype == dtype and out["pre_logits"].dtype == dtype
  assert logits.dtype == jnp.float32
  # Every matmul and convolution takes compute-dtype operands (accumulation may be float32).
  import re
  hlo = jax.jit(lambda v, x: m.apply(v, x)[0]).lower(v, x).as_text()
  ops = [l for l in hlo.splitlines() if "stablehlo.dot_general" in l or "stablehlo.convolution" in l]
  assert len(ops) > 10
  for line in ops:
    operands = line.rsplit(": (", 1)[1].split(") ->")[0]
    assert all("bf16" in t for t in re.findall(r"tensor<[^>]*>", operands)), line


def test_bad_inputs_get_clear_errors():
  m = V.VisionTransformer(num_classes=3, **TINY)
  v = m.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="3-channel images .* got 1 channels"):
    m.apply(v, np.zeros((1, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match="not divisible by the patch size 4x4"):
    m.apply(v, np.zeros((1, 10, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"Expected images of shape \[batch, height, width, 3\]"):
    m.apply(v, np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="Position embedding has 5 tokens of width 16 but the input has 17"):
    m.apply(v, np.zeros((1, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match="Unknown pool_type 'cls'"):
    V.VisionTransformer(pool_type="cls", **TINY).init(jax.random.key(0), np.zeros((1, 8, 8, 3)))
