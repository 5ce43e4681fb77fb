"""Export to Hugging Face: `from_pretrained` loads every key and reproduces our outputs (<= 2e-5, float32).

Every parameter is random (no trivial init values), the images are non-square
(4x6 patch grid) and width != MLP width != classes, so transposition, head
order and token-order bugs all show.
"""

import json

import numpy as np
import pytest

from tests.helpers import random_params
from vit_jax.interop import hf_export
from vit_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow
TOL = 2e-5
SIZE = dict(num_classes=7, patch_size=8, width=48, depth=3, num_heads=4, mlp_dim=96, activation="gelu")
IMAGES = np.random.default_rng(3).standard_normal((3, 32, 48, 3)).astype(np.float32)
IMAGES_T = torch.from_numpy(IMAGES.transpose(0, 3, 1, 2).copy())


def export(tmp_path, **kw):
  settings = dict(SIZE, **kw)
  model = VisionTransformer(**settings)
  params = random_params(model, IMAGES)
  logits, out = model.apply({"params": params}, IMAGES)
  hf_export.save(params, settings, tmp_path / "hf", image_size=(32, 48))
  return out, tmp_path / "hf"


def load(cls, path, **kw):
  model, info = getattr(transformers, cls).from_pretrained(path, output_loading_info=True, **kw)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  return model.eval()


def close(ours, theirs):
  theirs = theirs.detach().numpy()
  assert np.max(np.abs(np.asarray(ours) - theirs)) <= TOL
  assert np.std(theirs) > 0.1  # not a comparison of near-constant outputs


@pytest.mark.parametrize("kw", [dict(), dict(scan=True), dict(activation="gelu_tanh", qkv_bias=False),
                                dict(posemb="sincos2d")], ids=["plain", "scan", "tanh-nobias", "sincos"])
def test_vit_classifier(tmp_path, kw):
  out, path = export(tmp_path, **kw)
  cfg = json.loads((path / "config.json").read_text())
  assert cfg["layer_norm_eps"] == 1e-6 and cfg["image_size"] == [32, 48]
  assert cfg["hidden_act"] == {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[kw.get("activation", "gelu")]
  ref = load("ViTForImageClassification", path)
  with torch.no_grad():
    got = ref(pixel_values=IMAGES_T, output_hidden_states=True)
  close(out["logits"], got.logits)


def test_representation_layer_is_the_pooler(tmp_path):
  out, path = export(tmp_path, representation_size=24)
  ref = load("ViTModel", path)
  with torch.no_grad():
    got = ref(pixel_values=IMAGES_T)
  close(out["pre_logits"], got.pooler_output)
  close(out["encoded"], got.last_hidden_state)


def test_headless_model_is_a_bare_encoder(tmp_path):
  out, path = export(tmp_path, num_classes=None)
  ref = load("ViTModel", path, add_pooling_layer=False)
  with torch.no_grad():
    got = ref(pixel_values=IMAGES_T)
  close(out["encoded"], got.last_hidden_state)


def test_deit_with_teacher_head(tmp_path):
  out, path = export(tmp_path, distilled=True)
  assert json.loads((path / "config.json").read_text())["model_type"] == "deit"
  ref = load("DeiTForImageClassificationWithTeacher", path)
  with torch.no_grad():
    got = ref(pixel_values=IMAGES_T)
  close(out["logits"], got.logits)
  close(out["logits_cls"], got.cls_logits)
  close(out["logits_dist"], got.distillation_logits)


@pytest.mark.parametrize("kw,match", [(dict(pool_type="gap"), "class token only.*timm"),
                                      (dict(layer_scale_init=0.1), "layer_scale_init=0.1"),
                                      (dict(norm="post"), "norm='post'")])
def test_unrepresentable_models_fail_clearly(tmp_path, kw, match):
  with pytest.raises(ValueError, match=match):
    export(tmp_path, **kw)
