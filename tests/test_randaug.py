"""RandAugment's operations against PIL (ImageOps / ImageEnhance / Image.transform, what timm and torchvision
apply), its two policies' magnitude tables against the reference formulas, and random erasing against its
definition (DeiT's settings)."""

import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from vit_jax.data import preprocess, randaug as ra


def _pil(a):
  return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def _array(img):
  x = np.asarray(img)
  return x[..., None] if x.ndim == 2 else x


def _images(n, seed=0):
  """Random grey and RGB images of odd sizes; every third one of few levels (equalize / autocontrast
  have work to do), one with a flat channel."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    h, w = rng.integers(3, 24, 2)
    a = rng.integers(0, 256, (h, w, 1 if i % 2 else 3), dtype=np.uint8)
    if i % 3 == 0:
      a = (a // 64 * 50 + 30).astype(np.uint8)
    if i == 4:
      a[..., 0] = 77
    out.append(a)
  return out


@pytest.mark.parametrize("name", ["autocontrast", "equalize", "invert", "posterize", "solarize", "color",
                                  "contrast", "brightness", "sharpness"])
def test_colour_operations_equal_pil(name):
  rng = np.random.default_rng(1)
  for i, a in enumerate(_images(60)):
    img = _pil(a)
    factor = float(rng.uniform(0.0, 3.0))  # below and above 1: PIL clips and truncates in both ranges
    if name in ("autocontrast", "equalize", "invert"):
      ours, ref = getattr(ra, name)(a), getattr(ImageOps, name)(img)
    elif name == "posterize":
      ours, ref = ra.posterize(a, i % 8 + 1), ImageOps.posterize(img, i % 8 + 1)
    elif name == "solarize":
      ours, ref = ra.solarize(a, 4 * i), ImageOps.solarize(img, 4 * i)
    else:
      enhancer = getattr(ImageEnhance, name.capitalize())
      ours, ref = getattr(ra, name)(a, factor), enhancer(img).enhance(factor)
    np.testing.assert_array_equal(ours, _array(ref), err_msg=f"{name} on image {i} {a.shape}")
    assert ours.dtype == np.uint8 and ours.shape == a.shape


def test_solarize_add_and_posterize_definitions():
  a = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  out = ra.solarize_add(a, 110).ravel().astype(int)
  v = np.arange(256)
  np.testing.assert_array_equal(out, np.where(v < 128, np.minimum(v + 110, 255), v))
  np.testing.assert_array_equal(ra.posterize(a, 0), np.zeros_like(a))  # AugReg's magnitude-0 quirk
  np.testing.assert_array_equal(ra.posterize(a, 8), a)
  np.testing.assert_array_equal(ra.posterize(a, 3).ravel(), v // 32 * 32)


@pytest.mark.parametrize("interpolation,resample", [("nearest", Image.NEAREST), ("bilinear", Image.BILINEAR)])
def test_affine_operations_equal_pil(interpolation, resample):
  rng = np.random.default_rng(2)
  rotated_equal = rotated_total = 0
  for i, a in enumerate(_images(40, seed=3)):
    img, c = _pil(a), a.shape[-1]
    fill = (128,) * c
    pil_fill = fill if c == 3 else 128
    s, t = float(rng.uniform(-0.4, 0.4)), float(rng.uniform(-8, 8))
    for ours, data in [(ra.shear_x(a, s, fill, interpolation), (1, s, 0, 0, 1, 0)),
                       (ra.shear_y(a, s, fill, interpolation), (1, 0, 0, s, 1, 0)),
                       (ra.translate_x(a, t, fill, interpolation), (1, 0, t, 0, 1, 0)),
                       (ra.translate_y(a, t, fill, interpolation), (1, 0, 0, 0, 1, t))]:
      ref = img.transform(img.size, Image.AFFINE, data, resample=resample, fillcolor=pil_fill)
      np.testing.assert_array_equal(ours, _array(ref), err_msg=f"affine {data} on image {i}")
    degrees = float(rng.uniform(-45, 45))
    ours = ra.rotate(a, degrees, fill, interpolation)
    ref = _array(img.rotate(degrees, resample=resample, fillcolor=pil_fill))
    # PIL's nearest-neighbour warp runs in fixed point: a pixel whose source lands on a pixel edge can
    # round the other way (about 1 in 10,000 here); bilinear differs by at most one level.
    assert np.abs(ours.astype(int) - ref).max() <= (255 if interpolation == "nearest" else 1)
    rotated_equal += int((ours == ref).sum())
    rotated_total += ref.size
  assert rotated_equal / rotated_total > 0.999


def test_geometry_definitions():
  a = np.random.default_rng(4).integers(0, 256, (6, 6, 3), dtype=np.uint8)
  fill = (128, 128, 128)
  np.testing.assert_array_equal(ra.rotate(a, 90, fill), np.rot90(a, 1))  # counter-clockwise
  np.testing.assert_array_equal(ra.rotate(a, -90, fill, "bilinear"), np.rot90(a, -1))
  moved = ra.translate_x(a, 2, fill)  # the content moves left by 2, grey enters on the right
  np.testing.assert_array_equal(moved[:, :4], a[:, 2:])
  assert (moved[:, 4:] == 128).all()
  # Output centre (x + 0.5, y + 0.5) <- input (x + y + 1, y + 0.5): row y moves left by y + 1.
  sheared = ra.shear_x(a, 1.0, fill)
  for y in range(6):
    np.testing.assert_array_equal(sheared[y, :5 - y], a[y, y + 1:])
    assert (sheared[y, 5 - y:] == 128).all()


def test_cutout_definition():
  a = np.full((20, 30, 3), 9, np.uint8)
  for seed in range(20):
    out = ra.cutout(a, np.random.default_rng(seed), 4, (128, 128, 128))
    centre = np.random.default_rng(seed)  # the same draws: the centre row, then the column
    cy, cx = int(centre.integers(0, 20)), int(centre.integers(0, 30))
    expected = a.copy()
    expected[max(cy - 4, 0):cy + 4, max(cx - 4, 0):cx + 4] = 128  # side 2 * 4 about the centre, cut to fit
    np.testing.assert_array_equal(out, expected)


def test_big_vision_magnitudes():
  """AugReg's table (TF EfficientNet autoaugment.py, max level 10) at magnitudes 0, 10 and 15."""
  rng = np.random.default_rng(0)
  args = lambda name, m, width=224: abs(ra.big_vision_arguments(name, m, width, rng))
  assert args("Rotate", 15) == pytest.approx(45.0) and args("Rotate", 10) == pytest.approx(30.0)
  assert args("ShearX", 15) == pytest.approx(0.45)
  assert args("TranslateY", 10) == pytest.approx(100.0) and args("TranslateX", 10, 112) == pytest.approx(50.0)
  for name in ("Color", "Contrast", "Brightness", "Sharpness"):
    assert args(name, 0) == pytest.approx(0.1) and args(name, 15) == pytest.approx(2.8)
  assert (args("Posterize", 0), args("Posterize", 10), args("Posterize", 15)) == (0, 4, 6)
  assert (args("Solarize", 0), args("Solarize", 15)) == (0, 384)
  assert (args("SolarizeAdd", 10), args("Cutout", 10), args("Cutout", 15)) == (110, 40, 60)
  signs = {np.sign(ra.big_vision_arguments("Rotate", 10, 224, rng)) for _ in range(50)}
  assert signs == {-1.0, 1.0}  # geometric operations go either way


