"""Export to timm: `.npz` through timm's `_load_weights`, and the state dict with `strict=True`.

timm needs torchvision, whose only builds here are CUDA ones, so these tests
run in their own environment: `make test-timm`.  Elsewhere they skip.
"""

import numpy as np
import pytest

from tests.helpers import random_params
from vit_jax.interop import npz, resize_posemb, timm_export
from vit_jax.models.vit import VisionTransformer

timm = pytest.importorskip(
    "timm", reason="timm is not installed; `make test-timm` runs these in an environment with the torch stack "
    "timm needs (torchvision exists here only as a CUDA build)")
import torch  # noqa: E402  (timm implies torch)
from safetensors.torch import load_file  # noqa: E402

pytestmark = [pytest.mark.timm, pytest.mark.slow]
TOL = 2e-5
SIZE = dict(num_classes=7, patch_size=8, width=48, depth=3, num_heads=4, mlp_dim=96, activation="gelu")
IMAGES = np.random.default_rng(4).standard_normal((3, 32, 48, 3)).astype(np.float32)
IMAGES_T = torch.from_numpy(IMAGES.transpose(0, 3, 1, 2).copy())
GRID = (4, 6)
POOLS = [dict(), dict(pool_type="gap"), dict(pool_type="map")]
POOL_IDS = ["token", "gap", "map"]


def ours(**kw):
  settings = dict(SIZE, **kw)
  model = VisionTransformer(**settings)
  params = random_params(model, IMAGES)
  return settings, params, np.asarray(model.apply({"params": params}, IMAGES)[0])


def timm_model(settings, **overrides):
  arch, args = timm_export.model_args(settings, GRID)
  return timm.create_model(arch, pretrained=False, **dict(args, **overrides)).eval()


def close(want, model):
  with torch.no_grad():
    got = model(IMAGES_T).numpy()
  assert np.max(np.abs(got - want)) <= TOL
  assert np.std(want) > 0.1


def assert_state_matches(model, expected):
  """Every timm tensor equals what our state-dict exporter produces (`_load_weights` has no report)."""
  sd = model.state_dict()
  assert sorted(sd) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_allclose(sd[k].numpy(), v, atol=0, rtol=0, err_msg=k)


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_vit_jax_npz_through_load_weights(tmp_path, prefix):
  settings, params, want = ours()
  path = npz.save_npz(tmp_path / "m.npz", params, layout="vit_jax", prefix=prefix)
  model = timm_model(settings)
  model.load_pretrained(path)
  close(want, model)
  assert_state_matches(model, timm_export.state_dict(params, settings, GRID))


@pytest.mark.parametrize("kw", POOLS, ids=POOL_IDS)
@pytest.mark.parametrize("prefix,scan", [("params/", False), ("", False), ("params/", True)])
def test_big_vision_npz_through_load_weights(tmp_path, kw, prefix, scan):
  settings, params, want = ours(**kw)
  path = npz.save_npz(tmp_path / "m.npz", params, layout="big_vision", prefix=prefix, scan=scan)
  # big_vision's class token has no position-embedding row: timm's no_embed_class.
  model = timm_model(settings, no_embed_class=kw.get("pool_type", "token") == "token")
  model.load_pretrained(path)
  close(want, model)


@pytest.mark.parametrize("kw", POOLS + [dict(pool_type="none"), dict(distilled=True), dict(layer_scale_init=0.1),
                                        dict(activation="gelu_tanh", qkv_bias=False), dict(posemb="sincos2d"),
                                        dict(num_classes=None),
                                        dict(pool_type="gap", class_token=True, fc_norm=True, posemb="sincos2d"),
                                        dict(qk_norm="layernorm"),
                                        dict(parallel=True, qk_norm="layernorm", qkv_bias=False, layer_scale_init=0.1),
                                        dict(norm_type="rmsnorm", qk_norm="rmsnorm", proj_bias=False, pool_type="gap"),
                                        dict(parallel=True, norm_type="rmsnorm", qk_norm="rmsnorm", qkv_bias=False,
                                             proj_bias=False)],
                         ids=POOL_IDS + ["none", "deit", "layerscale", "tanh-nobias", "sincos", "headless", "mae-ft",
                                         "qknorm", "parallel-vit22b", "rms-nobias", "parallel-rms-nobias"])
def test_state_dict_loads_strictly(tmp_path, kw):
  settings, params, want = ours(**kw)
  model = timm_model(settings)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in timm_export.state_dict(params, settings, GRID).items()},
                        strict=True)
  close(want, model)  # headless: timm's Identity head returns the pooled features, as ours does
  # The exported directory is a timm hub folder: create_model reads config.json and the weights.
  timm_export.save(params, settings, tmp_path / "timm", image_size=(32, 48))
  reloaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
  close(want, reloaded)  # through timm's own loading (checkpoint_filter_fn)
  reloaded.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)  # nothing left over


