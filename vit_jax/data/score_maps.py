"""Dense score maps for token labeling (LV-ViT): a teacher's per-location top-k logits.

    python -m vit_jax.data.score_maps --teacher workdirs/teacher --out workdirs/teacher/score_maps

runs a trained teacher (our checkpoint directory, `pool_type="gap"`) over every
training image with the evaluation preprocessing and stores, per image, the
paper's `[2, k, H, W]` array: the top-k logits and their class indices at each
of the teacher's H x W patch positions (float16; indices are exact below 2048).
Per-location logits are the teacher's head applied to each normalised patch
token; their mean over the positions is exactly the teacher's image logits.

Layout of the output directory ("next to the data", one per dataset split):

    <out>/score_maps.npy    float16 [N, 2, k, H, W], row i = example i of the split
    <out>/meta.json         dataset, split, N, k, classes, grid, teacher

Training reads it with `ScoreMapSource`, which adds `score_values`,
`score_indices` and an identity `geometry` to each example; the preprocessing
ops then record every crop and flip in `geometry` (see preprocess.py), and
`token_targets` crops the map the same way on the device:

* the dense map is `sum_k one_hot(index_k) * value_k` (zero logits elsewhere);
* for each token cell of the S x S grid, `samples` x `samples` points spread
  evenly over the cell (as RoI-align with a fixed sampling ratio) are mapped
  through `geometry` into the original image, and the map is read there with
  bilinear interpolation at cell centres `(i + 0.5) / H` (edges clamped); the
  cell's logits are the mean of its samples;
* the class token's map is the mean over every cell (a 1 x 1 RoI-align of the
  whole crop);
* targets are the softmax over classes of those logits, then label smoothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

FILE, META = "score_maps.npy", "meta.json"


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------

def dense_logits(model, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
  """Per-location logits `[B, h, w, classes]` of a `pool_type="gap"` ViT teacher."""
  if model.pool_type != "gap" or model.fc_norm or model.representation_size or not model.num_classes:
    raise ValueError("Score maps need a teacher whose logits are a linear head on the mean of its normalised "
                     "patch tokens: pool_type='gap', fc_norm=False, no representation_size, and a head.")
  _, out = model.apply(variables, images)
  b, gh, gw, _ = out["stem"].shape
  tokens = out["encoded"][:, out["encoded"].shape[1] - gh * gw:]
  head = variables["params"]["head"]
  logits = tokens @ head["kernel"] + head["bias"]
  return logits.reshape(b, gh, gw, -1).astype(jnp.float32)


def top_k_maps(logits: jax.Array, k: int) -> jax.Array:
  """`[B, h, w, C]` logits -> the paper's `[B, 2, k, h, w]` (values, then indices as floats)."""
  values, indices = jax.lax.top_k(logits, k)
  maps = jnp.stack([values, indices.astype(jnp.float32)], axis=1)  # [B, 2, h, w, k]
  return jnp.moveaxis(maps, -1, 2)


def generate(teacher_workdir: str, out_dir: str, *, dataset: str | None = None, split: str | None = None,
             data_dir: str | None = None, k: int = 5, batch_size: int = 256, overwrite: bool = False) -> str:
  """Run the teacher saved in `teacher_workdir` over a split and write `out_dir/score_maps.npy`.

  The folder is built under a temporary name and renamed when complete; an existing `out_dir`
  is an error unless `overwrite`.
  """
  from vit_jax import checkpoint, files
  from vit_jax.data import input_pipeline
  from vit_jax.models.vit import VisionTransformer

  files.check_output(out_dir, teacher_workdir, overwrite=overwrite, what="--out")
  if k < 1:
    raise ValueError(f"--k {k} must be at least 1.")
  variables, saved = checkpoint.load_variables(teacher_workdir)
  if saved.get("task", "classification") != "classification" or "model" not in saved:
    raise ValueError(f"{teacher_workdir!r} does not hold a classifier checkpoint with its model settings.")
  model = VisionTransformer(**saved["model"])
  run_config = os.path.join(teacher_workdir, "config.json")  # the teacher's data settings, when a workdir
  data = json.load(open(run_config)).get("data", {}) if os.path.exists(run_config) else {}
  dataset = dataset or data.get("name")
  split = split or data.get("train_split", "train")
  data_dir = data_dir if data_dir is not None else data.get("data_dir")
  if not dataset or "pp_eval" not in data:
    raise ValueError(f"{teacher_workdir!r} has no config.json with the data settings: pass the dataset, split "
                     "and evaluation preprocessing of a training workdir.")
  source = input_pipeline.get_source(dataset, split, data_dir, channels=saved["model"].get("channels"))
  if not 1 <= k <= source.num_classes or source.num_classes > 2048:
    raise ValueError(f"k={k} must be in [1, {source.num_classes}] and classes <= 2048 (float16 indices).")
  fn = jax.jit(lambda v, x: top_k_maps(dense_logits(model, v, x), k))
  rows = []
  for batch in input_pipeline.eval_batches(source, data["pp_eval"], batch_size):
    maps = np.asarray(fn(variables, batch["image"]))
    rows.append(maps[batch["mask"] > 0])
  maps = np.concatenate(rows).astype(np.float16)
  meta = dict(dataset=dataset, split=split, count=int(maps.shape[0]), k=k, num_classes=source.num_classes,
              grid=list(maps.shape[-2:]), teacher=os.path.abspath(teacher_workdir))
  with files.atomic_directory(out_dir, overwrite=overwrite) as tmp:
    np.save(os.path.join(tmp, FILE), maps)
    with open(os.path.join(tmp, META), "w") as f:
      json.dump(meta, f, indent=1)
  return out_dir


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------

