"""Per-example preprocessing ops, written as a pipeline string (big_vision style).

    pp = "decode|inception_crop(224)|flip_lr|value_range(-1, 1)"

Each op maps an example dict (`image`: HWC uint8 array or encoded bytes,
`label`) to a new one.  Random ops draw from a `numpy.random.Generator` that
grain derives from the seed and the example's position, so a pipeline is
deterministic and resumable.

| op | effect |
|---|---|
| `decode` | encoded JPEG/PNG bytes -> HWC uint8 (arrays pass through) |
| `resize(h[, w])` | bilinear resize |
| `central_crop(h[, w])` | center crop |
| `central_pad(h[, w])` | the image at the centre of a larger canvas of zeros (same content scale) |
| `inception_crop(size, area_min=5, area_max=100)` | random area (%) and aspect ratio in [3/4, 4/3] crop, resized to size |
| `random_crop_pad(pad)` | pad by `pad` pixels (edge value 0) and crop back to the original size: small shifts |
| `flip_lr` | random horizontal flip |
| `value_range(vmin, vmax)` | uint8 0..255 -> float32 in [vmin, vmax] |
| `randaug(num_layers, magnitude, magnitude_std=0, policy="big_vision")` | RandAugment on uint8 images (`vit_jax.data.randaug`: AugReg's `randaug(2, 15)`, or DeiT's `randaug(2, 9, magnitude_std=0.5, policy="timm")`) |
| `random_erase(probability=0.25)` | DeiT's random erasing: one rectangle of N(0, 1) noise, on float images (after `value_range`) |

Batches: `apply_batch` runs the ops over a whole batch, each example with its own generator, and
gives exactly what `apply` gives per example; the ops that allow it (`decode` of arrays, `central_crop`,
`random_crop_pad`, `flip_lr`, `value_range`) work on the stacked batch in NumPy at once, the others
(PIL resizes and crops) example by example.  A final `value_range` can run on the device instead
(`split_device`), so that images travel as uint8.

Geometry: when an example carries `geometry` (LV-ViT's score maps add it), the
spatial ops keep it up to date.  It is float32 `(y0, x0, sy, sx)`: a point at
normalised coordinates (y, x) in [0, 1]^2 of the current image (0 = top / left
edge, 1 = bottom / right edge) came from `(y0 + sy * y, x0 + sx * x)` of the
original image, so a label map of the original can follow the crops and flips.
"""

from __future__ import annotations

import ast
import io
import math
import re
from typing import Any, Callable

import numpy as np

Example = dict[str, Any]
_OP = re.compile(r"^\s*(\w+)\s*(?:\((.*)\))?\s*$")


def _pil(image: np.ndarray):
  from PIL import Image
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(img, channels: int) -> np.ndarray:
  a = np.asarray(img)
  return a[..., None] if a.ndim == 2 else a[..., :channels]


IDENTITY = np.array([0.0, 0.0, 1.0, 1.0], np.float32)


def _moved(example: Example, y0: float, x0: float, sy: float, sx: float) -> Example:
  """Compose the op's map (current image -> its input image) into `geometry`, if tracked."""
  if "geometry" not in example:
    return example
  gy0, gx0, gsy, gsx = (float(v) for v in example["geometry"])
  return dict(example, geometry=np.array([gy0 + gsy * y0, gx0 + gsx * x0, gsy * sy, gsx * sx], np.float32))


def _moved_batch(batch: Example, y0, x0, sy, sx, rows=None) -> Example:
  """`_moved` for a stacked batch: per-row (arrays) or shared (scalars) maps, only `rows` if given."""
  if "geometry" not in batch:
    return batch
  g = batch["geometry"].astype(np.float64)
  new = np.stack([g[:, 0] + g[:, 2] * y0, g[:, 1] + g[:, 3] * x0, g[:, 2] * sy, g[:, 3] * sx],
                 axis=1).astype(np.float32)
  if rows is not None:
    new = np.where(np.asarray(rows)[:, None], new, batch["geometry"])
  return dict(batch, geometry=new)


def _batched(op: Callable, batched: Callable) -> Callable:
  """Gives `op` its form over a stacked batch, `batched(batch, rngs)`, with the same results."""
  op.batched = batched
  return op


