"""Position-embedding resizing: each mode against an independent reference, and fine-tuning at a new size."""

import numpy as np
import pytest
import scipy.ndimage

from tests.helpers import random_params
from vit_jax.interop import load_pretrained, npz, resize_posemb
from vit_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch")
F = torch.nn.functional


def table(prefix, h, w, width=8, seed=0):
  return np.random.default_rng(seed).standard_normal((1, prefix + h * w, width)).astype(np.float32)


def torch_resize(pe, prefix, src, dst, align_corners):
  grid = torch.from_numpy(pe[0, prefix:].reshape(*src, -1)).permute(2, 0, 1)[None]
  out = F.interpolate(grid, size=dst, mode="bilinear", align_corners=align_corners)
  return out[0].permute(1, 2, 0).reshape(1, dst[0] * dst[1], -1).numpy()


@pytest.mark.parametrize("src,dst", [((4, 6), (6, 9)), ((4, 4), (7, 7)), ((6, 9), (4, 6)), ((5, 3), (2, 8))])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_vit_jax_mode_is_scipy_zoom_order_1(src, dst, prefix):
  pe = table(prefix, *src)
  got = resize_posemb(pe, dst, num_prefix_tokens=prefix, source_grid=src, mode="vit_jax")
  zoomed = scipy.ndimage.zoom(pe[0, prefix:].reshape(*src, -1), (dst[0] / src[0], dst[1] / src[1], 1), order=1)
  np.testing.assert_allclose(got[0, prefix:], zoomed.reshape(-1, 8), atol=1e-6)
  # The same interpolation seen from torch: bilinear with the corners aligned.
  np.testing.assert_allclose(got[:, prefix:], torch_resize(pe, prefix, src, dst, True), atol=5e-6)
  assert np.array_equal(got[:, :prefix], pe[:, :prefix])
  assert got.dtype == np.float32


@pytest.mark.parametrize("src,dst", [((4, 6), (6, 9)), ((4, 4), (7, 7)), ((6, 9), (4, 6)), ((5, 3), (2, 8))])
@pytest.mark.parametrize("prefix", [0, 1])
def test_timm_mode_is_torch_bilinear_without_aligned_corners(src, dst, prefix):
  pe = table(prefix, *src, seed=1)
  got = resize_posemb(pe, dst, num_prefix_tokens=prefix, source_grid=src, mode="timm")
  np.testing.assert_allclose(got[:, prefix:], torch_resize(pe, prefix, src, dst, False), atol=5e-6)
  assert np.array_equal(got[:, :prefix], pe[:, :prefix])


def test_modes_differ_and_same_grid_is_identity():
  pe = table(1, 4, 4)
  a = resize_posemb(pe, (6, 6), num_prefix_tokens=1, mode="vit_jax")
  b = resize_posemb(pe, (6, 6), num_prefix_tokens=1, mode="timm")
  assert np.max(np.abs(a - b)) > 0.05  # not interchangeable: pick the mode of the run you reproduce
  for mode in ("vit_jax", "timm"):
    assert np.array_equal(resize_posemb(pe, (4, 4), num_prefix_tokens=1, mode=mode), pe)


def test_resize_errors_name_the_fix():
  with pytest.raises(ValueError, match="Unknown position-embedding resize mode 'bicubic'"):
    resize_posemb(table(0, 4, 4), (6, 6), mode="bicubic")
  with pytest.raises(ValueError, match="not a square grid: pass the grid"):
    resize_posemb(table(0, 4, 6), (6, 6))
  with pytest.raises(ValueError, match="source_grid 4x5 has 20 tokens"):
    resize_posemb(table(0, 4, 6), (6, 6), source_grid=(4, 5))


SIZE = dict(num_classes=5, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64)


@pytest.mark.parametrize("mode", ["vit_jax", "timm"])
@pytest.mark.parametrize("kw", [dict(), dict(pool_type="gap"), dict(distilled=True)], ids=["token", "gap", "deit"])
def test_fine_tune_at_a_new_resolution(tmp_path, mode, kw):
  pretrained = VisionTransformer(**dict(SIZE, **kw))
  params = random_params(pretrained, np.zeros((1, 32, 48, 3), np.float32))
  npz.save_npz(tmp_path / "m.npz", params)
  model = VisionTransformer(**dict(SIZE, num_classes=3, **kw))
  images = np.random.default_rng(0).standard_normal((2, 48, 64, 3)).astype(np.float32)
  init = random_params(model, images, rng=1)
  loaded = load_pretrained(tmp_path / "m.npz", init, reinit_head=True, posemb_resize=mode, grid=(6, 8),
                           source_grid=(4, 6))
  prefix = 1 + int(bool(kw.get("distilled"))) if kw.get("pool_type") != "gap" else 0
  want = resize_posemb(params["Transformer"]["posembed_input"]["pos_embedding"], (6, 8), num_prefix_tokens=prefix,
                       source_grid=(4, 6), mode=mode)
  assert np.array_equal(loaded["Transformer"]["posembed_input"]["pos_embedding"], want)
  logits, _ = model.apply({"params": loaded}, images)
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))


def test_new_prefix_token_rows_come_from_the_model(tmp_path):
  """ViT checkpoint -> DeiT model: the distillation row is the model's own, the class row the checkpoint's."""
  vit = VisionTransformer(**SIZE)
  params = random_params(vit, np.zeros((1, 32, 32, 3), np.float32))
  deit = VisionTransformer(**dict(SIZE, distilled=True))
  init = random_params(deit, np.zeros((1, 32, 32, 3), np.float32), rng=1)
  loaded = load_pretrained(params, init, dont_load=["^dist_token$", "^head_dist/"])
  got, old = loaded["Transformer"]["posembed_input"]["pos_embedding"], params["Transformer"]["posembed_input"][
      "pos_embedding"]
  assert np.array_equal(got[:, 0], old[:, 0])
  assert np.array_equal(got[:, 1], init["Transformer"]["posembed_input"]["pos_embedding"][:, 1])
  assert np.array_equal(got[:, 2:], old[:, 1:])


def test_size_mismatch_fails_when_resizing_is_off(tmp_path):
  vit = VisionTransformer(**SIZE)
  params = random_params(vit, np.zeros((1, 32, 32, 3), np.float32))
  init = random_params(vit, np.zeros((1, 48, 48, 3), np.float32))
  with pytest.raises(ValueError, match=r"pos_embedding: \(1, 17, 32\) vs \(1, 37, 32\)"):
    load_pretrained(params, init, posemb_resize=None)
