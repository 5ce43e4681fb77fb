"""RandAugment (Cubuk et al. 2020) and its operations on uint8 images, and random erasing (Zhong et al. 2020).

Two policies, as their reference implementations define them:

* `"big_vision"` (the AugReg / TF EfficientNet RandAugment, `randaug(2, 15)` in big_vision's configs):
  16 operations (the 14 below with plain magnitudes, Cutout and SolarizeAdd); every layer applies one
  uniformly chosen operation, always, at the fixed magnitude.  Magnitudes above 10 extrapolate (rotation
  45 degrees at 15), and magnitude 0 is not the identity: enhance factor 0.1, posterize to 0 bits (black),
  solarize at 0 (inverted).  Translation and Cutout are 100 and 40 pixels at 224 px, here in proportion
  to the image (100 / 224 and 40 / 224 of its width); the fill is grey (128).
* `"timm"` (timm's `rand-m{M}-mstd{S}-inc1`, DeiT's and MAE's): the 15 "increasing" operations (a larger
  magnitude is always a stronger change: enhance factors 1 +- 0.9 m / 10, posterize to 4 - 4 m / 10 bits,
  solarize above 256 - 256 m / 10; relative translation 0.45 m / 10), chosen with replacement, each applied
  with probability 0.5 at a magnitude drawn from N(M, S) clipped to [0, 10].  The fill is the ImageNet mean
  (124, 116, 104), or 128 for grey images.

Colour operations are NumPy on `[H, W, C]` uint8 (C = 1 or 3) and give exactly what PIL's `ImageOps` /
`ImageEnhance` give (the functions timm and torchvision apply); geometric ones are affine warps by the
inverse map in PIL's pixel-centre convention, nearest neighbour (big_vision) or bilinear (timm's DeiT
setting resamples bicubic).  Random choices come from the example's `numpy.random.Generator`.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

MAX_LEVEL = 10.0
GREY = 128
IMAGENET_MEAN_UINT8 = (124, 116, 104)  # round(255 * (0.485, 0.456, 0.406))


# ---------------------------------------------------------------------------------------------- colour
def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Apply a [256] or per-channel [C, 256] uint8 lookup table."""
  table = np.asarray(table)
  if table.ndim == 1:
    return table.astype(np.uint8)[image]
  out = np.empty_like(image)
  for c in range(image.shape[-1]):
    out[..., c] = table[c].astype(np.uint8)[image[..., c]]
  return out


def invert(image: np.ndarray) -> np.ndarray:
  return 255 - image


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
  """Keep the `bits` high bits of every value (0 bits: black; 8 or more: unchanged)."""
  bits = int(bits)
  if bits >= 8:
    return image
  return image & np.uint8((0xFF << (8 - max(bits, 0))) & 0xFF)


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
  """Invert the values at or above `threshold`."""
  return np.where(image < threshold, image, 255 - image).astype(np.uint8)