def _size(h, w=None) -> tuple[int, int]:
  return int(h), int(h if w is None else w)


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "La")


def decode_image(data: bytes, channels: int | None = None) -> np.ndarray:
  """Encoded image bytes (any format PIL reads) -> HWC uint8 with `channels` (1 or 3) channels.

  Grey images (8- or 16-bit) give 1 channel and anything else 3 unless `channels` says otherwise
  (grey is repeated into RGB, colour becomes luma).  16-bit values are scaled to 0..255; an alpha
  channel (RGBA, LA, palette transparency) is composited onto white, as image viewers show it.
  """
  from PIL import Image

  img = Image.open(io.BytesIO(data))
  img.load()
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit (or wider) grey
    if img.mode == "F":
      raise ValueError("a floating-point image has no defined value range: save it as 8- or 16-bit")
    wide = np.asarray(img).astype(np.float64)
    img = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
  if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(background, img.convert("RGBA"))
  gray = img.mode in _GRAY_MODES
  want = channels or (1 if gray else 3)
  if want not in (1, 3):
    raise ValueError(f"images can be decoded to 1 or 3 channels, not {want}")
  image = np.asarray(img.convert("L" if want == 1 else "RGB"))
  return image[..., None] if image.ndim == 2 else image


def decode(example: Example, rng=None) -> Example:
  image = example["image"]
  if isinstance(image, (bytes, np.bytes_)):
    image = decode_image(bytes(image))
  return dict(example, image=np.asarray(image))


decode.batched = lambda batch, rngs=None: batch  # a stacked batch holds arrays already


def resize(h, w=None):
  size = _size(h, w)

  def op(example, rng=None):
    from PIL import Image
    image = example["image"]
    if image.shape[:2] == size:
      return example
    img = _pil(image).resize((size[1], size[0]), Image.BILINEAR)
    return dict(example, image=_from_pil(img, image.shape[-1]))
  return op


def central_crop(h, w=None):
  size = _size(h, w)

  def op(example, rng=None):
    image = example["image"]
    top, left = (image.shape[0] - size[0]) // 2, (image.shape[1] - size[1]) // 2
    if top < 0 or left < 0:
      raise ValueError(f"central_crop{size} of an image of shape {image.shape}: resize first.")
    h, w = image.shape[:2]
    example = _moved(example, top / h, left / w, size[0] / h, size[1] / w)
    return dict(example, image=image[top:top + size[0], left:left + size[1]])

  def batched(batch, rngs=None):
    image = batch["image"]
    h, w = image.shape[1:3]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    if top < 0 or left < 0:
      raise ValueError(f"central_crop{size} of images of shape {image.shape[1:]}: resize first.")
    batch = _moved_batch(batch, top / h, left / w, size[0] / h, size[1] / w)
    return dict(batch, image=image[:, top:top + size[0], left:left + size[1]])
  return _batched(op, batched)


def central_pad(h, w=None):
  """Place the image at the centre of a larger `h` x `w` canvas of zeros (the content keeps its scale)."""
  size = _size(h, w)

  def op(example, rng=None):
    image = example["image"]
    ih, iw = image.shape[:2]
    top, left = (size[0] - ih) // 2, (size[1] - iw) // 2
    if top < 0 or left < 0:
      raise ValueError(f"central_pad{size} of an image of shape {image.shape}: it is larger; crop it instead.")
    padded = np.pad(image, ((top, size[0] - ih - top), (left, size[1] - iw - left)) + ((0, 0),) * (image.ndim - 2))
    example = _moved(example, -top / ih, -left / iw, size[0] / ih, size[1] / iw)
    return dict(example, image=padded)
  return op


def inception_crop(size, area_min=5, area_max=100):
  out = _size(size)

  def op(example, rng):
    image = example["image"]
    h, w = image.shape[:2]
    for _ in range(10):
      area = h * w * rng.uniform(area_min, area_max) / 100.0
      ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
      ch, cw = int(round(math.sqrt(area / ratio))), int(round(math.sqrt(area * ratio)))
      if 0 < ch <= h and 0 < cw <= w:
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        break
    else:  # fall back to the largest central crop
      ch = cw = min(h, w)
      top, left = (h - ch) // 2, (w - cw) // 2
    crop = dict(_moved(example, top / h, left / w, ch / h, cw / w), image=image[top:top + ch, left:left + cw])
    return resize(*out)(crop)
  return op


