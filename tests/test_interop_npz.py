"""Published `.npz` layouts: golden files load to identical outputs, round trips are exact, errors are loud."""

import os

import jax
import ml_dtypes
import numpy as np
import pytest

from tests import golden_npz
from tests.helpers import random_params
from vit_jax.interop import CheckpointError, ParamMismatchError, common, load_pretrained, npz
from vit_jax.interop.tree import flatten
from vit_jax.models.vit import VisionTransformer

SIZE = dict(num_classes=7, patch_size=8, width=48, depth=3, num_heads=4, mlp_dim=96)
IMAGES = np.random.default_rng(5).standard_normal((2, 32, 48, 3)).astype(np.float32)  # 4x6 patch grid


def model_and_params(seed=0, **kw):
  model = VisionTransformer(**dict(SIZE, **kw))
  return model, random_params(model, IMAGES, rng=seed)


def logits(model, params):
  return np.asarray(model.apply({"params": params}, IMAGES)[0])


def assert_trees_equal(a, b):
  fa, fb = flatten(common.host(a)), flatten(common.host(b))
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
@pytest.mark.parametrize("kw", [dict(), dict(representation_size=24), dict(pool_type="gap")],
                         ids=["token", "pre_logits", "gap"])
def test_official_vit_jax_layout(tmp_path, prefix, kw):
  model, params = model_and_params(**kw)
  flat = golden_npz.vit_jax_file(params, tmp_path / "ViT.npz", prefix=prefix)
  assert prefix + "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in flat
  loaded = npz.load_npz(tmp_path / "ViT.npz")
  assert_trees_equal(loaded, params)  # pre-Linen names renamed exactly, nothing lost or added
  assert np.array_equal(logits(model, loaded), logits(model, params))


@pytest.mark.parametrize("pool", ["token", "gap", "map"])
@pytest.mark.parametrize("prefix,scanned,bf16", [("params/", False, False), ("", False, False),
                                                 ("params/img/", False, False), ("params/", True, False),
                                                 ("params/", True, True)])
def test_big_vision_layout(tmp_path, pool, prefix, scanned, bf16):
  model, params = model_and_params(pool_type=pool)
  if bf16 and pool == "token":  # rounding cls + row to bfloat16 is not rounding each: keep the row zero
    params["Transformer"]["posembed_input"]["pos_embedding"][:, :1] = 0
  golden_npz.big_vision_file(params, tmp_path / "bv.npz", prefix=prefix, scanned=scanned, bfloat16=bf16)
  raw = np.load(tmp_path / "bv.npz")
  assert (raw[prefix + "embedding/kernel"].dtype.kind == "V") == bf16  # bfloat16 comes back as void V2
  loaded = npz.load_npz(tmp_path / "bv.npz")
  if bf16:
    params = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), params)
    assert flatten(loaded)["embedding/kernel"].dtype == ml_dtypes.bfloat16
    loaded = jax.tree_util.tree_map(lambda a: a.astype(np.float32), loaded)
    params = jax.tree_util.tree_map(lambda a: a.astype(np.float32), params)
  want = logits(model, params)
  assert np.array_equal(logits(model, loaded), want)
  # Loading straight into a scanned model gives the same function.
  scanned_loaded = npz.load_npz(tmp_path / "bv.npz", scan=True)
  assert "encoderblock" in scanned_loaded["Transformer"]
  got = np.asarray(VisionTransformer(**dict(SIZE, pool_type=pool, scan=True)).apply(
      {"params": jax.tree_util.tree_map(lambda a: a.astype(np.float32), scanned_loaded)}, IMAGES)[0])
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)  # scan reorders no math, but XLA may fuse differently


LAYOUT_FILES = [("vit_jax", False), ("big_vision", False), ("big_vision", True)]
MODELS = {"token": dict(), "map": dict(pool_type="map"), "deit": dict(distilled=True),
          "layerscale": dict(layer_scale_init=0.1)}


@pytest.mark.parametrize("layout,scan_file,name", [
    (layout, scan, name) for layout, scan in LAYOUT_FILES for name in MODELS
    if not (name == "deit" and layout == "big_vision")])  # big_vision has no distillation token: see below
@pytest.mark.parametrize("scan_model", [False, True])
def test_round_trip_is_exact(tmp_path, layout, scan_file, name, scan_model):
  kw = MODELS[name]
  model, params = model_and_params(scan=scan_model, **kw)
  if "cls" in params and layout == "big_vision":
    # Our tree round-trips exactly when the class row is zero (the form big_vision files load to);
    # otherwise the row is folded into `cls`, the same function (checked on outputs below).
    params["Transformer"]["posembed_input"]["pos_embedding"][:, :1] = 0
  path = npz.save_npz(tmp_path / "m.npz", params, layout=layout, scan=scan_file)
  back = npz.load_npz(path, scan=scan_model)
  assert_trees_equal(back, params)
  again = npz.to_flat(back, layout=layout, scan=scan_file)
  first = npz.read_npz(path)
  assert sorted(again) == sorted(first) and all(np.array_equal(again[k], first[k]) for k in first)


def test_big_vision_export_folds_class_row_into_class_token(tmp_path):
  model, params = model_and_params()
  path = npz.save_npz(tmp_path / "m.npz", params, layout="big_vision")
  flat = npz.read_npz(path)
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert flat["params/pos_embedding"].shape == (1, 24, 48)
  np.testing.assert_array_equal(flat["params/cls"], params["cls"] + pe[:, :1])
  assert np.array_equal(logits(model, npz.load_npz(path)), logits(model, params))


