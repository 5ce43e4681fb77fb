"""ViT-22B's block options (QK-norm, parallel blocks, no biases, RMSNorm) and CaiT's talking heads:
against torch references written from the papers (`tests/torch_reference.py`), through timm's names
both ways, under `scan`, and refused by the exporters that cannot hold them."""

import jax
import numpy as np
import pytest

from tests.helpers import random_params
from vit_jax.interop import common, hf_export, timm_export
from vit_jax.interop.torch_import import from_timm
from vit_jax.interop.tree import flatten
from vit_jax.models.attention import MultiHeadAttention
from vit_jax.models.vit import VisionTransformer

BASE = dict(num_classes=5, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=48, channels=3,
            activation="gelu")
OPTIONS = {
    "qk_layernorm": dict(qk_norm="layernorm"),
    "qk_rmsnorm_rms_blocks_no_biases": dict(qk_norm="rmsnorm", norm_type="rmsnorm", qkv_bias=False,
                                            proj_bias=False),
    "parallel": dict(parallel=True),
    "parallel_vit22b": dict(parallel=True, qk_norm="layernorm", qkv_bias=False),
    "parallel_rms_no_biases": dict(parallel=True, qk_norm="rmsnorm", norm_type="rmsnorm", qkv_bias=False,
                                   proj_bias=False),
}
GRID = (3, 2)  # a non-square grid: 12 x 8 pixels


def images(seed=0):
  return np.random.default_rng(seed).standard_normal((2, 4 * GRID[0], 4 * GRID[1], 3)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_logits_match_the_torch_reference_through_timm_names(name):
  torch = pytest.importorskip("torch")
  from tests import torch_reference as ref
  settings = dict(BASE, **OPTIONS[name])
  model = VisionTransformer(**settings)
  x = images()
  params = random_params(model, x, rng=1)  # every parameter perturbed, norm scales around 1
  sd = timm_export.state_dict(params, settings, GRID)
  o = OPTIONS[name]
  block = dict(qkv_bias=o.get("qkv_bias", True), qk_norm=o.get("qk_norm"), proj_bias=o.get("proj_bias", True),
               norm_type=o.get("norm_type", "layernorm"))
  theirs = ref.ViT(grid=GRID, patch=4, dim=32, depth=2, heads=4, hidden=48, num_classes=5,
                   parallel=o.get("parallel", False), **block).eval()
  theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  with torch.no_grad():
    want = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  got, _ = jax.jit(model.apply)({"params": params}, x)
  assert np.max(np.abs(np.asarray(got) - want)) <= 2e-5

  # And back: the state dict alone gives these settings and these parameters, bit for bit.
  back, found, grid = from_timm(sd, timm_export.model_args(settings, GRID)[1])
  assert grid == GRID
  for key in ("qk_norm", "parallel", "qkv_bias", "proj_bias", "norm_type", "mlp_dim"):
    assert found[key] == common.model_settings(settings)[key], key
  mine, read = flatten(params), flatten(back)
  assert sorted(mine) == sorted(read)
  assert all(np.array_equal(np.asarray(mine[k]), read[k]) for k in mine)


@pytest.mark.parametrize("name", ["qk_layernorm", "parallel_vit22b"])
def test_scan_matches_unrolled(name):
  from vit_jax.models.encoder import unrolled_to_scan
  settings = dict(BASE, **OPTIONS[name])
  x = images(1)
  params = random_params(VisionTransformer(**settings), x, rng=2)
  want, _ = VisionTransformer(**settings).apply({"params": params}, x)
  got, _ = VisionTransformer(**settings, scan=True).apply({"params": unrolled_to_scan(params)}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_talking_heads_mix_heads_before_and_after_the_softmax():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 5, 12)).astype(np.float32)
  mha = MultiHeadAttention(num_heads=3, talking_heads=True)
  params = random_params(mha, x, scale=0.5)
  got, weights = mha.apply({"params": params}, x, return_weights=True)

  def dense(a, p):  # [.., in, heads] -> [.., out, heads]
    return np.einsum("...i,io->...o", a, np.asarray(p["kernel"], np.float64).reshape(a.shape[-1], -1)) + \
        (np.asarray(p["bias"], np.float64).reshape(-1) if "bias" in p else 0)
  q, k, v = (dense(x, params[n]).reshape(2, 5, 3, 4) for n in ("query", "key", "value"))
  logits = np.einsum("bqhd,bkhd->bqkh", q / 2.0, k)  # 1/sqrt(4)
  logits = dense(logits, params["talking_heads_pre"])  # mixes the head axis
  probs = np.exp(logits - logits.max(2, keepdims=True))
  probs /= probs.sum(2, keepdims=True)
  mixed = dense(probs, params["talking_heads_post"])  # not renormalised
  out = np.einsum("bqkh,bkhd->bqhd", mixed, v).reshape(2, 5, 12)
  want = dense(out, {"kernel": params["out"]["kernel"], "bias": params["out"]["bias"]})
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(weights), mixed.transpose(0, 3, 1, 2), atol=1e-6)
  assert not np.allclose(np.asarray(weights).sum(-1), 1.0)  # post-softmax mixing does not renormalise


@pytest.mark.parametrize("option", [dict(qk_norm="layernorm"), dict(parallel=True), dict(proj_bias=False),
                                    dict(norm_type="rmsnorm"), dict(talking_heads=True)])
def test_exporters_that_cannot_hold_an_option_name_it(option):
  settings = common.model_settings(dict(BASE, **option))
  with pytest.raises(ValueError, match=f"Hugging Face ViT cannot represent this model: {next(iter(option))}="):
    hf_export.check_supported(settings)
  if "talking_heads" in option:
    with pytest.raises(ValueError, match="timm's VisionTransformer cannot represent this model: talking_heads="):
      timm_export.check_supported(settings)
  mixed = common.model_settings(dict(BASE, qk_norm="rmsnorm"))  # timm builds q_norm with the blocks' norm
  with pytest.raises(ValueError, match="qk_norm='rmsnorm' \\(supported: None, 'layernorm'\\)"):
    timm_export.check_supported(mixed)
