"""Image GPT completions as a PNG grid: original | the given top half | several sampled bottom halves.

    python -m vit_jax.evaluate.complete --workdir workdirs/igpt_digits [--num 8] [--samples 4]
        [--given 32] [--temperature 1.0] [--top_k K] [--seed 0] [--output FILE.png]

Reads the newest checkpoint and the config of an Image GPT run (`task="igpt"`), quantises the first
`--num` images of the evaluation split to the run's palette, keeps their first `--given` pixels in
raster order (default: the top half) and samples the rest `--samples` times with the key / value
cache (`vit_jax.decode.complete_images`).  Pictures show palette colours, so the original column
is the quantised image the model was trained to predict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from vit_jax.evaluate.reconstruct import grid_image, save_png


def completions(model, params, ids: np.ndarray, colours: np.ndarray, *, samples: int, given: int,
                rng: jax.Array, temperature: float = 1.0, top_k: int | None = None,
                shape: tuple[int, int] = (8, 8)) -> dict[str, np.ndarray]:
  """`ids [B, H * W]` -> `{"original", "given", "sample 1", ...}` images `[B, H, W, C]` in the palette's range.

  The hidden pixels of "given" are mid-grey (the palette's mean colour's grey level).
  """
  from vit_jax import decode
  from vit_jax.data import palette

  h, w = shape
  fn = jax.jit(lambda p, prompt, r: decode.complete_images(model, {"params": p}, prompt, r, length=h * w,
                                                           temperature=temperature, top_k=top_k))
  to_image = lambda x: palette.dequantize(np.asarray(x), colours).reshape(len(x), h, w, colours.shape[1])
  original = to_image(ids)
  hidden = np.arange(h * w) >= given
  mid = (colours.min() + colours.max()) / 2
  rows = {"original": original, "given": np.where(hidden.reshape(1, h, w, 1), mid, original)}
  prompt = np.asarray(ids[:, :given], np.int32)
  for s in range(samples):
    rows[f"sample {s + 1}"] = to_image(fn(params, prompt, jax.random.fold_in(rng, s)))
  return rows


def main(argv=None) -> int:
  from vit_jax import cli

  parser = cli.ArgumentParser(prog="python -m vit_jax.evaluate.complete", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num", type=int, default=8, help="images (rows)")
  parser.add_argument("--samples", type=int, default=4, help="completions per image")
  parser.add_argument("--given", type=int, default=None, help="pixels given, raster order (default: top half)")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", help="PNG path (default WORKDIR/completions.png)")
  args = parser.parse_args(argv)

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from vit_jax import checkpoint, files
  from vit_jax.data import input_pipeline
  from vit_jax.models.igpt import ImageGPT, quantize
  from vit_jax.train.tasks import load_palette

  try:
    if args.num < 1 or args.samples < 1:
      raise ValueError(f"--num {args.num} and --samples {args.samples} must be at least 1.")
    output = args.output or os.path.join(args.workdir, "completions.png")
    files.check_output(output, args.workdir, overwrite=True, beside=True)
    params, saved = checkpoint.load(args.workdir)
    if saved.get("task") != "igpt":
      raise ValueError(f"{args.workdir} is not an Image GPT run (task {saved.get('task')!r}): train one with "
                       "configs/igpt.py.")
    with open(os.path.join(args.workdir, "config.json")) as f:
      config = json.load(f)
    colours = load_palette(str(config.get("palette") or "grey:17"))
    settings = {k: v for k, v in saved["model"].items() if k not in ("channels", "family")}
    model = ImageGPT(**settings)
    data = config["data"]
    source = input_pipeline.get_source(data["name"], data["eval_split"], data.get("data_dir"),
                                       channels=int(colours.shape[1]))
    batch = next(input_pipeline.eval_batches(source, data["pp_eval"], args.num))
    images = batch["image"][: int(batch["mask"].sum())]
    h, w = images.shape[1:3]
    given = h * w // 2 if args.given is None else args.given
    if not 0 <= given < h * w:
      raise ValueError(f"--given {given} must be between 0 and {h * w - 1} pixels.")
    rows = completions(model, params, np.asarray(quantize(images, colours)), colours, samples=args.samples,
                       given=given, rng=jax.random.key(args.seed), temperature=args.temperature,
                       top_k=args.top_k, shape=(h, w))
    path = save_png(grid_image(rows, value_range=(-1.0, 1.0)), output)
  except cli.INPUT_ERRORS as e:
    return cli.fail(e, 2)
  print(f"wrote {path}: columns original | given ({given} of {h * w} pixels) | {args.samples} samples, "
        f"{len(images)} images")
  return 0


if __name__ == "__main__":
  sys.exit(main())