def test_timm_magnitudes():
  """timm's increasing operations (`rand-m9-...-inc1`) at magnitude 9 and 10."""
  rng = np.random.default_rng(0)
  args = lambda name, m, width=100: ra.timm_arguments(name, m, width, rng)
  assert {round(args("Color", 9), 6) for _ in range(40)} == {0.19, 1.81}  # 1 -+ 0.9 * 9 / 10
  assert abs(args("TranslateX", 10, 200)) == pytest.approx(90.0)  # 0.45 of the width
  assert (args("Posterize", 9), args("Posterize", 0), args("Solarize", 9), args("Solarize", 0)) == (1, 4, 26, 256)
  assert args("SolarizeAdd", 9) == 99 and abs(args("ShearY", 9)) == pytest.approx(0.27)


class _Recorder:
  def __init__(self, monkeypatch):
    self.calls = []
    original = ra.apply_operation

    def record(name, image, argument, **kw):
      self.calls.append((name, argument))
      return original(name, image, argument, **kw)
    monkeypatch.setattr(ra, "apply_operation", record)


def test_big_vision_policy_applies_every_layer_uniformly(monkeypatch):
  rec = _Recorder(monkeypatch)
  augment = ra.RandAugment(2, 15)
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  for seed in range(800):
    augment(image, np.random.default_rng(seed))
  assert len(rec.calls) == 1600  # no operation is skipped
  counts = np.array([sum(n == op for n, _ in rec.calls) for op in ra.POLICIES["big_vision"]])
  assert counts.min() > 100 - 4 * 10 and counts.max() < 100 + 4 * 10  # 100 each expected, sd ~9.7


def test_timm_policy_probability_and_magnitude_noise(monkeypatch):
  rec = _Recorder(monkeypatch)
  augment = ra.RandAugment(2, 9, magnitude_std=0.5, policy="timm")
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  for seed in range(1000):
    augment(image, np.random.default_rng(seed))
  assert abs(len(rec.calls) - 1000) < 4 * math.sqrt(2000 * 0.25)  # each of 2000 with probability 0.5
  assert "Cutout" not in {n for n, _ in rec.calls}
  rotations = np.array([abs(a) for n, a in rec.calls if n == "Rotate"]) / 3.0  # magnitude = degrees / 3
  assert rotations.max() <= 10.0 and 0.3 < rotations.std() < 0.7 and abs(rotations.mean() - 9) < 0.15