class ScoreMapSource:
  """A random-access source whose examples carry their score map and an identity `geometry`."""

  def __init__(self, data, score_dir: str, *, dataset: str, split: str):
    path = os.path.join(score_dir, META)
    if not os.path.exists(path):
      raise FileNotFoundError(f"No score maps in {score_dir!r} ({META} missing): generate them with "
                              f"`python -m vit_jax.data.score_maps --teacher TEACHER_WORKDIR --out {score_dir}`.")
    with open(path) as f:
      self.meta = json.load(f)
    if (self.meta["dataset"], self.meta["split"]) != (dataset, split) or self.meta["count"] != len(data):
      raise ValueError(f"The score maps in {score_dir!r} are for {self.meta['dataset']!r} split "
                       f"{self.meta['split']!r} ({self.meta['count']} examples), but training reads {dataset!r} "
                       f"split {split!r} ({len(data)} examples): regenerate them for this split.")
    self.maps = np.load(os.path.join(score_dir, FILE), mmap_mode="r")
    self.data = data

  def __len__(self) -> int:
    return len(self.data)

  def __getitem__(self, i: int) -> dict[str, Any]:
    m = np.asarray(self.maps[i], np.float32)
    return dict(self.data[i], score_values=m[0], score_indices=m[1].astype(np.int32),
                geometry=np.array([0.0, 0.0, 1.0, 1.0], np.float32))


# ---------------------------------------------------------------------------
# targets on the device
# ---------------------------------------------------------------------------

def _axis_weights(start: jax.Array, scale: jax.Array, cells: int, size: int, samples: int) -> jax.Array:
  """`[B, cells, size]`: bilinear weights of each output cell's samples on a map axis, averaged."""
  offsets = (jnp.arange(cells)[:, None] + (jnp.arange(samples)[None, :] + 0.5) / samples) / cells  # [cells, n]
  src = start[:, None, None] + scale[:, None, None] * offsets[None]  # normalised, original image
  pos = jnp.clip(src * size - 0.5, 0.0, size - 1.0)  # map-cell coordinates, edges clamped
  lo = jnp.floor(pos)
  frac = pos - lo
  hi = jnp.minimum(lo + 1, size - 1)
  grid = jnp.arange(size)
  w = ((grid == lo[..., None]) * (1 - frac[..., None]) + (grid == hi[..., None]) * frac[..., None])
  return w.mean(axis=2)


def aligned_logits(values: jax.Array, indices: jax.Array, geometry: jax.Array, grid: tuple[int, int],
                   num_classes: int, samples: int = 2) -> tuple[jax.Array, jax.Array]:
  """Score maps cropped like their images: `(cls [B, C], tokens [B, gh * gw, C])` logits.

  values, indices: `[B, k, H, W]`; geometry: `[B, 4]` (y0, x0, sy, sx).
  """
  dense = jnp.einsum("bkhw,bkhwc->bhwc", values.astype(jnp.float32), jax.nn.one_hot(indices, num_classes))
  _, _, h, w = values.shape
  wy = _axis_weights(geometry[:, 0], geometry[:, 2], grid[0], h, samples)
  wx = _axis_weights(geometry[:, 1], geometry[:, 3], grid[1], w, samples)
  tokens = jnp.einsum("bih,bhwc,bjw->bijc", wy, dense, wx)
  return tokens.mean(axis=(1, 2)), tokens.reshape(tokens.shape[0], grid[0] * grid[1], num_classes)


def token_targets(batch: Mapping[str, jax.Array], grid: tuple[int, int], num_classes: int,
                  label_smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """Soft targets `(cls [B, C], tokens [B, N, C])`: softmax of the aligned logits, then smoothing."""
  cls, tokens = aligned_logits(batch["score_values"], batch["score_indices"], batch["geometry"], grid, num_classes)
  smooth = lambda p: p * (1 - label_smoothing) + label_smoothing / num_classes
  return smooth(jax.nn.softmax(cls, -1)), smooth(jax.nn.softmax(tokens, -1))


def main(argv=None) -> int:
  from vit_jax import cli

  parser = cli.ArgumentParser(prog="python -m vit_jax.data.score_maps", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--teacher", required=True, help="the teacher's workdir (our checkpoint)")
  parser.add_argument("--out", required=True, help="output directory (score_maps.npy + meta.json)")
  parser.add_argument("--dataset", default=None, help="default: the teacher's training dataset")
  parser.add_argument("--split", default=None, help="default: the teacher's training split")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--k", type=int, default=5)
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
  args = parser.parse_args(argv)
  from vit_jax import runtime
  runtime.tune_xla_cpu()
  try:
    out = generate(args.teacher, args.out, dataset=args.dataset, split=args.split, data_dir=args.data_dir, k=args.k,
                   overwrite=args.overwrite)
  except cli.INPUT_ERRORS as e:
    return cli.fail(e)
  with open(os.path.join(out, META)) as f:
    meta = json.load(f)
  print(f"wrote {os.path.join(out, FILE)}: {meta['count']} x [2, {meta['k']}, {meta['grid'][0]}, {meta['grid'][1]}] "
        f"({meta['dataset']} {meta['split']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