def random_crop_pad(pad):
  pad = int(pad)

  def op(example, rng):
    image = example["image"]
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    example = _moved(example, (top - pad) / h, (left - pad) / w, 1.0, 1.0)
    return dict(example, image=padded[top:top + h, left:left + w])

  def batched(batch, rngs):
    image = batch["image"]
    n, h, w = image.shape[:3]
    offsets = np.array([rng.integers(0, 2 * pad + 1, size=2) for rng in rngs]).reshape(n, 2)
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)) + ((0, 0),) * (image.ndim - 3))
    ys = offsets[:, 0, None] + np.arange(h)
    xs = offsets[:, 1, None] + np.arange(w)
    batch = _moved_batch(batch, (offsets[:, 0] - pad) / h, (offsets[:, 1] - pad) / w, 1.0, 1.0)
    return dict(batch, image=padded[np.arange(n)[:, None, None], ys[:, :, None], xs[:, None, :]])
  return _batched(op, batched)


def flip_lr(example, rng):
  if rng.random() < 0.5:
    example = dict(_moved(example, 0.0, 1.0, 1.0, -1.0), image=example["image"][:, ::-1])
  return example


def _flip_lr_batched(batch, rngs):
  flip = np.array([rng.random() < 0.5 for rng in rngs], bool)
  image = batch["image"]
  batch = _moved_batch(batch, 0.0, 1.0, 1.0, -1.0, rows=flip)
  return dict(batch, image=np.where(flip.reshape((-1,) + (1,) * (image.ndim - 1)), image[:, :, ::-1], image))


flip_lr.batched = _flip_lr_batched


def value_range(vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0):
  def scale(x, xp=np):
    x = xp.asarray(x, xp.float32)
    return (x - in_min) / (in_max - in_min) * (vmax - vmin) + vmin  # float32 throughout, in this order

  def op(example, rng=None):
    return dict(example, image=scale(example["image"]))
  op = _batched(op, lambda batch, rngs=None: dict(batch, image=scale(batch["image"])))
  table = scale(np.arange(256, dtype=np.uint8))  # every uint8 value as the host computes it

  def on_device(x):
    """Inside a jitted step: uint8 through the host's own table (XLA may turn / 255 into * (1 / 255),
    one ulp off), anything else by the formula."""
    jnp = _jnp()
    if x.dtype == jnp.uint8:
      return jnp.asarray(table)[x.astype(jnp.int32)]
    return scale(x, jnp)
  op.on_device = on_device
  return op


def randaug(num_layers=2, magnitude=10, magnitude_std=0.0, policy="big_vision"):
  from vit_jax.data.randaug import RandAugment
  augment = RandAugment(num_layers, magnitude, magnitude_std, policy)

  def op(example, rng):
    if "geometry" in example:
      raise ValueError("randaug rotates and shears, which `geometry` (token labeling's crop boxes) cannot "
                       "follow: drop randaug from pp_train or train without score maps.")
    return dict(example, image=augment(np.asarray(example["image"]), rng))
  return op


def random_erase(probability=0.25, area_min=0.02, area_max=1 / 3, min_aspect=0.3):
  from vit_jax.data.randaug import random_erase as erase

  def op(example, rng):
    return dict(example, image=erase(np.asarray(example["image"]), rng, probability, (area_min, area_max),
                                     min_aspect))
  return op


def _jnp():
  import jax.numpy as jnp
  return jnp


OPS: dict[str, Callable] = {
    "decode": lambda: decode, "resize": resize, "central_crop": central_crop, "central_pad": central_pad,
    "inception_crop": inception_crop,
    "random_crop_pad": random_crop_pad, "flip_lr": lambda: flip_lr, "value_range": value_range,
    "randaug": randaug, "random_erase": random_erase,
}
RANDOM_OPS = {"inception_crop", "random_crop_pad", "flip_lr", "randaug", "random_erase"}


