"""`python -m vit_jax.interop.convert`: end to end from a native checkpoint, and one-line errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import random_params
from vit_jax import checkpoint
from vit_jax.interop import convert, npz, timm_export
from vit_jax.interop.tree import flatten
from vit_jax.models.vit import VisionTransformer

SIZE = dict(num_classes=7, patch_size=8, width=48, depth=2, num_heads=4, mlp_dim=96, activation="gelu")
IMAGES = np.random.default_rng(6).standard_normal((2, 32, 48, 3)).astype(np.float32)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def native(tmp_path, **kw):
  """A work directory as the trainer leaves it: checkpoints/<step>/{params, config}."""
  settings = dict(SIZE, **kw)
  model = VisionTransformer(**settings)
  params = random_params(model, IMAGES)
  checkpoint.save(tmp_path / "work" / "checkpoints", params, config={"model": settings, "image_size": [32, 48]},
                  step=10)
  return model, params, str(tmp_path / "work")


def run_cli(*args):
  return convert.main([str(a) for a in args])


def test_native_to_every_format(tmp_path, capsys):
  model, params, work = native(tmp_path)
  want = np.asarray(model.apply({"params": params}, IMAGES)[0])

  assert run_cli("--input", work, "--to", "vit_jax_npz", "--output", tmp_path / "m.npz") == 0
  assert "timm: model.load_pretrained" in capsys.readouterr().out
  back = npz.load_npz(tmp_path / "m.npz")
  assert np.array_equal(np.asarray(model.apply({"params": back}, IMAGES)[0]), want)

  assert run_cli("--input", work, "--to", "big_vision_npz", "--output", tmp_path / "bv.npz", "--scan") == 0
  assert "params/Transformer/encoderblock/LayerNorm_0/scale" in np.load(tmp_path / "bv.npz").files

  assert run_cli("--input", work, "--to", "timm", "--output", tmp_path / "timm") == 0
  sd = load_file(tmp_path / "timm" / "model.safetensors")
  ref = timm_export.state_dict(params, SIZE, (4, 6))
  assert sorted(sd) == sorted(ref) and all(np.array_equal(sd[k], ref[k]) for k in ref)
  cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
  assert cfg["model_args"]["img_size"] == [32, 48] and cfg["num_classes"] == 7

  assert run_cli("--input", work, "--to", "hf", "--output", tmp_path / "hf") == 0
  assert "ViTForImageClassification.from_pretrained" in capsys.readouterr().out
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "gelu"

  # .npz -> native: settings are read from the weights (activation given, as weights cannot show it).
  assert run_cli("--input", tmp_path / "m.npz", "--to", "orbax", "--output", tmp_path / "again",
                 "--config", "activation=gelu", "--image_size", "32,48") == 0
  params2, config2 = checkpoint.load(tmp_path / "again")
  assert config2["model"]["activation"] == "gelu" and config2["image_size"] == [32, 48]
  assert all(np.array_equal(a, b) for a, b in zip(flatten(params2).values(), flatten(back).values()))


def test_command_line_entry_point(tmp_path):
  _, _, work = native(tmp_path)
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = subprocess.run([sys.executable, "-m", "vit_jax.interop.convert", "--input", work, "--to", "vit_jax_npz",
                         "--output", str(tmp_path / "m.npz")], capture_output=True, text=True, env=env, cwd=ROOT)
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("wrote vit_jax_npz to")
  cut = tmp_path / "cut.npz"
  cut.write_bytes((tmp_path / "m.npz").read_bytes()[:1000])
  done = subprocess.run([sys.executable, "-m", "vit_jax.interop.convert", "--input", str(cut), "--to", "hf",
                         "--output", str(tmp_path / "hf")], capture_output=True, text=True, env=env, cwd=ROOT)
  assert done.returncode == 2
  assert done.stderr.count("\n") == 1 and "truncated or corrupt" in done.stderr
  assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("args,match", [
    (["--config", "width=64"], "do not match the model settings"),
    (["--config", "widht=48"], r"closest valid names: \{'widht': \['width'\]\}"),
    (["--config", "pool_type=gap"], "unexpected in the checkpoint"),
    (["--image_size", "32,44"], "is not divisible by the patch size"),
    (["--image_size", "40,48"], r"pos_embedding: \(1, 25, 48\) vs \(1, 31, 48\); Fix .* --image_size"),
])
def test_wrong_settings_fail_before_writing(tmp_path, capsys, args, match):
  _, _, work = native(tmp_path)
  assert run_cli("--input", work, "--to", "timm", "--output", tmp_path / "out", *args) == 2
  assert re.search(match, capsys.readouterr().err)
  assert not (tmp_path / "out").exists()


def test_unrepresentable_targets_name_the_alternative(tmp_path, capsys):
  _, _, work = native(tmp_path, pool_type="gap")
  assert run_cli("--input", work, "--to", "hf", "--output", tmp_path / "hf") == 2
  assert "export this model to timm instead" in capsys.readouterr().err


@pytest.mark.parametrize("kw,match", [(dict(representation_size=24), "representation_size=24"),
                                      (dict(norm="post"), "norm='post'"), (dict(activation="swiglu"), "swiglu"),
                                      (dict(layer_norm_eps=1e-5), "layer_norm_eps")])
def test_timm_cannot_represent(kw, match):
  with pytest.raises(ValueError, match=match):
    timm_export.model_args(dict(SIZE, **kw), (4, 6))


def test_config_spec_parsing(tmp_path):
  assert convert.parse_config("variant=S/16x8,num_classes=10,representation_size=None") == dict(
      width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=(16, 8), num_classes=10, representation_size=None)
  assert convert.parse_config('{"model": {"width": 8}, "depth": 2}') == dict(width=8, depth=2)
  (tmp_path / "c.json").write_text('{"activation": "gelu_tanh"}')
  assert convert.parse_config(str(tmp_path / "c.json")) == dict(activation="gelu_tanh")
  assert convert.parse_config("patch_size=(16, 8),activation=gelu") == dict(patch_size=(16, 8), activation="gelu")
  with pytest.raises(ValueError, match="not key=value"):
    convert.parse_config("width")


def test_scanned_native_checkpoint_converts(tmp_path):
  model, params, work = native(tmp_path, scan=True)
  assert "encoderblock" in params["Transformer"]
  assert run_cli("--input", work, "--to", "vit_jax_npz", "--output", tmp_path / "m.npz") == 0
  unrolled = VisionTransformer(**SIZE)
  got = unrolled.apply({"params": npz.load_npz(tmp_path / "m.npz")}, IMAGES)[0]
  np.testing.assert_allclose(got, model.apply({"params": params}, IMAGES)[0], atol=2e-5)


def test_package_never_imports_torch(tmp_path):
  """Exporting, and reading PyTorch weights back, with torch installed but never imported."""
  _, _, work = native(tmp_path)
  code = ("import sys; from vit_jax.interop import convert; "
          f"assert convert.main(['--input', {work!r}, '--to', 'hf', '--output', {str(tmp_path / 'hf')!r}]) == 0; "
          "assert convert.main(['--input', " + repr(work) + ", '--to', 'timm', '--output', "
          + repr(str(tmp_path / 'timm')) + "]) == 0; "
          "from vit_jax.interop import official, torch_file, torch_import; "  # and reading them back
          "assert convert.main(['--input', " + repr(str(tmp_path / 'hf')) + ", '--to', 'orbax', '--output', "
          + repr(str(tmp_path / 'back')) + "]) == 0; "
          "bad = [m for m in ('torch', 'transformers', 'timm') if m in sys.modules]; assert not bad, bad")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert done.returncode == 0, done.stderr[-2000:]