def test_sincos_model_is_written_with_its_table(tmp_path):
  model, params = model_and_params(posemb="sincos2d")
  settings = dict(SIZE, posemb="sincos2d")
  path = npz.save_npz(tmp_path / "m.npz", params, settings=settings, image_size=(32, 48))
  loaded = npz.load_npz(path)
  learned = VisionTransformer(**dict(SIZE, posemb="learn"))
  assert np.array_equal(logits(learned, loaded), logits(model, params))
  assert common.infer_settings(loaded)["posemb"] == "learn"


@pytest.mark.parametrize("kw", [dict(), dict(pool_type="gap", representation_size=24), dict(pool_type="map"),
                                dict(distilled=True, qkv_bias=False), dict(layer_scale_init=0.1, num_classes=None),
                                dict(activation="swiglu", patch_size=(8, 4)),
                                dict(pool_type="gap", class_token=True, fc_norm=True)])
def test_infer_settings_rebuilds_the_tree(kw):
  _, params = model_and_params(**kw)
  s = common.infer_settings(params)
  for k, v in kw.items():
    if k != "layer_scale_init":
      assert s[k] == (tuple(v) if isinstance(v, tuple) else v), k
  shapes = jax.eval_shape(lambda: VisionTransformer(**s).init(jax.random.key(0), IMAGES))["params"]
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)


def test_big_vision_cannot_hold_distillation_token(tmp_path):
  _, params = model_and_params(distilled=True)
  with pytest.raises(ValueError, match="distillation token"):
    npz.save_npz(tmp_path / "m.npz", params, layout="big_vision")


def test_vit_jax_layout_is_unrolled_only(tmp_path):
  _, params = model_and_params()
  with pytest.raises(ValueError, match="big_vision"):
    npz.save_npz(tmp_path / "m.npz", params, layout="vit_jax", scan=True)


# ---------------------------------------------------------------------------
# Strict key diff, dont_load, head re-initialisation.
# ---------------------------------------------------------------------------

def test_key_diff_lists_missing_unexpected_and_mismatched(tmp_path):
  _, params = model_and_params(representation_size=24)
  golden_npz.vit_jax_file(params, tmp_path / "ViT.npz")
  other = VisionTransformer(**dict(SIZE, num_classes=5, pool_type="token", layer_scale_init=0.1))
  init = random_params(other, IMAGES, rng=1)
  with pytest.raises(ParamMismatchError) as e:
    load_pretrained(tmp_path / "ViT.npz", init)
  msg = str(e.value)
  assert "missing from the checkpoint (6)" in msg and "LayerScale_0/gamma" in msg
  assert "unexpected in the checkpoint (2)" in msg and "pre_logits/kernel" in msg
  assert "head/kernel: (24, 7) vs (48, 5)" in msg and "dont_load" in msg


def test_fine_tune_loading_keeps_new_head_and_drops_pre_logits(tmp_path):
  _, params = model_and_params(representation_size=24)
  golden_npz.vit_jax_file(params, tmp_path / "ViT.npz")
  new = VisionTransformer(**dict(SIZE, num_classes=3))
  init = random_params(new, IMAGES, rng=1)
  loaded = load_pretrained(tmp_path / "ViT.npz", init, reinit_head=True, dont_load="^pre_logits/")
  assert np.array_equal(loaded["head"]["kernel"], init["head"]["kernel"])  # the model's fresh head
  got, want = flatten(loaded), flatten(common.host(params))
  for k in got:
    if not k.startswith("head/"):
      assert np.array_equal(got[k], want[k]), k
  with pytest.raises(ValueError, match="not a valid regular expression"):
    load_pretrained(tmp_path / "ViT.npz", init, dont_load="(")


def test_load_pretrained_casts_to_the_model_dtype(tmp_path):
  model, params = model_and_params()
  golden_npz.big_vision_file(params, tmp_path / "bv.npz", bfloat16=True)
  init = random_params(model, IMAGES, rng=1)
  loaded = load_pretrained(tmp_path / "bv.npz", init)
  assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(loaded))


# ---------------------------------------------------------------------------
# Bad files.
# ---------------------------------------------------------------------------

def test_truncated_file_names_the_problem(tmp_path):
  _, params = model_and_params()
  path = npz.save_npz(tmp_path / "m.npz", params)
  data = open(path, "rb").read()
  open(tmp_path / "cut.npz", "wb").write(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    npz.load_npz(tmp_path / "cut.npz")
  open(tmp_path / "junk.npz", "wb").write(b"not a zip file at all")
  with pytest.raises(CheckpointError, match="not a readable .npz"):
    npz.load_npz(tmp_path / "junk.npz")
  with pytest.raises(CheckpointError, match="No checkpoint file"):
    npz.load_npz(tmp_path / "missing.npz")


def test_file_without_vit_keys_is_rejected(tmp_path):
  np.savez(tmp_path / "other.npz", **{"conv1/kernel": np.zeros(3), "fc/bias": np.zeros(2)})
  with pytest.raises(CheckpointError, match="no 'embedding/kernel'.*'conv1', 'fc'"):
    npz.load_npz(tmp_path / "other.npz")
  np.save(tmp_path / "single.npy", np.zeros(3))
  os.rename(tmp_path / "single.npy", tmp_path / "single.npz")
  with pytest.raises(CheckpointError, match="single array"):
    npz.load_npz(tmp_path / "single.npz")


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
  _, params = model_and_params()
  path = npz.save_npz(tmp_path / "m.npz", params)
  before = open(path, "rb").read()

  def crash(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(np, "savez", crash)
  with pytest.raises(KeyboardInterrupt):
    npz.save_npz(path, params)
  assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["m.npz"]