def test_posemb_resize_matches_timm_load_weights(tmp_path):
  """Our "timm" mode equals what timm does when a checkpoint's grid differs (4x4 -> 6x6)."""
  settings = dict(SIZE)
  small = VisionTransformer(**settings)
  params = random_params(small, np.zeros((1, 32, 32, 3), np.float32))
  path = npz.save_npz(tmp_path / "m.npz", params)
  arch, args = timm_export.model_args(settings, (6, 6))
  model = timm.create_model(arch, pretrained=False, **args).eval()
  model.load_pretrained(path)
  want = resize_posemb(params["Transformer"]["posembed_input"]["pos_embedding"], (6, 6), num_prefix_tokens=1,
                       mode="timm")
  np.testing.assert_allclose(model.pos_embed.detach().numpy(), want, atol=5e-6)
  other = resize_posemb(params["Transformer"]["posembed_input"]["pos_embedding"], (6, 6), num_prefix_tokens=1,
                        mode="vit_jax")
  assert np.max(np.abs(model.pos_embed.detach().numpy() - other)) > 1e-2  # the modes really differ


def test_vit_b16_through_the_convert_command(tmp_path):
  """Full size: ViT-B/16 @ 224 (86.6M parameters, tanh GELU as published) from a native checkpoint."""
  from configs.models import get_config
  from vit_jax import checkpoint
  from vit_jax.interop import convert

  settings = get_config("B/16", num_classes=1000).to_dict()
  model = VisionTransformer(**settings)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
  params = random_params(model, images, scale=0.02)
  want = np.asarray(model.apply({"params": params}, images)[0])
  checkpoint.save(tmp_path / "work" / "checkpoints", params, config={"model": settings, "image_size": [224, 224]})
  assert convert.main(["--input", str(tmp_path / "work"), "--to", "timm", "--output", str(tmp_path / "timm")]) == 0
  ref = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
  with torch.no_grad():
    got = ref(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert np.array_equal(got.argmax(1), want.argmax(1)) and np.std(want) > 0.1


@pytest.mark.parametrize("kw, timm_kw", [
    (dict(), dict(class_token=True, global_pool="token")),
    (dict(pool_type="gap", fc_norm=True, class_token=True), dict(class_token=True, global_pool="avg", fc_norm=True)),
    (dict(pool_type="map"), dict(class_token=False, global_pool="map")),
    (dict(layer_scale_init=0.1), dict(class_token=True, global_pool="token", init_values=0.1)),
    (dict(distilled=True), None),
    (dict(qk_norm="layernorm"), dict(class_token=True, global_pool="token", qk_norm=True)),
    (dict(parallel=True, qk_norm="rmsnorm", norm_type="rmsnorm", qkv_bias=False),
     dict(class_token=True, global_pool="token", qk_norm=True, qkv_bias=False, norm_layer="rmsnorm",
          block_fn="parallel")),
], ids=["token", "fc_norm", "map", "layerscale", "distilled", "qknorm", "parallel-rms"])
def test_timm_models_import_with_their_logits(tmp_path, kw, timm_kw):
  """The other direction: a timm model built by timm, every parameter perturbed, saved as `.pth` and
  `.safetensors`, read without torch; our logits within 2e-5 of timm's."""
  from safetensors.torch import save_file

  from vit_jax.interop import load_variables
  torch.manual_seed(0)
  common = dict(img_size=(32, 48), patch_size=8, embed_dim=48, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=7)
  if timm_kw is None:
    model = timm.create_model("deit_base_distilled_patch16_224", pretrained=False, **common)
  elif timm_kw.get("block_fn") == "parallel":
    timm_kw = dict(timm_kw, block_fn=timm.models.vision_transformer.ParallelScalingBlock)
    model = timm.models.vision_transformer.VisionTransformer(**common, **timm_kw)
  else:
    model = timm.models.vision_transformer.VisionTransformer(**common, **timm_kw)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval()
  with torch.no_grad():
    theirs = model(IMAGES_T).numpy()
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  torch.save({"model": sd, "epoch": 1}, tmp_path / "m.pth")
  save_file(sd, str(tmp_path / "m.safetensors"))
  for name in ("m.pth", "m.safetensors"):
    variables, saved = load_variables(tmp_path / name, hints={"num_heads": 4, "image_size": (32, 48)})
    s = saved["model"]
    assert s["pool_type"] == kw.get("pool_type", "token") and s["distilled"] == kw.get("distilled", False)
    assert all(s[k] == v for k, v in kw.items() if k != "layer_scale_init"), {k: s[k] for k in kw}  # gamma is read
    got = np.asarray(VisionTransformer(**s).apply(variables, IMAGES)[0])
    assert np.max(np.abs(got - theirs)) <= TOL, name


@pytest.mark.parametrize("version, size, depths, heads", [
    (1, (64, 64), (2, 2, 2), (2, 4, 8)), (1, (64, 96), (2, 2), (2, 4)),
    (2, (64, 64), (2, 2, 2), (2, 4, 8)), (2, (64, 96), (2, 2), (2, 4))],
    ids=["v1-clipped-last-stage", "v1-wide", "v2-clipped-last-stage", "v2-wide"])
def test_swin_exports_to_and_imports_from_timm(version, size, depths, heads):
  """timm builds the model from our arguments and loads our state dict strictly: the same logits
  (maps the window divides: timm rolls before padding); its own perturbed weights import back exactly."""
  from vit_jax.interop import swin as swin_interop
  from vit_jax.models.swin import SwinTransformer
  settings = dict(num_classes=5, embed_dim=16, depths=depths, num_heads=heads, window_size=4, version=version,
                  pretrained_window_size=3 if version == 2 else 0)
  images = np.random.default_rng(2).standard_normal((2, *size, 3)).astype(np.float32)
  params = random_params(SwinTransformer(**settings), images, scale=0.1)
  cls, args = swin_interop.timm_model_args(settings, size)
  module = timm.models.swin_transformer_v2 if version == 2 else timm.models.swin_transformer
  model = getattr(module, cls)(**args).eval()
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in
                                               swin_interop.timm_state_dict(params, settings).items()}, strict=False)
  assert not unexpected and all(k.endswith(("relative_position_index", "relative_coords_table", "attn_mask", "k_bias"))
                                for k in missing), (missing, unexpected)
  with torch.no_grad():
    theirs = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  ours = np.asarray(SwinTransformer(**settings).apply({"params": params}, images)[0])
  assert np.max(np.abs(ours - theirs)) <= TOL
  with torch.no_grad():  # timm's own weights, every one perturbed, back into our tree
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
    theirs = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  back = swin_interop.from_timm({k: v.numpy() for k, v in model.state_dict().items()}, settings, size)
  assert np.max(np.abs(np.asarray(SwinTransformer(**settings).apply({"params": back}, images)[0]) - theirs)) <= TOL


