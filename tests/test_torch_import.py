"""Importing timm and Hugging Face state dicts: the exporters' exact inverse, and parity with transformers.

Round trips (our random tree -> export -> import) must be bit-exact for every model the exporters
support.  Against transformers, a `ViTForImageClassification` and a
`DeiTForImageClassificationWithTeacher` built here with every parameter perturbed are saved with
`save_pretrained` (safetensors) and as `.pth`, read without torch, and must give the same logits
(<= 2e-5).
"""

import json

import jax
import numpy as np
import pytest

from tests.helpers import random_params
from vit_jax.interop import hf_export, timm_export, torch_file, torch_import
from vit_jax.interop.tree import ParamMismatchError, flatten
from vit_jax.models.vit import VisionTransformer

SIZE = dict(num_classes=7, patch_size=8, width=48, depth=2, num_heads=4, mlp_dim=96, activation="gelu")
IMAGES = np.random.default_rng(3).standard_normal((2, 32, 48, 3)).astype(np.float32)
GRID = (4, 6)


def assert_bitwise(a, b):
  a, b = flatten(a), flatten(b)
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.asarray(a[k]).tobytes() == np.asarray(b[k], np.float32).tobytes(), k


@pytest.mark.parametrize("kw", [dict(), dict(pool_type="gap"), dict(pool_type="gap", fc_norm=True, class_token=True),
                                dict(pool_type="map"), dict(distilled=True), dict(layer_scale_init=0.1),
                                dict(qkv_bias=False, num_classes=None), dict(pool_type="gap", posemb="none")],
                         ids=["token", "gap", "fc_norm", "map", "distilled", "layerscale", "nobias-nohead", "no-posemb"])
def test_timm_round_trip_is_bit_exact(kw):
  settings = dict(SIZE, **kw)
  params = random_params(VisionTransformer(**settings), IMAGES)
  sd = timm_export.state_dict(params, settings, GRID)
  back, got, grid = torch_import.from_timm(sd, {"img_size": [32, 48], "num_heads": 4})
  assert grid == GRID and got["pool_type"] == settings.get("pool_type", "token")
  assert_bitwise(back, params)


@pytest.mark.parametrize("kw", [dict(), dict(distilled=True), dict(representation_size=32, num_classes=None),
                                dict(qkv_bias=False, activation="gelu_tanh")],
                         ids=["vit", "deit", "pooler", "nobias-tanh"])
def test_hf_round_trip_is_bit_exact(kw):
  settings = dict(SIZE, **kw)
  params = random_params(VisionTransformer(**settings), IMAGES)
  sd = hf_export.state_dict(params, settings, GRID)
  back, got, grid = torch_import.from_hf(sd, hf_export.config(settings, GRID))
  assert grid == GRID
  assert_bitwise(back, params)


def test_mismatches_are_one_error_naming_the_keys():
  params = random_params(VisionTransformer(**SIZE), IMAGES)
  sd = timm_export.state_dict(params, SIZE, GRID)
  sd["blocks.0.extra.weight"] = np.zeros(3, np.float32)
  del sd["norm.bias"]
  with pytest.raises(ParamMismatchError, match=r"missing \['norm.bias'\]; unexpected \['blocks.0.extra.weight'\]"):
    torch_import.from_timm(sd, {"img_size": [32, 48]})


