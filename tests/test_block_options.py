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


# ----------------------------------------------------------------------------------------- CPVT's PEG

def test_peg_is_a_zero_padded_depthwise_conv_with_a_residual_beside_the_class_token():
  torch = pytest.importorskip("torch")
  from vit_jax.models.encoder import PositionEncodingGenerator
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 1 + 3 * 5, 6)).astype(np.float32)  # a class token and a 3x5 grid
  peg = PositionEncodingGenerator()
  params = random_params(peg, x, (3, 5), 1, scale=0.5)
  got = np.asarray(peg.apply({"params": params}, x, (3, 5), 1))
  grid = torch.from_numpy(x[:, 1:].reshape(2, 3, 5, 6).transpose(0, 3, 1, 2).copy())
  kernel = torch.from_numpy(np.asarray(params["conv"]["kernel"]).transpose(3, 2, 0, 1).copy())  # [6, 1, 3, 3]
  conv = torch.nn.functional.conv2d(grid, kernel, torch.from_numpy(np.asarray(params["conv"]["bias"])),
                                    padding=1, groups=6)
  want = (grid + conv).numpy().transpose(0, 2, 3, 1).reshape(2, 15, 6)
  np.testing.assert_array_equal(got[:, 0], x[:, 0])  # the class token is kept aside
  assert np.max(np.abs(got[:, 1:] - want)) <= 1e-5
  assert np.max(np.abs(got[:, 1:] - x[:, 1:])) > 0.1


@pytest.mark.parametrize("pool", ["token", "gap", "map"])
def test_cpvt_runs_at_any_resolution_and_scans(pool):
  settings = dict(BASE, posemb="peg", pool_type=pool, depth=3)
  model = VisionTransformer(**settings)
  params = random_params(model, images(), rng=4)
  tree = flatten(params)
  assert tree["Transformer/posembed_peg/conv/kernel"].shape == (3, 3, 1, 32)
  assert not any("pos_embedding" in k for k in tree) and ("cls" in tree) == (pool == "token")
  bigger = np.random.default_rng(6).standard_normal((2, 24, 20, 3)).astype(np.float32)  # a 6x5 grid, no resizing
  from vit_jax.models.encoder import scan_to_unrolled, unrolled_to_scan
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, return_attention=True))
  apply_scan = jax.jit(lambda p, x: VisionTransformer(**settings, scan=True).apply({"params": p}, x,
                                                                                 return_attention=True))
  for x in (images(), bigger):
    want, out = apply(params, x)
    assert want.shape == (2, 5) and np.all(np.isfinite(np.asarray(want)))
    # Scanned: block 0 stays unrolled (the PEG follows it), blocks 1..2 are stacked; the same logits.
    scanned = unrolled_to_scan(params)
    assert {"encoderblock_0", "encoderblock", "posembed_peg"} <= set(scanned["Transformer"])
    assert jax.tree_util.tree_leaves(scanned["Transformer"]["encoderblock"])[0].shape[0] == 2
    got, out_scan = apply_scan(scanned, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert out_scan["attention_weights"].shape == out["attention_weights"].shape
    back = flatten(scan_to_unrolled(scanned))
    assert sorted(back) == sorted(tree) and all(np.array_equal(back[k], tree[k]) for k in tree)


def test_cpvt_variants_have_the_counted_parameters():
  from vit_jax.models.variants import count_params
  # DeiT's counts less the position table plus the PEG (9C + C); -GAP also without the class token.
  want = {"CPVT-Ti": 5_681_512, "CPVT-S": 21_978_856, "CPVT-B": 86_424_040,
          "CPVT-Ti-GAP": 5_681_320, "CPVT-S-GAP": 21_978_472, "CPVT-B-GAP": 86_423_272}
  for variant, n in want.items():
    assert count_params(variant, num_classes=1000) == n, variant
  assert count_params("DeiT-Ti", num_classes=1000) - 197 * 192 + 10 * 192 == want["CPVT-Ti"]


@pytest.mark.parametrize("option", list(OPTIONS.values()) + [dict(posemb="peg"), dict(talking_heads=True)],
                         ids=list(OPTIONS) + ["peg", "talking_heads"])
def test_settings_are_read_back_from_the_weights_alone(option):
  settings = common.model_settings(dict(BASE, **option))
  found = common.infer_settings(random_params(VisionTransformer(**settings), images()))
  for key in ("posemb", "parallel", "norm_type", "proj_bias", "talking_heads", "qk_norm", "qkv_bias"):
    assert found[key] == settings[key], key


def test_exporters_refuse_the_peg_by_name():
  settings = common.model_settings(dict(BASE, posemb="peg"))
  for check, target in ((hf_export.check_supported, "Hugging Face ViT"),
                        (timm_export.check_supported, "timm's VisionTransformer")):
    with pytest.raises(ValueError, match=f"{target} cannot represent this model: posemb='peg'"):
      check(settings)


# ----------------------------------------------------------------------------------------- the trainer

@pytest.mark.slow
def test_trainer_runs_the_options_on_a_data_by_tensor_mesh_and_the_peg_model_grows(tmp_path, monkeypatch):
  """PEG + parallel QK-norm blocks without biases, layer-wise lr decay, heads split over `tensor`
  (8 simulated devices: data 4 x tensor 2); then the trained model read back and evaluated on 16 px
  digits (an 8x8 grid, trained on 4x4) with no resizing step, by the PEG bench's own evaluation."""
  import os
  import sys

  from configs.vit import get_config
  from vit_jax.train import trainer
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
  from peg_resolution import accuracy

  c = get_config("runlocal")
  c.model.update(posemb="peg", qk_norm="layernorm", parallel=True, qkv_bias=False, width=16, depth=2,
                 num_heads=2, mlp_dim=32, stem_width=8)
  c.update(dict(mesh=(("data", 4), ("tensor", 2)), total_steps=20, eval_steps=20, checkpoint_steps=20))
  c.optim.layer_decay = 0.75
  c.data.data_dir = str(tmp_path / "tfds")
  final = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  assert 0.0 <= final["eval/accuracy"] <= 1.0
  monkeypatch.setenv("TFDS_DATA_DIR", c.data.data_dir)
  at_8, at_16 = accuracy(str(tmp_path / "run"), 8), accuracy(str(tmp_path / "run"), 16)
  assert at_8 == pytest.approx(final["eval/accuracy"], abs=1e-6)  # the same model and test set as the trainer's
  assert 0.0 <= at_16 <= 1.0