def solarize_add(image: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
  """Add `addition` (clipped to 255) to the values below `threshold`."""
  added = np.minimum(image.astype(np.int32) + int(addition), 255).astype(np.uint8)
  return np.where(image < threshold, added, image)


def autocontrast(image: np.ndarray) -> np.ndarray:
  """Stretch each channel's [min, max] to [0, 255] (a flat channel stays as it is)."""
  tables = []
  for c in range(image.shape[-1]):
    lo, hi = int(image[..., c].min()), int(image[..., c].max())
    if hi <= lo:
      tables.append(np.arange(256))
      continue
    scale = 255.0 / (hi - lo)
    offset = -lo * scale
    tables.append(np.clip(np.trunc(np.arange(256) * scale + offset), 0, 255))
  return _lut(image, np.stack(tables))


def equalize(image: np.ndarray) -> np.ndarray:
  """Histogram equalisation per channel, by PIL's table: step = (pixels - count of the top value) // 255."""
  tables = []
  for c in range(image.shape[-1]):
    hist = np.bincount(image[..., c].ravel(), minlength=256)
    used = hist[hist > 0]
    step = (used.sum() - used[-1]) // 255 if len(used) > 1 else 0
    if not step:
      tables.append(np.arange(256))
      continue
    cumulative = np.concatenate([[0], np.cumsum(hist)[:-1]])
    tables.append(np.minimum((cumulative + step // 2) // step, 255))
  return _lut(image, np.stack(tables))


def _blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
  """degenerate + factor * (image - degenerate) in float32, truncated (PIL's Image.blend)."""
  d = np.asarray(degenerate, np.float32)
  out = d + np.float32(factor) * (image.astype(np.float32) - d)
  return np.clip(np.trunc(out), 0, 255).astype(np.uint8)


def grey(image: np.ndarray) -> np.ndarray:
  """ITU-R 601-2 luma as PIL's "L" conversion computes it (fixed point), `[H, W, 1]`."""
  if image.shape[-1] == 1:
    return image
  rgb = image.astype(np.int64)
  luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
  return luma.astype(np.uint8)[..., None]


def color(image: np.ndarray, factor: float) -> np.ndarray:
  """Saturation: blend with the grey image (factor 0 grey, 1 unchanged)."""
  return _blend(np.broadcast_to(grey(image), image.shape), image, factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """Blend with a flat image at the rounded mean grey level."""
  mean = int(grey(image).mean(dtype=np.float64) + 0.5)
  return _blend(np.full(image.shape, mean, np.uint8), image, factor)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """Blend with black."""
  return _blend(np.zeros_like(image), image, factor)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
  """Blend with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (the border kept as it is)."""
  h, w = image.shape[:2]
  if h < 3 or w < 3:
    return image
  x = image.astype(np.float64)
  smooth = x.copy()
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13.0
  inner = sum(kernel[i, j] * x[i:i + h - 2, j:j + w - 2] for i in range(3) for j in range(3))
  smooth[1:-1, 1:-1] = np.floor(inner + 0.5)
  return _blend(smooth.astype(np.uint8), image, factor)


# ---------------------------------------------------------------------------------------------- geometry
def affine(image: np.ndarray, matrix, fill, interpolation: str = "nearest") -> np.ndarray:
  """Output pixel (x, y) takes the input at (a x' + b y' + c, d x' + e y' + f), x' = x + 0.5 (pixel centres),
  as PIL's `Image.transform(size, AFFINE, (a, b, c, d, e, f))`; points outside the image get `fill`."""
  a, b, c, d, e, f = (float(v) for v in matrix)
  h, w, channels = image.shape
  ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
  xin, yin = a * xs + b * ys + c, d * xs + e * ys + f
  fill = np.broadcast_to(np.asarray(fill, np.float64).reshape(-1)[:channels], (channels,))
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  if interpolation == "nearest":
    xi = np.clip(np.floor(xin), 0, w - 1).astype(np.int64)
    yi = np.clip(np.floor(yin), 0, h - 1).astype(np.int64)
    out = np.where(inside[..., None], image[yi, xi], fill.astype(np.uint8))
    return out.astype(np.uint8)
  if interpolation != "bilinear":
    raise ValueError(f"Unknown interpolation {interpolation!r}: choose 'nearest' or 'bilinear'.")
  xs0, ys0 = xin - 0.5, yin - 0.5
  x0, y0 = np.floor(xs0), np.floor(ys0)
  dx, dy = (xs0 - x0)[..., None], (ys0 - y0)[..., None]
  x0i, y0i = x0.astype(np.int64), y0.astype(np.int64)
  px = lambda yy, xx: image[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)].astype(np.float64)
  top = px(y0i, x0i) + (px(y0i, x0i + 1) - px(y0i, x0i)) * dx
  bottom = px(y0i + 1, x0i) + (px(y0i + 1, x0i + 1) - px(y0i + 1, x0i)) * dx
  value = np.clip(np.floor(top + (bottom - top) * dy), 0, 255)  # truncated, as PIL's 8-bit filter
  return np.where(inside[..., None], value, fill).astype(np.uint8)


def rotate(image: np.ndarray, degrees: float, fill, interpolation: str = "nearest") -> np.ndarray:
  """Counter-clockwise by `degrees` about the image centre (PIL's `Image.rotate`)."""
  h, w = image.shape[:2]
  angle = -math.radians(degrees % 360.0)
  cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)  # PIL rounds them so
  cx, cy = w / 2.0, h / 2.0
  # The output centre maps to the input centre (the sums in PIL's order, for the same rounding).
  c = (cos * -cx + sin * -cy) + cx
  f = (-sin * -cx + cos * -cy) + cy
  return affine(image, (cos, sin, c, -sin, cos, f), fill, interpolation)


def shear_x(image, factor, fill, interpolation="nearest"):
  return affine(image, (1, factor, 0, 0, 1, 0), fill, interpolation)


def shear_y(image, factor, fill, interpolation="nearest"):
  return affine(image, (1, 0, 0, factor, 1, 0), fill, interpolation)


def translate_x(image, pixels, fill, interpolation="nearest"):
  """The content moves left by `pixels` (PIL's (1, 0, pixels, 0, 1, 0))."""
  return affine(image, (1, 0, pixels, 0, 1, 0), fill, interpolation)


def translate_y(image, pixels, fill, interpolation="nearest"):
  return affine(image, (1, 0, 0, 0, 1, pixels), fill, interpolation)


def cutout(image: np.ndarray, rng: np.random.Generator, half: int, fill) -> np.ndarray:
  """A square of side 2 * `half` about a uniformly drawn centre, cut to the image, set to `fill`."""
  h, w = image.shape[:2]
  cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
  out = image.copy()
  if half > 0:
    out[max(cy - half, 0):min(cy + half, h), max(cx - half, 0):min(cx + half, w)] = \
        np.asarray(fill, np.uint8).reshape(-1)[:image.shape[-1]]
  return out


# ---------------------------------------------------------------------------------------------- policies
def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


_SHARED = ("Rotate", "ShearX", "ShearY", "SolarizeAdd")  # scaled alike by both policies


def _shared_argument(name: str, level: float, rng: np.random.Generator):
  if name == "Rotate":
    return _signed(level * 30.0, rng)
  if name == "SolarizeAdd":
    return int(level * 110)
  return _signed(level * 0.3, rng)  # ShearX, ShearY


def big_vision_arguments(name: str, magnitude: float, width: int, rng: np.random.Generator):
  """The operation's argument at `magnitude` in the AugReg (TF EfficientNet) RandAugment."""
  level = magnitude / MAX_LEVEL
  if name in _SHARED:
    return _shared_argument(name, level, rng)
  if name in ("TranslateX", "TranslateY"):
    return _signed(level * 100.0 * width / 224.0, rng)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return level * 1.8 + 0.1
  if name == "Posterize":
    return int(level * 4)
  if name == "Solarize":
    return int(level * 256)
  if name == "Cutout":
    return int(level * 40.0 * width / 224.0)
  return None


def timm_arguments(name: str, magnitude: float, width: int, rng: np.random.Generator):
  """The operation's argument at `magnitude` in timm's increasing RandAugment (`inc1`)."""
  level = magnitude / MAX_LEVEL
  if name in _SHARED:
    return _shared_argument(name, level, rng)
  if name in ("TranslateX", "TranslateY"):
    return _signed(level * 0.45, rng) * width
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return 1.0 + _signed(level * 0.9, rng)
  if name == "Posterize":
    return 4 - int(level * 4)
  if name == "Solarize":
    return 256 - int(level * 256)
  return None


POLICIES = {
    "big_vision": ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
                   "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout",
                   "SolarizeAdd"),
    "timm": ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
             "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY"),
}


_PLAIN: dict[str, Callable] = {"AutoContrast": autocontrast, "Equalize": equalize, "Invert": invert}
_GEOMETRIC: dict[str, Callable] = {"Rotate": rotate, "ShearX": shear_x, "ShearY": shear_y,
                                   "TranslateX": translate_x, "TranslateY": translate_y}
_COLOUR: dict[str, Callable] = {"Posterize": posterize, "Solarize": solarize, "SolarizeAdd": solarize_add,
                                "Color": color, "Contrast": contrast, "Brightness": brightness,
                                "Sharpness": sharpness}


def apply_operation(name: str, image: np.ndarray, argument, *, fill, interpolation: str,
                    rng: np.random.Generator) -> np.ndarray:
  """One named operation with its argument (see `big_vision_arguments` / `timm_arguments`)."""
  if name in _PLAIN:
    return _PLAIN[name](image)
  if name in _GEOMETRIC:
    return _GEOMETRIC[name](image, argument, fill, interpolation)
  if name == "Cutout":
    return cutout(image, rng, argument, fill)
  return _COLOUR[name](image, argument)


class RandAugment:
  """`num_layers` random operations at `magnitude` (0..10 is the reference range) under `policy`."""

  def __init__(self, num_layers: int = 2, magnitude: float = 10, magnitude_std: float = 0.0,
               policy: str = "big_vision"):
    if policy not in POLICIES:
      raise ValueError(f"Unknown RandAugment policy {policy!r}: choose one of {sorted(POLICIES)}.")
    if int(num_layers) != num_layers or num_layers < 0:
      raise ValueError(f"randaug needs a whole number of layers >= 0, got {num_layers!r}.")
    if magnitude < 0 or magnitude_std < 0:
      raise ValueError(f"randaug magnitude and magnitude_std must be >= 0, got {magnitude!r}, {magnitude_std!r}.")
    if magnitude_std and policy != "timm":
      raise ValueError("magnitude_std is part of timm's RandAugment: add policy='timm' (big_vision's uses a "
                       "fixed magnitude).")
    self.num_layers, self.magnitude, self.magnitude_std = int(num_layers), float(magnitude), float(magnitude_std)
    self.policy = policy
    self.operations = POLICIES[policy]

  def fill(self, channels: int):
    if self.policy == "timm" and channels == 3:
      return IMAGENET_MEAN_UINT8
    return (GREY,) * channels

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
      raise ValueError(f"randaug works on [H, W, 1 or 3] uint8 images, got {image.dtype} {image.shape}: put it "
                       "before value_range(...).")
    width = image.shape[1]
    fill = self.fill(image.shape[-1])
    if self.policy == "big_vision":
      for _ in range(self.num_layers):
        name = self.operations[int(rng.integers(len(self.operations)))]
        argument = big_vision_arguments(name, self.magnitude, width, rng)
        image = apply_operation(name, image, argument, fill=fill, interpolation="nearest", rng=rng)
      return image
    names = [self.operations[i] for i in rng.integers(len(self.operations), size=self.num_layers)]
    for name in names:
      if rng.random() >= 0.5:  # each chosen operation with probability 0.5
        continue
      magnitude = self.magnitude
      if self.magnitude_std > 0:
        magnitude = float(np.clip(rng.normal(magnitude, self.magnitude_std), 0.0, MAX_LEVEL))
      argument = timm_arguments(name, magnitude, width if name != "TranslateY" else image.shape[0], rng)
      image = apply_operation(name, image, argument, fill=fill, interpolation="bilinear", rng=rng)
    return image


def random_erase(image: np.ndarray, rng: np.random.Generator, probability: float = 0.25,
                 area: tuple[float, float] = (0.02, 1 / 3), min_aspect: float = 0.3) -> np.ndarray:
  """With `probability`, one rectangle of a random area fraction (uniform in `area`) and aspect ratio
  (log-uniform in [min_aspect, 1 / min_aspect]) set to N(0, 1) noise per pixel and channel (DeiT's
  'pixel' mode, on normalised images); 10 tries to fit it inside, else the image is left as it is."""
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError("random_erase fills with N(0, 1) noise on normalised float images: put it after "
                     "value_range(...).")
  if rng.random() >= probability:
    return image
  h, w, channels = image.shape
  log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
  for _ in range(10):
    target = rng.uniform(*area) * h * w
    aspect = math.exp(rng.uniform(*log_aspect))
    eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if ew < w and eh < h:
      top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
      out = image.copy()
      out[top:top + eh, left:left + ew] = rng.standard_normal((eh, ew, channels)).astype(image.dtype)
      return out
  return image