def parse(spec: str) -> list[tuple[str, Callable]]:
  """`"decode|resize(32)|value_range(-1, 1)"` -> [(name, op), ...]; unknown ops list the known ones."""
  ops = []
  for part in (p for p in spec.split("|") if p.strip()):
    m = _OP.match(part)
    if not m or m.group(1) not in OPS:
      raise ValueError(f"Unknown preprocessing op {part.strip()!r} in {spec!r}: choose from {sorted(OPS)}.")
    args, kwargs = _arguments(m.group(2) or "", part.strip())
    try:
      ops.append((m.group(1), OPS[m.group(1)](*args, **kwargs)))
    except TypeError as e:
      raise ValueError(f"Bad arguments in preprocessing op {part.strip()!r}: {e}.") from None
  return ops


def _arguments(text: str, op: str) -> tuple[list[Any], dict[str, Any]]:
  """Literal positional and keyword arguments: `"8, area_min=20"` -> ([8], {"area_min": 20})."""
  if not text.strip():
    return [], {}
  try:
    call = ast.parse(f"op({text})", mode="eval").body
    assert isinstance(call, ast.Call)
    return ([ast.literal_eval(a) for a in call.args],
            {k.arg: ast.literal_eval(k.value) for k in call.keywords})
  except (SyntaxError, ValueError, AssertionError):
    raise ValueError(f"Cannot read the arguments of preprocessing op {op!r}: use Python literals, "
                     "e.g. inception_crop(224, area_min=20).") from None


def is_random(spec: str) -> bool:
  return any(name in RANDOM_OPS for name, _ in parse(spec))


def split_device(spec: str) -> tuple[list[tuple[str, Callable]], Callable | None]:
  """(the parsed ops to run on the host, the final op on the device or None): a final `value_range`
  moves to the device, so the host hands over uint8 images (a quarter of float32's bytes)."""
  ops = parse(spec)
  if ops and hasattr(ops[-1][1], "on_device"):
    return ops[:-1], ops[-1][1].on_device
  return ops, None


def _stackable(examples: list[Example]) -> bool:
  first = examples[0]
  for k, v in first.items():
    if not isinstance(v, (np.ndarray, np.generic, int, float)):
      return False
    shape = np.shape(v)
    if any(not isinstance(e.get(k), (np.ndarray, np.generic, int, float)) or np.shape(e[k]) != shape
           for e in examples[1:]):
      return False
  return all(e.keys() == first.keys() for e in examples)


def apply_batch(ops: list[tuple[str, Callable]], examples: list[Example] | Example,
                rngs: list[np.random.Generator] | None) -> Example:
  """The ops over a batch of examples (a list, or already stacked), example i drawing from `rngs[i]`:
  the same arrays as `apply` on each example, stacked.  Ops with a batched form run once over the
  stacked batch, the others example by example."""
  batch = examples if isinstance(examples, dict) else None
  n = len(next(iter(batch.values()))) if batch is not None else len(examples)
  for name, op in ops:
    if name in RANDOM_OPS and rngs is None:
      raise ValueError(f"Op {name!r} is random: use it in a training pipeline (evaluation is deterministic).")
    if hasattr(op, "batched") and (batch is not None or _stackable(examples)):
      batch = op.batched(batch if batch is not None else stack(examples), rngs)
      continue
    if batch is not None:
      examples, batch = [{k: v[i] for k, v in batch.items()} for i in range(n)], None
    examples = [op(e, r) if name in RANDOM_OPS else op(e) for e, r in zip(examples, rngs or [None] * n)]
  return batch if batch is not None else stack(examples)


def stack(examples: list[Example]) -> Example:
  """Examples -> a batch; examples of different shapes are an error that says how to fix it."""
  out = {}
  for k in examples[0]:
    shapes = sorted({np.shape(e[k]) for e in examples})
    if len(shapes) > 1:
      raise ValueError(f"The examples' {k!r} have different shapes {shapes[:4]}: add a resize or crop to the "
                       "preprocessing (e.g. decode|resize(224)|...) so every example has the same shape.")
    out[k] = np.stack([e[k] for e in examples])
  return out


def apply(ops: list[tuple[str, Callable]], example: Example, rng: np.random.Generator | None) -> Example:
  for name, op in ops:
    if name in RANDOM_OPS:
      if rng is None:
        raise ValueError(f"Op {name!r} is random: use it in a training pipeline (evaluation is deterministic).")
      example = op(example, rng)
    else:
      example = op(example)
  return example