@pytest.mark.slow
@pytest.mark.parametrize("cls", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher"])
def test_transformers_models_import_with_their_logits(tmp_path, cls):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  kind = "deit" if cls.startswith("DeiT") else "vit"
  config = getattr(transformers, "DeiTConfig" if kind == "deit" else "ViTConfig")(
      hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=[32, 48],
      patch_size=8, num_labels=7, layer_norm_eps=1e-6, hidden_act="gelu")
  torch.manual_seed(0)
  ref = getattr(transformers, cls)(config).eval()
  with torch.no_grad():
    for p in ref.parameters():  # every parameter away from its initial value
      p.add_(0.1 * torch.randn_like(p))
  ref.save_pretrained(tmp_path / "hf")
  torch.save(ref.state_dict(), tmp_path / "model.pth")
  with torch.no_grad():
    want = ref(pixel_values=torch.from_numpy(IMAGES.transpose(0, 3, 1, 2).copy())).logits.numpy()
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  for source in (tmp_path / "hf" / "model.safetensors", tmp_path / "model.pth"):
    params, settings, _ = torch_import.from_hf(torch_file.load(source), cfg)
    logits, _ = VisionTransformer(**settings).apply({"params": jax.tree_util.tree_map(np.asarray, params)}, IMAGES)
    assert np.max(np.abs(np.asarray(logits) - want)) <= 2e-5 and np.std(want) > 0.1


def test_convert_and_load_pretrained_read_pth_files_and_folders(tmp_path):
  torch = pytest.importorskip("torch")
  from vit_jax import checkpoint
  from vit_jax.interop import convert, load_pretrained
  settings = dict(SIZE, distilled=True)
  params = random_params(VisionTransformer(**settings), IMAGES)
  sd = timm_export.state_dict(params, settings, GRID)
  # A DeiT-style training checkpoint: the weights under "model", with optimizer state and args beside them.
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 3, "optimizer": {}},
             tmp_path / "deit.pth")
  assert convert.main(["--input", str(tmp_path / "deit.pth"), "--to", "orbax", "--output", str(tmp_path / "o"),
                       "--config", "num_heads=4", "--image_size", "32,48"]) == 0
  back, config = checkpoint.load(tmp_path / "o")
  assert config["model"]["distilled"] and config["image_size"] == [32, 48]
  assert_bitwise(back, params)
  # A Hugging Face folder (our export) through convert, and a .pth into a new head via load_pretrained.
  hf_export.save(params, settings, tmp_path / "hf", image_size=(32, 48))
  assert convert.main(["--input", str(tmp_path / "hf"), "--to", "vit_jax_npz", "--output",
                       str(tmp_path / "m.npz")]) == 0
  init = random_params(VisionTransformer(**dict(settings, num_classes=3)), IMAGES, rng=1)
  loaded = load_pretrained(str(tmp_path / "deit.pth"), init, reinit_head=True)
  assert np.array_equal(loaded["head"]["kernel"], init["head"]["kernel"])
  assert np.array_equal(loaded["Transformer"]["encoder_norm"]["scale"], params["Transformer"]["encoder_norm"]["scale"])


@pytest.mark.slow
def test_main_fine_tunes_from_a_pth_file(tmp_path):
  """`main.py --config.init.path=model.pth`: the timm weights are read without torch and, at lr 0, come out
  of training unchanged, except the new head (5 classes in the file, 10 digits here)."""
  import subprocess
  import sys

  torch = pytest.importorskip("torch")
  from tests.test_train import ROOT, flags_of
  from vit_jax import checkpoint
  settings = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=2, channels=1, num_classes=5,
                  activation="gelu", pool_type="token")
  params = random_params(VisionTransformer(**settings), np.zeros((1, 8, 8, 1), np.float32))
  sd = timm_export.state_dict(params, settings, (4, 4))
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 1}, tmp_path / "pretrained.pth")
  flags = [*flags_of(str(tmp_path / "tfds"), total_steps=2, checkpoint_steps=2, eval_steps=2, log_steps=2),
           "--config.model.stem=patch", "--config.model.pool_type=token", "--config.optim.lr=0.0",
           "--config.optim.schedule.warmup_steps=0", "--config.optim.schedule.min_lr=0.0",
           f"--config.init.path={tmp_path / 'pretrained.pth'}"]
  done = subprocess.run([sys.executable, "main.py", f"--workdir={tmp_path / 'run'}", *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  tuned = flatten(checkpoint.load(tmp_path / "run")[0])
  for k, v in flatten(params).items():
    if not k.startswith("head/"):
      assert np.array_equal(tuned[k], v), k
  assert tuned["head/kernel"].shape == (16, 10)