def test_randaug_is_deterministic_and_per_example():
  image = np.random.default_rng(0).integers(0, 256, (12, 12, 1), dtype=np.uint8)
  for policy, m in [("big_vision", 15), ("timm", 9)]:
    augment = ra.RandAugment(2, m, policy=policy)
    a = [augment(image, np.random.default_rng(s)) for s in range(20)]
    b = [augment(image, np.random.default_rng(s)) for s in range(20)]
    assert all((x == y).all() for x, y in zip(a, b))
    assert len({x.tobytes() for x in a}) > 10
  black = ra.RandAugment(1, 0)  # magnitude 0 is not the identity in AugReg's definition
  outs = {black(image, np.random.default_rng(s)).tobytes() for s in range(200)}
  assert np.zeros_like(image).tobytes() in outs


def test_random_erase_definition():
  rng = np.random.default_rng(0)
  image = np.full((24, 32, 3), 5.0, np.float32)
  erased = 0
  for seed in range(2000):
    ops = preprocess.parse("random_erase(0.25)")
    out = preprocess.apply(ops, {"image": image}, np.random.default_rng(seed))["image"]
    changed = out != 5.0
    if not changed.any():
      continue
    erased += 1
    ys, xs = np.nonzero(changed.any(-1))
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert changed[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # one full rectangle, every channel
    assert 0.02 * 768 - 2 * (h + w) <= h * w <= 768 / 3 + 2 * (h + w)  # area after rounding the sides
    assert 0.3 <= (h + 0.5) / (w - 0.5) and (h - 0.5) / (w + 0.5) <= 1 / 0.3  # aspect, sides rounded
    assert h < 24 and w < 32
  assert abs(erased - 500) < 4 * math.sqrt(2000 * 0.25 * 0.75)
  noise = ra.random_erase(np.zeros((200, 200, 3), np.float32), np.random.default_rng(1), probability=1.0,
                          area=(0.3, 0.3))
  values = noise[noise != 0]
  assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02  # N(0, 1) per pixel and channel
  with pytest.raises(ValueError, match="after value_range"):
    ra.random_erase(np.zeros((8, 8, 1), np.uint8), rng)


def test_pipeline_ops():
  spec = "decode|randaug(2, 15)|value_range(-1, 1)|random_erase(0.25)"
  ops = preprocess.parse(spec)
  examples = [{"image": np.random.default_rng(i).integers(0, 256, (8, 8, 1), dtype=np.uint8), "label": i}
              for i in range(6)]
  batch = preprocess.apply_batch(ops, examples, [np.random.default_rng(10 + i) for i in range(6)])
  for i, e in enumerate(examples):
    np.testing.assert_array_equal(batch["image"][i], preprocess.apply(ops, e, np.random.default_rng(10 + i))["image"])
  assert preprocess.is_random("randaug(2, 9, magnitude_std=0.5, policy='timm')")
  with pytest.raises(ValueError, match="is random"):
    preprocess.apply(ops, examples[0], None)
  with pytest.raises(ValueError, match="Unknown RandAugment policy 'tf'"):
    preprocess.parse("randaug(2, 9, policy='tf')")
  with pytest.raises(ValueError, match="add policy='timm'"):
    preprocess.parse("randaug(2, 9, magnitude_std=0.5)")
  with pytest.raises(ValueError, match="before value_range"):
    preprocess.apply(preprocess.parse("value_range(-1, 1)|randaug(2, 9)"), examples[0], np.random.default_rng(0))
  with pytest.raises(ValueError, match="cannot follow"):
    preprocess.apply(ops, dict(examples[0], geometry=preprocess.IDENTITY), np.random.default_rng(0))


def test_augreg_settings_in_the_vit_config():
  from configs import vit
  expected = {"none": ("", 0.0), "light0": ("randaug(2, 0)|", 0.0), "light1": ("randaug(2, 10)|", 0.2),
              "medium1": ("randaug(2, 15)|", 0.2), "medium2": ("randaug(2, 15)|", 0.5),
              "strong1": ("randaug(2, 20)|", 0.5), "strong2": ("randaug(2, 20)|", 0.8)}
  for name, (step, alpha) in expected.items():
    c = vit.get_config(f"aug={name},do=0.1,sd=0.2")
    assert c.data.pp_train == f"decode|random_crop_pad(1)|{step}value_range(-1, 1)"
    assert (c.mixup.mixup_alpha, c.model.dropout_rate, c.model.drop_path_rate) == (alpha, 0.1, 0.2)
    batch = preprocess.apply_batch(preprocess.parse(c.data.pp_train),
                                   [{"image": np.full((8, 8, 1), 200, np.uint8), "label": 0}] * 4,
                                   [np.random.default_rng(i) for i in range(4)])
    assert batch["image"].shape == (4, 8, 8, 1) and batch["image"].dtype == np.float32
  assert vit.get_config("variant=Ti/16,dataset=x").mixup.mixup_alpha == 0.0  # AugReg's i1k choice: light0
  assert "randaug(2, 15)" in vit.get_config("variant=B/16,dataset=x").data.pp_train
  with pytest.raises(ValueError, match="Unknown AugReg setting aug='heavy1'"):
    vit.get_config("aug=heavy1")
