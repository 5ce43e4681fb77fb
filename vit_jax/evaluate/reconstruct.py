"""MAE reconstructions as a PNG grid: original | masked | reconstruction | reconstruction + visible.

    python -m vit_jax.evaluate.reconstruct --workdir workdirs/mae_digits [--num 8] [--output FILE.png]

Reads the newest checkpoint and the config of an MAE training run, takes the
first `--num` images of the evaluation split and writes one row per image.
With `norm_pix_loss` the predictions are per-patch normalised; they are mapped
back with each original patch's mean and standard deviation (the reference
code's visualisation does the same), so the reconstruction is in pixel units.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from vit_jax.models.mae import MaskedAutoencoder, unpatchify


def reconstructions(model: MaskedAutoencoder, params, images: np.ndarray, noise: np.ndarray | None = None,
                    rng: jax.Array | None = None) -> dict[str, np.ndarray]:
  """`{"original", "masked", "reconstruction", "pasted"}` images `[B, H, W, C]` in the input's value range."""
  rngs = {"masking": rng if rng is not None else jax.random.key(0)}
  # One compiled forward pass (a few times faster than running the ops one by one).
  _, out = jax.jit(lambda p, x, n, r: model.apply({"params": p}, x, noise=n, rngs=r))(params, images, noise, rngs)
  p, grid, c = model.patch_size, out["grid"], model.channels
  pred, target, mask = (np.asarray(out[k]) for k in ("pred", "target", "mask"))
  if model.norm_pix_loss:  # undo the per-patch normalisation of the target
    mean = target.mean(-1, keepdims=True)
    std = np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    pred = pred * std + mean
  removed = mask[..., None] > 0
  fill = np.full_like(target, (target.min() + target.max()) / 2)  # mid-grey for hidden patches
  to_image = lambda patches: np.asarray(unpatchify(patches, p, grid, c))
  return {"original": np.asarray(images), "masked": to_image(np.where(removed, fill, target)),
          "reconstruction": to_image(pred), "pasted": to_image(np.where(removed, pred, target))}


def grid_image(rows: dict[str, np.ndarray], value_range=(-1.0, 1.0), cell: int = 96, gap: int = 2) -> np.ndarray:
  """Columns in `rows` order, one row per example, as a uint8 RGB array (nearest-neighbour upscaling)."""
  from PIL import Image

  lo, hi = value_range
  columns = list(rows.values())
  n, h, w, _ = columns[0].shape
  scale = max(1, cell // max(h, w))
  ch, cw = h * scale, w * scale
  canvas = np.full((n * (ch + gap) + gap, len(columns) * (cw + gap) + gap, 3), 255, np.uint8)
  for j, images in enumerate(columns):
    for i in range(n):
      x = np.clip((images[i] - lo) / (hi - lo), 0, 1)
      x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]
      img = Image.fromarray(np.round(x * 255).astype(np.uint8)).resize((cw, ch), Image.NEAREST)
      top, left = gap + i * (ch + gap), gap + j * (cw + gap)
      canvas[top:top + ch, left:left + cw] = np.asarray(img)
  return canvas


def save_png(array: np.ndarray, path: str) -> str:
  from vit_jax import files

  files.write_png(path, array)
  return path


def main(argv=None) -> int:
  from vit_jax import cli

  parser = cli.ArgumentParser(prog="python -m vit_jax.evaluate.reconstruct", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num", type=int, default=8)
  parser.add_argument("--output", help="PNG path (default WORKDIR/reconstructions.png)")
  parser.add_argument("--seed", type=int, default=0, help="masking noise seed")
  args = parser.parse_args(argv)

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from vit_jax import checkpoint, files
  from vit_jax.data import input_pipeline

  try:
    if args.num < 1:
      raise ValueError(f"--num {args.num} must be at least 1.")
    output = args.output or os.path.join(args.workdir, "reconstructions.png")
    files.check_output(output, args.workdir, overwrite=True, beside=True)
    params, saved = checkpoint.load(args.workdir)
    if saved.get("task") != "mae":
      raise ValueError(f"{args.workdir} is not an MAE run (task {saved.get('task')!r}).")
    with open(os.path.join(args.workdir, "config.json")) as f:
      data = json.load(f)["data"]
    model = MaskedAutoencoder(**saved["model"])
    source = input_pipeline.get_source(data["name"], data["eval_split"], data.get("data_dir"),
                                       channels=saved["model"].get("channels"))
    batch = next(input_pipeline.eval_batches(source, data["pp_eval"], args.num))
    images = batch["image"][: int(batch["mask"].sum())]
    rows = reconstructions(model, params, images, rng=jax.random.key(args.seed))
    path = save_png(grid_image(rows), output)
  except cli.INPUT_ERRORS as e:
    return cli.fail(e, 2)
  print(f"wrote {path}: columns original | masked | reconstruction | reconstruction + visible, "
        f"{len(images)} images")
  return 0


if __name__ == "__main__":
  sys.exit(main())