@pytest.mark.parametrize("size, class_depth", [((32, 48), 2), ((32, 32), 1)])
def test_cait_exports_to_and_imports_from_timm(tmp_path, size, class_depth):
  """timm's `Cait` with our weights (strict), and timm's own perturbed `Cait` read back: logits within 2e-5."""
  from vit_jax.interop import cait
  from vit_jax.models.cait import CaiT
  settings = dict(num_classes=7, patch_size=8, width=48, depth=3, num_heads=4, class_depth=class_depth,
                  layer_scale_init=0.1)
  images = np.random.default_rng(5).standard_normal((3, *size, 3)).astype(np.float32)
  images_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  params = random_params(CaiT(**settings), images)
  want = np.asarray(CaiT(**settings).apply({"params": params}, images)[0])
  model = timm.models.cait.Cait(**cait.timm_model_args(settings, size)).eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in cait.timm_state_dict(params, settings).items()},
                        strict=True)
  cait.save_timm(params, settings, tmp_path / "timm", size)  # a hub folder timm builds and loads itself
  folder = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
  with torch.no_grad():
    assert np.max(np.abs(model(images_t).numpy() - want)) <= TOL and np.std(want) > 0.1
    assert np.max(np.abs(folder(images_t).numpy() - want)) <= TOL
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    theirs = model(images_t).numpy()
  back, found, _ = cait.from_timm({k: v.numpy() for k, v in model.state_dict().items()}, {"num_heads": 4},
                                  image_size=size)
  got = np.asarray(CaiT(**{k: v for k, v in found.items() if k != "family"}).apply({"params": back}, images)[0])
  assert np.max(np.abs(got - theirs)) <= TOL


def test_peg_is_timms_twins_position_convolution():
  """CPVT's PEG against timm's `PosConv` (Twins), the same operator: class token aside, patches convolved."""
  from vit_jax.models.encoder import PositionEncodingGenerator
  x = np.random.default_rng(6).standard_normal((2, 1 + 4 * 6, 16)).astype(np.float32)
  peg = PositionEncodingGenerator()
  params = random_params(peg, x, (4, 6), 1, scale=0.5)
  got = np.asarray(peg.apply({"params": params}, x, (4, 6), 1))
  ref = timm.models.twins.PosConv(16, 16).eval()
  with torch.no_grad():
    ref.proj[0].weight.copy_(torch.from_numpy(np.asarray(params["conv"]["kernel"]).transpose(3, 2, 0, 1).copy()))
    ref.proj[0].bias.copy_(torch.from_numpy(np.asarray(params["conv"]["bias"])))
    want = ref(torch.from_numpy(x[:, 1:].copy()), (4, 6)).numpy()
  np.testing.assert_array_equal(got[:, 0], x[:, 0])
  assert np.max(np.abs(got[:, 1:] - want)) <= TOL
